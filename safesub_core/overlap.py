"""Mode subspace overlap (MSO) between update matrices, per tensor and per transformer block.

For matrices X, Y whose columns live in the same R^d, take Q_X, Q_Y = the top-k left singular vectors, each k
chosen by an energy fraction eta (the smallest k with sum_{i<=k} s_i^2 >= eta * sum_i s_i^2; `linalg.energy_rank`,
the bases from `linalg.Basis.of`). Then

    MSO = ||Q_X^T Q_Y||_F^2 / min(k_X, k_Y)        in [0, 1],

and two independent uniformly random subspaces give E[MSO] = max(k_X, k_Y) / d (the baseline shown beside it).
One SVD per matrix serves every eta: G = U_X^T U_Y is formed once and its squared entries' 2-D cumulative sum
gives ||Q_X^T Q_Y||_F^2 for every (k_X, k_Y).

Weight space (docs/method.md, "Mode subspace overlap"): per tensor, the study's pairs of updates relative to A (or S):
(harmful - A, useful - A), (harmful - A, base - A), (useful - A, base - A). Relative to a reference R, every side
but base must be fine-tuned from R (`Family.parent`): two variants fine-tuned from A, measured from S, both carry
the offset A - S, which inflates their overlap by construction (two independent rank-8 updates with MSO 0.06
reach about 0.5 once an offset of equal norm is added). So the S pairs use the family's S-started variants
(`Family.fine_tunes_of`, `reference_pairs`), and a pair with a side fine-tuned from elsewhere is a one-line
SafesubError; a family without S-started variants has no S panel (`no_pairs_message`). Per block (our definition):
  write space: left singular vectors of [dO | dDown] (both M = hidden), the residual-stream directions the
               block writes to;
  read space:  right singular vectors of [dQ; dK; dV; dGate; dUp] (all N = hidden), the residual-stream
               directions the block reads from.

Zero updates: a zero matrix spans nothing, so the MSO with it is undefined: `overlap_curve` leaves it NaN (k and
the baseline are still given). In `weight_overlap`, a pair side whose update is zero everywhere (the reference
itself, a checkpoint with the reference's files, or one equal to it in every tensor) is a one-line SafesubError;
a side whose update is zero in some units only (a LoRA variant's untouched tensors, a frozen layer) leaves those
rows' MSO NaN (out of `overlap_summary`'s means), and `overlap_warnings(table)` says so in one line per pair for
the CLI and the pages to show.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import pandas as pd
import torch

from safesub_core.cache import DiskCache
from safesub_core.checkpoints import block_index, module_type
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.linalg import (DEFAULT_ENERGIES, Basis, LazyRows, as_matrix, check_energy, energy_rank,
                                 release_freed_memory, row_blocks)

OVERLAP_VERSION = 2  # in the cache key: bump when the table computed from the same inputs changes (2: NaN MSO)


def overlap_curve(a: Basis, b: Basis, energies: Sequence[float] = DEFAULT_ENERGIES) -> pd.DataFrame:
    """MSO of two bases of R^d at each energy fraction, with k_X, k_Y and the random baseline max(k)/d.

    Returns columns: energy, k_x, k_y, mso, random_baseline; mso is NaN when either matrix is zero (it spans
    nothing).
    """
    if a.dim != b.dim:
        raise SafesubError(f"subspace overlap: bases live in R^{a.dim} and R^{b.dim}, not the same space")
    spans_nothing = _is_zero(a) or _is_zero(b)
    G2 = (a.U.T @ b.U).pow(2)
    cum = G2.cumsum(0).cumsum(1)
    rows = []
    for eta in energies:
        kx, ky = energy_rank(a.s, eta), energy_rank(b.s, eta)
        rows.append(
            dict(
                energy=float(eta),
                k_x=kx,
                k_y=ky,
                mso=math.nan if spans_nothing else float(cum[kx - 1, ky - 1]) / min(kx, ky),
                random_baseline=max(kx, ky) / a.dim,
            )
        )
    return pd.DataFrame(rows)


def _is_zero(basis: Basis) -> bool:
    """The basis of a zero matrix (no singular value above zero)."""
    return basis.s.numel() == 0 or float(basis.s.max()) <= 0.0


def subspace_overlap(X: torch.Tensor, Y: torch.Tensor, energy: float = 0.9) -> float:
    """MSO of the energy-`energy` left singular subspaces of X (d x n) and Y (d x m)."""
    return float(overlap_curve(Basis.of(X), Basis.of(Y), [energy])["mso"].iloc[0])


def random_subspace_overlap(d: int, kx: int, ky: int, seed: int = 0) -> float:
    """MSO of two uniformly random subspaces of R^d of dims kx, ky (seeded); its mean is max(kx, ky) / d."""
    g = torch.Generator().manual_seed(seed)
    qx, _ = torch.linalg.qr(torch.randn(d, kx, generator=g, dtype=torch.float64))
    qy, _ = torch.linalg.qr(torch.randn(d, ky, generator=g, dtype=torch.float64))
    return float((qx.T @ qy).pow(2).sum()) / min(kx, ky)


# ------------------------------------------------------------------------------------------- weight space

STUDY_PAIRS = (("harmful", "useful"), ("harmful", "base"), ("useful", "base"))
SHORT = {"aligned": "A", "safety_tuned": "S"}


def reference_pairs(family: Family, reference: str) -> list[tuple[str, str]]:
    """The study's pairs (STUDY_PAIRS, by task) relative to `reference` among the variants fine-tuned from it (and
    base), as checkpoint names; empty when the family has none (`no_pairs_message` says why)."""
    tasks = family.fine_tunes_of(reference) | {"base": "base"}
    return [(tasks[x], tasks[y]) for x, y in STUDY_PAIRS if x in tasks and y in tasks]


def seed_pairs(family: Family, reference: str) -> list[tuple[str, str]]:
    """Same-task pairs of variants fine-tuned from `reference` with different seeds (X and X_seed<k>: the ceiling a
    cross-task overlap is read against), and the cross-task pair of the second seeds (harmful_seed1 vs
    useful_seed1: how much the study's pair moves between seeds)."""
    names = set(family.fine_tunes_of(reference).values())
    out = [(n, m) for n in sorted(names) for m in sorted(names)
           if m.startswith(f"{n}_seed") and m[len(n) + 5:].isdigit()]
    again = dict(out)
    if "harmful" in again and "useful" in again:
        out.append((again["harmful"], again["useful"]))
    return out


def no_pairs_message(reference: str) -> str:
    """What is shown instead of the panels of a reference no variant was fine-tuned from."""
    role = {"aligned": "aligned", "safety_tuned": "safety-tuned"}.get(reference, reference)
    return (f"{SHORT.get(reference, reference)} panels need variants fine-tuned from the {role} model (a variant "
            f"fine-tuned from another model carries that model's offset from {reference}, which inflates every "
            f"overlap); this family has none")


def pair_label(family: Family, x: str, y: str, reference: str) -> str:
    """'harmful-S vs useful-S': each side by its task (a safety variant harmful_s is 'harmful') and the reference."""
    short = SHORT.get(reference, reference)
    task = {n: t for t, n in family.fine_tunes_of(reference).items()}
    return f"{task.get(x, x)}-{short} vs {task.get(y, y)}-{short}"
WRITE_MODULES = ("o", "down")  # M = hidden: columns live in the residual stream
READ_MODULES = ("q", "k", "v", "gate", "up")  # N = hidden: rows read from the residual stream


def weight_overlap(
    family: Family,
    reference: str = "aligned",
    energies: Sequence[float] = DEFAULT_ENERGIES,
    pairs: Sequence[tuple[str, str]] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    cache: DiskCache | None = None,
) -> pd.DataFrame:
    """MSO of the study's update pairs relative to `reference` (A or S), per tensor and per block.

    Updates are X - reference for each checkpoint X named in `pairs` ('base' included; default: the study's pairs
    among the variants fine-tuned from `reference`, `reference_pairs`). Every side but base must be fine-tuned from
    `reference` (else a one-line SafesubError: the pair would share an offset). Returns one row per
    (scope, unit, pair, energy) with scope 'tensor' (unit = tensor name, matrices only), 'block-write' or
    'block-read' (unit = block index), and columns k_x, k_y, mso, random_baseline. Tensors stream one block at
    a time, and within a block one side at a time (its updates, then its bases): peak memory is the bases of the
    sides done so far plus one side's updates and one SVD. Cached on disk, keyed by the checkpoints' fingerprints
    and the settings.
    """
    for e in energies:
        check_energy(e)
    family.checkpoint(reference)
    if pairs is None:
        pairs = reference_pairs(family, reference)
        if not pairs:
            raise SafesubError(no_pairs_message(reference))
    for x, y in pairs:
        for side in (x, y):
            parent = family.parent(side)
            if side != "base" and side != reference and parent != reference:
                raise SafesubError(
                    f"overlap pair {x}:{y} relative to {reference}: {side} is fine-tuned from {parent}, not "
                    f"{reference}, so the update {side} - {reference} carries the offset {parent} - {reference} "
                    f"that every such pair shares; {no_pairs_message(reference).split(' (')[0]}")
    names = sorted({reference} | {x for p in pairs for x in p})
    prints = {n: family.checkpoint(n).fingerprint(family) for n in names}
    for x, y in pairs:
        for side in (x, y):
            if side == reference or prints[side] == prints[reference]:
                why = "it is the reference" if side == reference else f"it has the same files as {reference}"
                raise _zero_side(x, y, side, reference, why)
    parts = dict(checkpoints=prints, reference=reference, energies=[float(e) for e in energies],
                 pairs=[list(p) for p in pairs], version=OVERLAP_VERSION)
    compute = lambda: _weight_overlap(family, reference, energies, pairs, progress)  # noqa: E731
    return (cache or DiskCache()).get_or_compute("weight_overlap", parts, compute)


def _zero_side(x: str, y: str, side: str, reference: str, why: str) -> SafesubError:
    return SafesubError(f"overlap pair {x}:{y} relative to {reference}: the update {side} - {reference} is zero "
                        f"({why}), so its overlap would be measured against nothing; pair checkpoints that differ "
                        f"from {reference}")


def _weight_overlap(family: Family, reference, energies, pairs, progress) -> pd.DataFrame:
    ref = family.reader(reference)
    sides = sorted({x for p in pairs for x in p})
    readers = {s: family.reader(s) for s in sides}
    for r in readers.values():
        ref.check_compatible(r)
    names = [n for n in ref.names() if len(ref.shape(n)) >= 2]
    groups: dict[int | None, list[str]] = {}
    for n in names:
        groups.setdefault(block_index(n), []).append(n)
    moved = dict.fromkeys(sides, False)  # whether the side's update is nonzero in some tensor
    frames = []
    for i, (block, members) in enumerate(groups.items()):
        if progress:
            progress(i, len(groups), f"overlap of block {block}")
        # the block's spaces: (unit, scope, the update matrix of one side from that side's updates by tensor)
        spaces = []
        if block is not None:
            by_type = {module_type(n): n for n in members}
            write = [by_type[m] for m in WRITE_MODULES if m in by_type]
            read = [by_type[m] for m in READ_MODULES if m in by_type]
            if write:
                spaces.append((block, "block-write", lambda u, w=write: torch.cat([u[n] for n in w], 1)))
            if read:
                spaces.append((block, "block-read", lambda u, r=read: torch.cat([u[n] for n in r], 0).T))
        # one side at a time: its updates, then its bases (each update dropped after its last use), so only the
        # bases of earlier sides and one side's updates are ever held
        bases: dict[tuple, dict[str, Basis]] = {}
        for s in sides:
            # updates the block's spaces concatenate are formed whole; a tensor of its own is read by rows
            in_spaces = set(write + read) if block is not None else set()
            updates = {n: as_matrix(readers[s].difference(ref, n)) for n in members if n in in_spaces}
            for unit, scope, matrix in spaces:
                bases.setdefault((unit, scope), {})[s] = Basis.of(matrix(updates))
            for n in members:
                X = updates.pop(n) if n in updates else _update_rows(readers[s], ref, n)
                basis = bases.setdefault((n, "tensor"), {})[s] = Basis.of(X)
                moved[s] = moved[s] or not _is_zero(basis)
                del X, basis
            del updates
        order = [(n, "tensor") for n in members] + [(unit, scope) for unit, scope, _ in spaces]
        for unit, scope in order:
            for x, y in pairs:
                curve = overlap_curve(bases[unit, scope][x], bases[unit, scope][y], energies)
                curve.insert(0, "pair", pair_label(family, x, y, reference))
                curve.insert(0, "unit", str(unit))
                curve.insert(0, "scope", scope)
                curve.insert(0, "reference", reference)
                frames.append(curve)
            del bases[unit, scope]
        release_freed_memory()
    for x, y in pairs:
        for side in (x, y):
            if not moved[side]:
                raise _zero_side(x, y, side, reference, f"{side} equals {reference} in every tensor")
    if progress:
        progress(len(groups), len(groups), "done")
    return pd.concat(frames, ignore_index=True)


def _update_rows(side, ref, name: str) -> LazyRows:
    """The update side - ref of tensor `name` as a matrix (shape[0] x rest), read a block of rows at a time: each
    block is filled in float64 from smaller float32 reads (the same values as the float32 update cast)."""
    d, *rest = ref.shape(name)
    width = math.prod(rest)

    def rows(i: int, j: int) -> torch.Tensor:
        out = torch.empty((j - i, width), dtype=torch.float64)
        for b in row_blocks((j - i, width)):
            a, z = i + b.start, i + b.stop
            out[b] = (side.get_rows(name, a, z) - ref.get_rows(name, a, z)).reshape(-1, width)
        return out

    return LazyRows((d, width), rows)


def overlap_warnings(table: pd.DataFrame) -> list[str]:
    """One line per (reference, pair) of a `weight_overlap` table whose MSO is NaN in some units because a side's
    update is zero there: how many units, and one of them."""
    out = []
    for (reference, pair), rows in table.groupby(["reference", "pair"], sort=False):
        empty = rows.loc[rows["mso"].isna(), ["scope", "unit"]].drop_duplicates()
        if len(empty):
            units = rows[["scope", "unit"]].drop_duplicates()
            first = empty.iloc[0]
            out.append(f"overlap vs {reference}, pair {pair}: a side's update is zero in {len(empty)} of {len(units)} "
                       f"units (e.g. {first['scope']} {first['unit']}), where the MSO is empty (NaN) and left out of "
                       "the means")
    return out


def overlap_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean MSO and mean random baseline per reference, scope, pair and energy."""
    keys = ["reference", "scope", "pair", "energy"]
    return table.groupby(keys, as_index=False)[["mso", "random_baseline"]].mean()
