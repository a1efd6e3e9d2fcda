"""Mode subspace overlap (MSO) between update matrices, per tensor and per transformer block.

For matrices X, Y whose columns live in the same R^d, take Q_X, Q_Y = the top-k left singular vectors, each k
chosen by an energy fraction eta (the smallest k with sum_{i<=k} s_i^2 >= eta * sum_i s_i^2). Then

    MSO = ||Q_X^T Q_Y||_F^2 / min(k_X, k_Y)        in [0, 1],

and two independent uniformly random subspaces give E[MSO] = max(k_X, k_Y) / d (the baseline shown beside it).
One SVD per matrix serves every eta: G = U_X^T U_Y is formed once and its squared entries' 2-D cumulative sum
gives ||Q_X^T Q_Y||_F^2 for every (k_X, k_Y).

Weight space (DESIGN.md §2): per tensor, the study's pairs of updates relative to A (or S):
(harmful - A, useful - A), (harmful - A, base - A), (useful - A, base - A). Per block (our definition):
  write space: left singular vectors of [dO | dDown] (both M = hidden), the residual-stream directions the
               block writes to;
  read space:  right singular vectors of [dQ; dK; dV; dGate; dUp] (all N = hidden), the residual-stream
               directions the block reads from.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import pandas as pd
import torch

from safesub_core.errors import SafesubError

DEFAULT_ENERGIES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def energy_rank(s: torch.Tensor, eta: float) -> int:
    """Smallest k with sum_{i<=k} s_i^2 >= eta * sum_i s_i^2, for singular values `s` sorted descending (>= 1)."""
    check_energy(eta)
    e = s.double().pow(2)
    total = e.sum()
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0)
    k = int(torch.searchsorted(cum, eta * total * (1 - 1e-12)).item()) + 1
    return max(1, min(k, s.numel()))


def check_energy(eta: float) -> float:
    if not (0.0 < float(eta) <= 1.0):
        raise SafesubError(f"energy fraction {eta}: must be in (0, 1]")
    return float(eta)


@dataclass
class LazyRows:
    """A matrix (d x n) read a block of rows at a time (`rows(i, j)` gives rows i:j in float64): what `Basis.of`
    needs of a tall update, so the update is never held whole beside its basis."""

    shape: tuple[int, int]
    rows: Callable[[int, int], torch.Tensor]

    def __getitem__(self, sl: slice) -> torch.Tensor:
        return self.rows(sl.start, min(sl.stop, self.shape[0]))

    def double(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


@dataclass
class Basis:
    """Orthonormal left singular vectors `U` (d x r) of a matrix and its singular values `s` (r,)."""

    U: torch.Tensor
    s: torch.Tensor

    @classmethod
    def of(cls, X: "torch.Tensor | LazyRows") -> "Basis":
        """Thin SVD basis of X (d x n; a tensor or `LazyRows`) in float64: columns of X live in R^d.

        A wide X (n > d) takes the QR route, a block of columns at a time: X^T = Q R (R d x d from a blocked QR),
        so X = R^T Q^T, and R^T = W S Z^T gives X = W S (Q Z)^T: U = W, exactly as accurate as an SVD of X, without
        forming X's right singular vectors (4-8x faster than torch.linalg.svd at 2048 x 8192-19456). A tall X
        (d >= 2n) that is well conditioned (s_n > 1e-6 s_1) takes the one-sided route, a row block at a time: R from
        a blocked QR of X, R = W S V^T, U = X V S^-1 (column i accurate to about eps s_1 / s_i, i.e. 1e-10 here).
        Both hold X's float64 copy one block at a time. Otherwise torch.linalg.svd of X in float64, whose peak is
        three matrices of X's size in float64 (X, LAPACK's copy, U).
        """
        d, n = X.shape
        if 0 < d < n:
            cols = X.double() if isinstance(X, LazyRows) else X
            step = _block(d)
            R = _r_factor(cols[:, j:j + step].T.double() for j in range(0, n, step))
            W, s, _ = torch.linalg.svd(R.T)
            return cls(W, s)
        if n and d >= 2 * n:
            basis = _tall_basis(X)
            if basis is not None:
                return basis
        U, s, _ = torch.linalg.svd(X.double(), full_matrices=False)
        return cls(U, s)

    @property
    def dim(self) -> int:
        return self.U.shape[0]


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Many freed matrices of a few MB each otherwise stay in glibc's heap (its mmap threshold rises to 32 MB after
    the first large free), and the resident size creeps up block after block.
    """
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def _block(n: int) -> int:
    """Rows per block of an (any x n) float64 matrix in a blocked QR: about 64 MB, and at least 4n."""
    return max(4 * n, (1 << 23) // n)


def _r_factor(blocks: Iterable[torch.Tensor]) -> torch.Tensor:
    """R of the QR of the matrix stacked from `blocks` (float64, each (b_i x n)), one block held at a time:
    R_i = R of [R_{i-1}; block_i]. Returns min(sum b_i, n) x n."""
    R = None
    for block in blocks:
        R = torch.linalg.qr(block if R is None else torch.cat([R, block]), mode="r")[1]
    return R


def _tall_basis(X: torch.Tensor, cond: float = 1e-6) -> Basis | None:
    """`Basis.of` a tall X by the one-sided route (None when s_n <= cond * s_1: the full SVD is needed)."""
    d, n = X.shape
    step = _block(n)
    _, s, Vh = torch.linalg.svd(_r_factor(X[i:i + step].double() for i in range(0, d, step)))
    if not s[-1] > cond * s[0]:
        return None
    M = Vh.T / s
    U = torch.empty(d, n, dtype=torch.float64)
    for i in range(0, d, step):
        torch.matmul(X[i:i + step].double(), M, out=U[i:i + step])
    return Basis(U, s)


def overlap_curve(a: Basis, b: Basis, energies: Sequence[float] = DEFAULT_ENERGIES) -> pd.DataFrame:
    """MSO of two bases of R^d at each energy fraction, with k_X, k_Y and the random baseline max(k)/d.

    Returns columns: energy, k_x, k_y, mso, random_baseline.
    """
    if a.dim != b.dim:
        raise SafesubError(f"subspace overlap: bases live in R^{a.dim} and R^{b.dim}, not the same space")
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
                mso=float(cum[kx - 1, ky - 1]) / min(kx, ky),
                random_baseline=max(kx, ky) / a.dim,
            )
        )
    return pd.DataFrame(rows)


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
WRITE_MODULES = ("o", "down")  # M = hidden: columns live in the residual stream
READ_MODULES = ("q", "k", "v", "gate", "up")  # N = hidden: rows read from the residual stream


