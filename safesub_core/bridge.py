"""The bridge from the refusal direction to the study's alignment subspaces (docs/method.md, "Other safety-subspace
hypotheses", "The bridge"). r is a refusal direction of the residual stream (`refusal`, `interventions`), r_hat =
r / ||r||, D the stream's size.

`refusal_in_alignment_subspace(U, r, ks)`: ||U_k^T r_hat||^2 for each k, the share of the refusal direction inside
the rank-k alignment subspace span(U_k) of a stream-writing matrix (o_proj, down_proj: its left singular vectors
live in R^D, the stream), beside the random baseline k / D (the expected share for a uniformly random k-dimensional
subspace); `refusal_in_alignment_subspaces` does so for several tensors, as one table. `shift_along(r, before,
after)`: the mean activation shift of a fine-tune on one prompt set, delta = mean(after) - mean(before) per layer,
its component along r_hat and the share of its squared norm (r_hat . delta)^2 / ||delta||^2, beside the baseline
1 / D.

Bad input (a basis that is not a matrix, a rank out of range, a direction of the wrong size or zero, states of the
wrong shapes) raises a one-line SafesubError. Nothing here touches the disk.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch

from safesub_core.checkpoints import block_index, module_type
from safesub_core.errors import SafesubError
from safesub_core.interventions import unit_direction


def refusal_in_alignment_subspace(U: torch.Tensor, direction: torch.Tensor, ks: Sequence[int] | None = None
                                  ) -> pd.DataFrame:
    """Share of the refusal direction in the rank-k alignment subspace of one stream-writing matrix: U (D, m) its
    alignment update's left singular vectors (columns orthonormal, by decreasing singular value), r (D,). One row
    per k in `ks` (default 1..m): k, captured = ||U_k^T r_hat||^2, baseline = k / D."""
    if not isinstance(U, torch.Tensor) or U.dim() != 2:
        raise SafesubError("alignment basis U: expected a matrix (hidden size x rank)")
    D, m = U.shape
    r = unit_direction(direction, D)
    ks = list(range(1, m + 1)) if ks is None else [int(k) for k in ks]
    bad = [k for k in ks if not 1 <= k <= m]
    if bad:
        raise SafesubError(f"rank k {bad[0]}: must be in 1..{m}")
    captured = (U.double().T @ r.double()).pow(2).cumsum(0)
    return pd.DataFrame(dict(k=ks, captured=[float(captured[k - 1]) for k in ks], baseline=[k / D for k in ks]))


def refusal_in_alignment_subspaces(bases: Mapping[str, torch.Tensor], direction: torch.Tensor,
                                   ks: Sequence[int] | None = None) -> pd.DataFrame:
    """`refusal_in_alignment_subspace` for several tensors (name -> U), as one long table with the tensor's name,
    module type and block: the per-layer chart of the bridge."""
    frames = []
    for name, U in bases.items():
        df = refusal_in_alignment_subspace(U, direction, ks)
        df.insert(0, "block", pd.array([block_index(name)] * len(df), dtype="Int64"))
        df.insert(0, "module", module_type(name))
        df.insert(0, "tensor", name)
        frames.append(df)
    if not frames:
        raise SafesubError("alignment bases: none given")
    return pd.concat(frames, ignore_index=True)


def shift_along(direction: torch.Tensor, states_before: torch.Tensor, states_after: torch.Tensor) -> pd.DataFrame:
    """How much of a fine-tune's mean activation shift lies along the refusal direction. States (n, D) or
    (L+1, n, D) of the same prompt set before and after (counts may differ); direction (D,) or one per layer
    (L+1, D). One row per layer: layer, shift_norm ||delta||, along r_hat . delta, share (r_hat . delta)^2 /
    ||delta||^2 (NaN where delta = 0, and where a per-layer direction is zero: a stream point where the harmful
    and harmless means agree, e.g. the first point at a template token), baseline 1 / D."""
    before, after = states_before, states_after
    for what, X in (("states before", before), ("states after", after)):
        if not isinstance(X, torch.Tensor) or X.dim() not in (2, 3) or 0 in X.shape:
            raise SafesubError(f"{what}: expected a non-empty tensor (prompts, hidden) or (layers, prompts, hidden)")
    before = before if before.dim() == 3 else before.unsqueeze(0)
    after = after if after.dim() == 3 else after.unsqueeze(0)
    if before.shape[0] != after.shape[0] or before.shape[2] != after.shape[2]:
        raise SafesubError(f"states: shapes {tuple(states_before.shape)} and {tuple(states_after.shape)} do not match")
    n_layers, D = before.shape[0], before.shape[2]
    r = direction.detach().to(torch.float64) if isinstance(direction, torch.Tensor) else direction
    if not isinstance(r, torch.Tensor) or r.shape not in ((D,), (n_layers, D)):
        raise SafesubError(f"refusal direction: expected shape ({D},) or ({n_layers}, {D})")
    if r.dim() == 1 and r.norm() == 0:
        raise SafesubError("refusal direction: is zero")
    r = r.expand(n_layers, D)
    norms = r.norm(dim=-1, keepdim=True)
    r = r / norms.clamp_min(1e-300)  # a zero per-layer direction: NaN along it (below)
    delta = after.double().mean(1) - before.double().mean(1)  # (layers, D)
    nan = torch.full((n_layers,), float("nan"), dtype=torch.float64)
    along = torch.where(norms[:, 0] > 0, (delta * r).sum(-1), nan)
    sq = delta.pow(2).sum(-1)
    share = torch.where(sq > 0, along.pow(2) / sq.clamp_min(1e-300), nan)
    return pd.DataFrame(dict(layer=range(n_layers), shift_norm=sq.sqrt().numpy(), along=along.numpy(),
                             share=share.numpy(), baseline=[1 / D] * n_layers))
