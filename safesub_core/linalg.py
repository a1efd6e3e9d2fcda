"""Linear algebra shared by the subspace projections and the subspace overlaps (docs/method.md, "Updates and
subspaces" and "Mode subspace overlap").

- `as_matrix(t)`: the matrix a tensor's subspace lives in: 1-D -> (M, 1), 2-D as is, n-D -> (shape[0], -1).
- Energy rank: for singular values s sorted descending and a fraction eta in (0, 1], the smallest k with
  sum_{i<=k} s_i^2 >= eta * sum_i s_i^2 (`energy_rank`, at least 1; `check_energy` validates eta).
  `DEFAULT_ENERGIES` are the fractions the overlaps and the findings report.
- `Basis.of(X)`: the thin SVD's left singular vectors U (d x r) and singular values s of a matrix X (d x n) in
  float64, by whichever route is cheapest at the same accuracy (see its docstring). X may be a `LazyRows`, read a
  block of rows at a time.
- `row_blocks(shape, step)`: slices of whole rows of a tensor, about `step` (default READ_BLOCK) elements each.
- `cosine(dot, a_sq, b_sq)`, and `release_freed_memory()` (glibc's malloc_trim).
"""
from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from safesub_core.errors import SafesubError

DEFAULT_ENERGIES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
READ_BLOCK = 1 << 22  # elements of a tensor read at once (a checkpoint's rows: TensorReader.get; an update's rows)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the matrix the subspace lives in: 1-D -> (M, 1), 2-D as is, n-D -> (shape[0], -1)."""
    return t.reshape(t.shape[0], -1) if t.dim() != 1 else t.reshape(-1, 1)


def check_energy(eta: float) -> float:
    """`eta` as a float when it lies in (0, 1], else a one-line SafesubError."""
    if not (0.0 < float(eta) <= 1.0):
        raise SafesubError(f"energy fraction {eta}: must be in (0, 1]")
    return float(eta)


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


def cosine(dot: float, a_sq: float, b_sq: float) -> float:
    """dot / (sqrt(a_sq) sqrt(b_sq)), 0 when either norm is zero."""
    return float(dot / math.sqrt(a_sq * b_sq)) if a_sq > 0 and b_sq > 0 else 0.0


def row_blocks(shape: tuple[int, ...], step: int | None = None) -> list[slice]:
    """Slices of consecutive rows (along the first dimension) of a tensor of `shape`, about `step` (default
    READ_BLOCK) elements each."""
    rows = max(1, (step or READ_BLOCK) // max(1, math.prod(shape[1:])))
    return [slice(i, min(i + rows, shape[0])) for i in range(0, shape[0], rows)]


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
        forming X's right singular vectors (several times faster than torch.linalg.svd: benchmarks/README.md). A
        tall X (d >= 2n) that is well conditioned (s_n > 1e-6 s_1) takes the one-sided route, a row block at a
        time: R from a blocked QR of X, R = W S V^T, U = X V S^-1 (column i accurate to about eps s_1 / s_i, i.e.
        1e-10 here). Both hold X's float64 copy one block at a time. Otherwise torch.linalg.svd of X in float64,
        whose peak is three matrices of X's size in float64 (X, LAPACK's copy, U).
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
    return ctypes.CDLL("libc.so.6")
