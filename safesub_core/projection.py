"""One point of the projection and its diagnostics (docs/method.md, "Projection modes" and "Diagnostics").

A point (`ProjectionConfig`) is a subspace (topk, randomk, random: `SUBSPACES`), a mode (parallel, opposite,
orthogonal: `MODES`), a rank given by exactly one of a fraction rho in (0, 1] or an energy eta in (0, 1]
(`linalg.check_energy`) and a finite scale alpha; anything else is a one-line SafesubError. What they mean, and the
update X kept at a point, are `subspace`'s docstring; `subspace.SubspaceEngine.diagnostics` computes a point's
`ProjectionDiagnostics`.

Diagnostics are global sums over tensors (not means of ratios):
  energy kept      E = sum ||X||^2 / sum ||dT||^2            (independent of alpha)
  cos(task, kept)    = sum <dT, X> / (sqrt(sum ||dT||^2) sqrt(sum ||X||^2))
  cos(task, align)   = sum <dT, dA> / (sqrt(sum ||dT||^2) sqrt(sum ||dA||^2))
For a tall matrix (M > N) even U at full rank does not span R^M, so E at rho = 1 can stay well below 1.
The cosines are `linalg.cosine` of those sums; `ProjectionDiagnostics.grouped` gives E per module type or per block
(sums of squares within the group, then the ratio), `summary` the point and its global numbers as one flat dict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import pandas as pd

from safesub_core.errors import SafesubError
from safesub_core.linalg import check_energy

SUBSPACES = ("topk", "randomk", "random")
SUBSPACE_LABELS = {"topk": "Top-K", "randomk": "Random-K", "random": "Random"}
MODES = ("parallel", "opposite", "orthogonal")


@dataclass(frozen=True)
class ProjectionConfig:
    """One point of the projection: subspace, mode, rank (fraction rho or energy eta) and scale alpha."""

    subspace: str = "topk"
    mode: str = "parallel"
    rank_fraction: float | None = 0.25
    energy: float | None = None
    alpha: float = 1.0

    def __post_init__(self):
        if self.subspace not in SUBSPACES:
            raise SafesubError(f"subspace {self.subspace!r}: must be one of {', '.join(SUBSPACES)}")
        if self.mode not in MODES:
            raise SafesubError(f"mode {self.mode!r}: must be one of {', '.join(MODES)}")
        if (self.rank_fraction is None) == (self.energy is None):
            raise SafesubError("rank: give exactly one of a rank fraction or an energy fraction")
        if self.energy is not None:
            check_energy(self.energy)
        elif not (0.0 < float(self.rank_fraction) <= 1.0):
            raise SafesubError(f"rank fraction {self.rank_fraction}: must be in (0, 1]")
        if not math.isfinite(self.alpha):
            raise SafesubError(f"scale alpha {self.alpha}: must be a finite number")

    @property
    def label(self) -> str:
        rank = f"rho={self.rank_fraction:g}" if self.energy is None else f"eta={self.energy:g}"
        return f"{self.subspace} {self.mode} {rank} alpha={self.alpha:g}"


@dataclass
class ProjectionDiagnostics:
    """Global diagnostics of one point; `per_tensor` (built on first use) is the table they sum."""

    config: ProjectionConfig
    energy_kept: float
    cos_task_kept: float
    cos_task_align: float
    mean_rank_fraction: float
    _table: Callable[[], pd.DataFrame]

    @property
    def removed_energy(self) -> float:
        return 1.0 - self.energy_kept

    @cached_property
    def per_tensor(self) -> pd.DataFrame:
        """One row per tensor: tensor, module, block, rank, max_rank, task/kept/removed/align energy, dots."""
        return self._table()

    def grouped(self, by: str) -> pd.DataFrame:
        """Energy kept and removed per 'module' or per 'block' (sums of squares, then ratios)."""
        g = self.per_tensor.groupby(by, dropna=False)[["task_energy", "kept_energy", "removed_energy",
                                                       "align_energy"]].sum()
        g["energy_kept"] = g["kept_energy"] / g["task_energy"].where(g["task_energy"] > 0)
        return g.reset_index()

    def summary(self) -> dict:
        c = self.config
        return dict(
            subspace=c.subspace, mode=c.mode, rank_fraction=c.rank_fraction, energy=c.energy, alpha=c.alpha,
            energy_kept=self.energy_kept, removed_energy=self.removed_energy, cos_task_kept=self.cos_task_kept,
            cos_task_align=self.cos_task_align, mean_rank_fraction=self.mean_rank_fraction,
        )
