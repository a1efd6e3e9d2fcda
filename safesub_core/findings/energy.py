"""Energy kept by a projected point, and energy matching: Top-K at the rank fraction whose energy kept is closest
to a control's, so that Top-K and a random subspace can be compared at the same energy as well as at the same rank.

Energy kept E = sum ||X||^2 / sum ||dT||^2 over all tensors (X the update a point keeps; `SubspaceEngine.diagnostics`).

  draw(session, seed) / engine_of(session, variant, seed) / energy_kept(session, variant, pc, seed)
      The draw a point uses (None: the session's, which Top-K's points use), its engine, and the energy it keeps.
  match_energy(topk_engine, control_energies, subspace, mode, rho) -> EnergyMatch
      Energy kept is monotone in rho for every subspace (non-decreasing in parallel mode, non-increasing in
      orthogonal mode: ranks k = max(1, round(rho r)) only grow with rho), and a step function of it. A binary search
      over Top-K's grid rho = i / RHO_GRID (i = 1 .. RHO_GRID) finds the first grid rho on the target's far side
      (the target: the mean of the control's draws' energies at rho); of it and its neighbour the closer energy
      wins, which is the closest energy any grid rho reaches. The match reports the target, Top-K's energy, the gap
      and `reachable` (|gap| <= ENERGY_TOL); a target beyond Top-K's range is matched at the end of the range and
      reported as not reachable, never hidden. (Top-K keeps more of the task update than Random at the same rank
      in parallel mode, so Random's energy is reached by Top-K at a lower rank; the other way round it often is not
      reached even at rho = 1.)
  session_match(session, variant, subspace, mode, rho, seeds) -> EnergyMatch
      `match_energy` on a session's engines: the control's draws `seeds` at rho against Top-K's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from safesub_core.errors import SafesubError
from safesub_core.projection import ProjectionConfig

RHO_GRID = 10_000  # matched rank fractions are i / RHO_GRID (ranks move by at most 0.5 for r <= 5000)
ENERGY_TOL = 0.02  # an energy match within this absolute gap is "reachable"


def draw(session, seed: int | None) -> int:
    """The engine key's draw of a point: the session's for Top-K (seed None), else `seed`."""
    return int(session.seed) if seed is None else int(seed)


def engine_of(session, variant: str, seed: int | None):
    """The engine of a draw: the session's own for Top-K (it draws nothing), else draw `seed`."""
    return session.engine(variant) if seed is None else session.engine(variant, seed=seed)


def energy_kept(session, variant: str, pc: ProjectionConfig, seed: int | None = None) -> float:
    """The task update's energy kept at a point of draw `seed` (None: Top-K / the session's draw)."""
    with session.locked():
        return float(engine_of(session, variant, seed).diagnostics(pc).energy_kept)


@dataclass(frozen=True)
class EnergyMatch:
    """Top-K's rank fraction whose energy kept is closest (on the grid i / RHO_GRID) to a control's at rho."""

    subspace: str  # the control
    mode: str
    rho: float  # the control's rank fraction
    target: float  # the control's energy kept at rho, the mean over its draws
    rho_topk: float  # Top-K's matched rank fraction
    energy: float  # Top-K's energy kept there

    @property
    def gap(self) -> float:
        return self.energy - self.target

    @property
    def reachable(self) -> bool:
        return abs(self.gap) <= ENERGY_TOL


def closest_on_grid(energy_at: Callable[[float], float], target: float, increasing: bool,
                    grid: int = RHO_GRID) -> tuple[float, float]:
    """(rho, energy) of the grid rho = i / grid whose energy is closest to `target`, for a monotone step function
    `energy_at` (non-decreasing when `increasing`, else non-increasing): binary search for the first i past the
    target, then the closer of i and i - 1. Ties go to the smaller rho."""
    sign = 1.0 if increasing else -1.0
    f = lambda i: energy_at(i / grid)  # noqa: E731
    lo, hi = 1, grid
    if sign * f(hi) < sign * target:
        return hi / grid, f(hi)
    while lo < hi:  # first i with sign * f(i) >= sign * target
        mid = (lo + hi) // 2
        if sign * f(mid) >= sign * target:
            hi = mid
        else:
            lo = mid + 1
    best = (lo / grid, f(lo))
    if lo > 1:
        prev = ((lo - 1) / grid, f(lo - 1))
        if abs(prev[1] - target) <= abs(best[1] - target):
            best = prev
    return best


def match_energy(topk_engine, control_energies: Sequence[float], subspace: str, mode: str,
                 rho: float) -> EnergyMatch:
    """Top-K's rank fraction whose energy kept, in `mode`, is closest to the mean of `control_energies` (the
    control's draws at `rho`; see the module docstring)."""
    if subspace == "topk":
        raise SafesubError("energy match: the control must be randomk or random, not topk")
    if not len(control_energies):
        raise SafesubError("energy match: no control draws to match")
    target = float(np.mean(control_energies))
    at = lambda r: float(topk_engine.diagnostics(ProjectionConfig("topk", mode, r)).energy_kept)  # noqa: E731
    r, e = closest_on_grid(at, target, increasing=(mode != "orthogonal"))
    return EnergyMatch(subspace, mode, float(rho), target, float(r), float(e))


def session_match(session, variant: str, subspace: str, mode: str, rho: float,
                  seeds: Sequence[int]) -> EnergyMatch:
    """`match_energy` on a session's engines: the control's draws `seeds` at `rho` against Top-K's (the session's
    draw)."""
    pc = ProjectionConfig(subspace, mode, float(rho))
    energies = [energy_kept(session, variant, pc, s) for s in seeds]
    with session.locked():
        return match_energy(engine_of(session, variant, None), energies, subspace, mode, rho)
