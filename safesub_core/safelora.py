"""SafeLoRA (Hsu et al. 2024, "Safe LoRA: the silver lining of reducing safety risks when fine-tuning large language
models") as a projection of a family's fine-tuned variant (docs/method.md, "Other safety-subspace hypotheses").

Per weight matrix (a floating-point tensor of 2+ dimensions, M x N as stored, out x in, flattened like
`linalg.as_matrix`), with the family's base W0, start model W_start and variant W_FT:

    V   = W_start - W0                 the alignment update (the paper's W_aligned - W_unaligned; the study's dA)
    C   = V V^T / ||V||_F              M x M, acting on the output side, as the paper's code builds it
    dW  = W_FT - W_start               the fine-tuning update (the study's dT)
    sim = <dW, C dW>_F / (||dW||_F ||C dW||_F)
    update = C dW  where sim < tau,  else dW;     W = W_start + update

`projection_matrix(V)` and `similarity(dW, C)` are the formulas as written, for small matrices. The plan never forms
C (M x M: vocabulary-squared for an embedding): C dW = V (V^T dW) / ||V||_F, and <dW, C dW> = ||V^T dW||_F^2 /
||V||_F, so sim lies in [0, 1] (C is positive semi-definite).

C is not a projector. Its eigenvalues are s_i^2 / ||V||_F (s_i the singular values of V), not 0 and 1: C^2 != C,
C dW is scaled by ||V||_F (a layer whose alignment update is small gets a much smaller update, one with a large
update a larger one), and within span(V) the directions are weighted by s_i^2. The orthogonal projector onto span(V)
would be U U^T (the study's Top-K subspace at full rank, `subspace.py`). The similarity does not depend on C's
scale, only on its shape; the applied update does. This module follows the paper.

- Which tensors: matrices, optionally only the module types in `modules` ("q", "v": the paper's LoRA targets;
  `checkpoints.module_type`); every other tensor (vectors: norms, biases; matrices left out) keeps its update dW.
- Edge cases: dW = 0 (a tensor the fine-tune left alone) has no similarity (NaN) and is never projected; V = 0 with
  dW != 0 gives C dW = 0 and sim = 0, so the update is removed at every tau > 0.
- Compute once, slide tau: the similarities do not depend on tau. `safelora_similarities` streams the three
  checkpoints one tensor at a time (rows read by `TensorReader.difference`, as `subspace.py` reads dA and dT) and
  returns one row per tensor with the norms every diagnostic needs; `SafeLoraPlan.at(tau)` is a new threshold on
  the same table, no tensor read. `apply` writes W_start + update into a working copy of the start model (float32;
  in bfloat16 or float16 the parameter keeps W_start and the update goes to `precision.ExactUpdates`' float32 side
  path, so it is not rounded away), and with `applied` (the plan it holds now) rewrites only the tensors whose
  projected status differs.
- Diagnostics (global ratios, as in "Diagnostics"): energy kept = sum ||update||^2 / sum ||dW||^2 and
  cos(task, kept) = sum <dW, update> / (sqrt(sum ||dW||^2) sqrt(sum ||update||^2)) over every tensor.

Bad input (an unknown variant, an unknown module type, tau not a number) raises a one-line SafesubError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import pandas as pd
import torch

from safesub_core.checkpoints import TensorReader, block_index, module_type
from safesub_core.errors import SafesubError, finite_number
from safesub_core.family import Family
from safesub_core.linalg import as_matrix, cosine
from safesub_core.precision import ExactUpdates, coarser

MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "other")


def projection_matrix(V: torch.Tensor) -> torch.Tensor:
    """C = V V^T / ||V||_F (M x M) of an alignment update V (M x N; zero when V = 0). Not a projector: see the
    module docstring."""
    V = as_matrix(V.float())
    norm = V.norm()
    return V @ V.T / norm if norm > 0 else V.new_zeros(V.shape[0], V.shape[0])


def projected_update(V: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
    """C dW = V (V^T dW) / ||V||_F without forming C, in dW's shape (zero when V = 0)."""
    Vm, dWm = as_matrix(V.float()), as_matrix(dW.float())
    norm = Vm.norm()
    if norm == 0:
        return torch.zeros_like(dW, dtype=torch.float32)
    return (Vm @ (Vm.T @ dWm) / norm).reshape(dW.shape)