def weight_overlap(
    family,
    reference: str = "aligned",
    energies: Sequence[float] = DEFAULT_ENERGIES,
    pairs: Sequence[tuple[str, str]] = STUDY_PAIRS,
    progress: Callable[[int, int, str], None] | None = None,
    cache=None,
) -> pd.DataFrame:
    """MSO of the study's update pairs relative to `reference` (A or S), per tensor and per block.

    Updates are X - reference for each checkpoint X named in `pairs` ('base' included). Returns one row per
    (scope, unit, pair, energy) with scope 'tensor' (unit = tensor name, matrices only), 'block-write' or
    'block-read' (unit = block index), and columns k_x, k_y, mso, random_baseline. Tensors stream one block at
    a time, and within a block one side at a time (its updates, then its bases): peak memory is the bases of the
    sides done so far plus one side's updates and one SVD. Cached on disk, keyed by the checkpoints' fingerprints
    and the settings.
    """
    from safesub_core.cache import DiskCache

    for e in energies:
        check_energy(e)
    names = sorted({reference} | {x for p in pairs for x in p})
    parts = dict(checkpoints={n: family.checkpoint(n).fingerprint() for n in names}, reference=reference,
                 energies=[float(e) for e in energies], pairs=[list(p) for p in pairs])
    compute = lambda: _weight_overlap(family, reference, energies, pairs, progress)  # noqa: E731
    return (cache or DiskCache()).get_or_compute("weight_overlap", parts, compute)


def _weight_overlap(family, reference, energies, pairs, progress) -> pd.DataFrame:
    from safesub_core.family import block_index, module_type
    from safesub_core.subspace import as_matrix

    ref = family.reader(reference)
    sides = sorted({x for p in pairs for x in p})
    readers = {s: family.reader(s) for s in sides}
    for r in readers.values():
        ref.check_compatible(r)
    names = [n for n in ref.names() if len(ref.shape(n)) >= 2]
    groups: dict[int | None, list[str]] = {}
    for n in names:
        groups.setdefault(block_index(n), []).append(n)
    short = {"aligned": "A", "safety_tuned": "S"}.get(reference, reference)
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
                bases.setdefault((n, "tensor"), {})[s] = Basis.of(X)
                del X
            del updates
        order = [(n, "tensor") for n in members] + [(unit, scope) for unit, scope, _ in spaces]
        for unit, scope in order:
            for x, y in pairs:
                curve = overlap_curve(bases[unit, scope][x], bases[unit, scope][y], energies)
                curve.insert(0, "pair", f"{x}-{short} vs {y}-{short}")
                curve.insert(0, "unit", str(unit))
                curve.insert(0, "scope", scope)
                curve.insert(0, "reference", reference)
                frames.append(curve)
            del bases[unit, scope]
        release_freed_memory()
    if progress:
        progress(len(groups), len(groups), "done")
    return pd.concat(frames, ignore_index=True)


def _update_rows(side, ref, name: str) -> LazyRows:
    """The update side - ref of tensor `name` as a matrix (shape[0] x rest), read a block of rows at a time: each
    block is filled in float64 from smaller float32 reads (the same values as the float32 update cast)."""
    from safesub_core.family import row_blocks

    d, *rest = ref.shape(name)
    width = math.prod(rest)

    def rows(i: int, j: int) -> torch.Tensor:
        out = torch.empty((j - i, width), dtype=torch.float64)
        for b in row_blocks((j - i, width)):
            a, z = i + b.start, i + b.stop
            out[b] = (side.get_rows(name, a, z) - ref.get_rows(name, a, z)).reshape(-1, width)
        return out

    return LazyRows((d, width), rows)


def overlap_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean MSO and mean random baseline per reference, scope, pair and energy."""
    keys = ["reference", "scope", "pair", "energy"]
    return table.groupby(keys, as_index=False)[["mso", "random_baseline"]].mean()