def similarity(dW: torch.Tensor, C: torch.Tensor) -> float:
    """<dW, C dW>_F / (||dW||_F ||C dW||_F): NaN when dW = 0, 0 when C dW = 0."""
    dW = as_matrix(dW.double())
    CdW = C.double() @ dW
    a, b = float(dW.norm()), float(CdW.norm())
    if a == 0:
        return float("nan")
    return float((dW * CdW).sum()) / (a * b) if b > 0 else 0.0


def _tensor_row(name: str, V: torch.Tensor, dW: torch.Tensor, in_plan: bool) -> dict:
    """One row of the similarity table: the norms and inner products of one tensor's V and dW."""
    dWd = dW.double()
    update_sq = float(dWd.pow(2).sum())
    row = dict(tensor=name, module=module_type(name), block=block_index(name), rows=int(as_matrix(dW).shape[0]),
               cols=int(as_matrix(dW).shape[1]), in_plan=in_plan, update_norm=math.sqrt(update_sq),
               align_norm=float(V.double().norm()), projected_norm=float("nan"), dot_projected=float("nan"),
               similarity=float("nan"))
    if in_plan:
        Vm, dWm = as_matrix(V), as_matrix(dW)
        norm = Vm.norm()
        if norm > 0:
            X = Vm.T @ dWm  # N x N
            row["dot_projected"] = float(X.double().pow(2).sum()) / float(norm)  # <dW, C dW>
            row["projected_norm"] = float((Vm @ X).double().norm()) / float(norm)  # ||C dW||
        else:
            row["dot_projected"] = row["projected_norm"] = 0.0
        if update_sq > 0:
            b = row["projected_norm"]
            row["similarity"] = row["dot_projected"] / (row["update_norm"] * b) if b > 0 else 0.0
    return row


def _check_modules(modules: Sequence[str] | None) -> tuple[str, ...] | None:
    if modules is None:
        return None
    mods = (modules,) if isinstance(modules, str) else tuple(modules)
    bad = [m for m in mods if m not in MODULE_TYPES]
    if bad or not mods:
        raise SafesubError(f"module type {bad[0] if bad else ''!r}: must be one of {', '.join(MODULE_TYPES)}")
    return mods


def safelora_similarities(family: Family, variant: str, modules: Sequence[str] | None = None,
                          progress: Callable[[int, int, str], None] | None = None) -> pd.DataFrame:
    """One row per floating-point tensor of the start model: tensor, module, block, rows, cols, in_plan (a matrix
    of a chosen module type), update_norm ||dW||, align_norm ||V||, projected_norm ||C dW||, dot_projected
    <dW, C dW>, similarity (NaN outside the plan and where dW = 0). Streams one tensor at a time; independent of
    tau (cache it by the three checkpoints' fingerprints and `modules`)."""
    mods = _check_modules(modules)
    base, start, ft = family.update_readers(variant)
    names = start.names()
    rows = []
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), f"SafeLoRA similarity: {name}")
        in_plan = len(start.shape(name)) >= 2 and (mods is None or module_type(name) in mods)
        V = start.difference(base, name) if in_plan else torch.zeros(())
        rows.append(_tensor_row(name, V, ft.difference(start, name), in_plan))
    if progress:
        progress(len(names), len(names), "done")
    table = pd.DataFrame(rows)
    table["block"] = pd.array(table["block"], dtype="Int64")
    return table


@dataclass(frozen=True)
class SafeLoraPlan:
    """SafeLoRA at one threshold tau: which tensors are projected, their updates, and the diagnostics."""

    family: Family
    variant: str
    table: pd.DataFrame  # `safelora_similarities`
    tau: float
    _readers: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def projected(self) -> pd.Series:
        """Bool per tensor (indexed by name): in the plan with similarity < tau."""
        t = self.table
        return pd.Series((t["in_plan"] & (t["similarity"] < self.tau)).to_numpy(), index=t["tensor"].to_numpy())

    def at(self, tau: float) -> "SafeLoraPlan":
        """The same plan at another threshold (no tensor is read)."""
        return replace(self, tau=finite_number(tau, "SafeLoRA threshold tau"))

    def frame(self) -> pd.DataFrame:
        """The table with `projected`, `applied_norm` ||update|| and `dot_applied` <dW, update> at this tau: the
        per-layer similarity chart's data."""
        t = self.table.copy()
        t["projected"] = self.projected.to_numpy()
        t["applied_norm"] = t["projected_norm"].where(t["projected"], t["update_norm"])
        t["dot_applied"] = t["dot_projected"].where(t["projected"], t["update_norm"] ** 2)
        return t

    def summary(self) -> dict:
        """tau, tensors in the plan, how many are projected, the energy kept and cos(task, kept) (global ratios)."""
        t = self.frame()
        task = float((t["update_norm"] ** 2).sum())
        kept = float((t["applied_norm"] ** 2).sum())
        n_plan = int(t["in_plan"].sum())
        return dict(tau=self.tau, n_tensors=n_plan, n_projected=int(t["projected"].sum()),
                    share_projected=float(t["projected"].sum() / n_plan) if n_plan else float("nan"),
                    energy_kept=kept / task if task > 0 else float("nan"),
                    cos_task_kept=cosine(float(t["dot_applied"].sum()), task, kept))

    def _reader(self, role: str) -> TensorReader:
        if role not in self._readers:
            name = {"base": "base", "start": self.family.start, "variant": self.variant}[role]
            self._readers[role] = self.family.reader(name)
        return self._readers[role]

    def update(self, name: str) -> torch.Tensor:
        """The update applied to tensor `name` at this tau, float32 CPU in the tensor's shape: C dW where projected,
        else dW (read from the checkpoints)."""
        projected = self.projected
        if name not in projected.index:
            raise SafesubError(f"SafeLoRA plan: has no tensor {name}")
        start = self._reader("start")
        dW = self._reader("variant").difference(start, name)
        if not projected[name]:
            return dW
        return projected_update(start.difference(self._reader("base"), name), dW)


def safelora_plan(family: Family, variant: str, tau: float, modules: Sequence[str] | None = None,
                  similarities: pd.DataFrame | None = None,
                  progress: Callable[[int, int, str], None] | None = None) -> SafeLoraPlan:
    """SafeLoRA of `variant` at threshold `tau` (similarity < tau: projected). `similarities`: a table from
    `safelora_similarities` (e.g. from the disk cache) to reuse instead of streaming the checkpoints again."""
    tau = finite_number(tau, "SafeLoRA threshold tau")
    if similarities is None:
        similarities = safelora_similarities(family, variant, modules, progress)
    else:
        family.check_variant(variant)
    return SafeLoraPlan(family, variant, similarities, tau)


@torch.no_grad()
def apply(model_working: torch.nn.Module, model_start: torch.nn.Module, plan: SafeLoraPlan,
          applied: SafeLoraPlan | None = None) -> torch.nn.Module:
    """Write W_start + update (float32; in a coarser dtype through the exact side path, module docstring) into
    `model_working`'s parameters in place,
    W_start read from `model_start` (a second copy of the start model, untouched). `applied`: the plan the working
    model holds now (same family and variant); then only tensors whose projected status differs are rewritten."""
    params = dict(model_working.named_parameters())
    ref = dict(model_start.named_parameters())
    now = plan.projected
    same = (applied is not None and applied.family is plan.family and applied.variant == plan.variant
            and list(applied.table["tensor"]) == list(plan.table["tensor"]))
    before = applied.projected if same else None
    for name in plan.table["tensor"]:
        if name not in params or name not in ref:
            raise SafesubError(f"model: has no parameter {name} (is it the family's start model?)")
        if before is not None and bool(before[name]) == bool(now[name]):
            continue
        out = params[name]
        update = plan.update(name).to(out.device)
        if coarser(out.dtype, torch.float32):  # bfloat16 / float16: the update goes to the exact float32 side path
            delta, _ = ExactUpdates.of(model_working).delta(name, out, ref[name].detach())
            delta.copy_(update)
        else:
            out.copy_(ref[name].detach().to(device=out.device, dtype=torch.float32) + update)
    return model_working
