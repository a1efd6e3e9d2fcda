"""Alignment subspaces and projections of the fine-tuning update (docs/method.md, "Updates and subspaces",
"Projection modes" and "Diagnostics").

Per tensor (a matrix M x N as stored; 3+-dim tensors reshaped to (shape[0], -1); 1-D tensors as an M x 1 column):
  alignment update dA = W_start - W0,  task update dT = W_FT - W_start,  thin SVD dA = U S V^T, r = min(M, N).
  Rank k: from a fraction rho, k = max(1, round(rho * r)); from an energy eta, the smallest k with
  sum_{i<=k} s_i^2 >= eta * sum s_i^2. Subspaces at the same k:
    topk     U[:, :k]
    randomk  k columns of U chosen uniformly at random (a seeded permutation per tensor)
    random   the first k columns of a seeded Haar-random orthonormal M x r matrix (QR of a Gaussian; a uniformly
             random subspace; `random_basis`)
  P_k = U_k U_k^T, and with X the update kept:
    parallel   X =  P_k dT       W = W_start + alpha * X
    opposite   X = -P_k dT       W = W_start + alpha * X
    orthogonal X = dT - P_k dT   W = W_start + alpha * X
  A 1-D tensor's "subspace" is the line of dA, so P dT = (<dT, dA> / ||dA||^2) dA, and zero when dA = 0 (a zero
  alignment update spans nothing, in any shape).

Compute once, slide forever: keep U (M x r) and C = U^T dT (r x N). Then P_k dT = U[:, :k] C[:k] and
||P_k dT||^2 = sum_{i<=k} ||C_i||^2, so every diagnostic at every k is a cumulative sum and a new point costs one
small matmul per tensor, never a new SVD. A move of the rank alone (same subspace, mode and alpha) from k0 to k is
W += +-alpha U_{k0:k} C_{k0:k} (`TensorProjection.move`): |k - k0| columns per tensor instead of k.
The point (`projection.ProjectionConfig`) and its diagnostics, global sums over tensors of those norms and inner
products (`projection.ProjectionDiagnostics`): `projection`'s docstring.

Exact projections in any dtype: in a model held in bfloat16 or float16, W_start + alpha X rounded to that dtype
loses the update, so there the parameters keep W_start and alpha X goes to a float32 side path
(`precision.ExactUpdates`, exported through `precision.composed_state_dict`): `precision`'s docstring.

Zero updates are never computed on silently: a variant whose task update is zero, or a family whose alignment
update is zero in every tensor (the start model identical to base, by file content or by value), is a one-line
SafesubError from `SubspaceEngine.build` (every number would be measured against nothing). An alignment update
that is zero in only some tensors where the task update is not (e.g. an alignment that froze a layer) is allowed,
and the engine says so in `SubspaceEngine.warnings` (one line each) for the CLI and the pages to show.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Callable

import pandas as pd
import torch

from safesub_core import settings
from safesub_core.cache import DiskCache
from safesub_core.checkpoints import block_index, module_type
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.linalg import as_matrix, cosine, release_freed_memory, row_blocks
from safesub_core.precision import ExactUpdates, coarser
from safesub_core.projection import SUBSPACES, ProjectionConfig, ProjectionDiagnostics

CHUNK_BYTES = 256 << 20  # tensors' bases and coordinates are cached in groups of at most this size
DEFAULT_RESIDENT_BYTES = 4 << 30  # an engine keeps at most this many bytes of matrices resident by default,
MIN_RESIDENT_BYTES = 64 << 20  # and a quarter of one float32 checkpoint, but at least this (groups: an eighth)
RANDOM_BASIS = "qr-gaussian"  # how `random_basis` draws (part of its cache key: a new method, new entries)


def _seed_for(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % (2**63)


def alignment_basis(dA: torch.Tensor, name: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-tensor basis of the alignment update dA (a matrix M x N).

    Returns U (M x r) and s (r,) from torch.linalg.svd (U zero when dA = 0), and `random_basis`'s Ur (M x r) and
    Random-K permutation perm (r,) of draw `seed`.
    """
    M, N = dA.shape
    return _svd_basis(lambda: dA) | random_basis(M, N, name, seed, dA.dtype, dA.device)


def _svd_basis(make_dA: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """U (M x r) and s (r,) of the thin SVD of `make_dA()` (zero when dA = 0); it draws nothing, so every draw
    `seed` shares it (the engine caches it once per family). Peak memory: dA, LAPACK's copy of it and U."""
    dA = make_dA()
    (M, N), like = dA.shape, dict(dtype=dA.dtype, device=dA.device)
    if torch.count_nonzero(dA) == 0:
        r = min(M, N)
        return dict(U=torch.zeros(M, r, **like), s=torch.zeros(r, **like))
    U, s, _ = torch.linalg.svd(dA, full_matrices=False)
    return dict(U=U.contiguous(), s=s.contiguous())


def random_basis(M: int, N: int, name: str = "", seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The random subspaces of draw `seed` for the tensor `name` (M x N, r = min(M, N)).

    Ur (M x r): Q of the QR decomposition of a seeded standard Gaussian M x r, each column's sign set so that R has
    a positive diagonal; Q is then uniformly (Haar) distributed over M x r matrices with orthonormal columns
    (Mezzadri 2007, "How to generate random matrices from the classical compact groups"), so its first k columns
    span a uniformly random k-dimensional subspace for every k. perm (r,): a seeded permutation (Random-K takes
    U's columns in this order). Seeded by (seed, name) only: the same draw on any device and for any variant.
    Peak memory: the Gaussian, Q and LAPACK's workspace, three M x r matrices.
    """
    r = min(M, N)
    g = torch.Generator().manual_seed(_seed_for(name, seed))
    Q, R = torch.linalg.qr(torch.randn(M, r, generator=g, dtype=dtype).to(device))
    d = torch.diagonal(R)
    perm = torch.randperm(r, generator=g)
    return dict(Ur=(Q * torch.where(d < 0, -1.0, 1.0).to(Q.dtype)).contiguous(), perm=perm)


def _update_sums(ft, start, base, name: str, dT: torch.Tensor | None = None,
                 step: int = 1 << 22) -> tuple[float, float, float]:
    """(||dT||^2, ||dA||^2, <dT, dA>) of the tensor `name`, dT = W_FT - W_start and dA = W_start - W0 (readers
    `ft`, `start` and `base`), in float64, `step` elements at a time: only the rows holding them are read from each
    checkpoint, so no tensor is ever held whole. `dT` (float32, the tensor's size), if given, receives dT."""
    shape = start.shape(name)
    numel = math.prod(shape)
    flat = dT.view(-1) if dT is not None else None
    task = align = dot = 0.0
    for i in range(0, numel, step):
        j = min(i + step, numel)
        f, a, b = (reader.get_elements(name, i, j) for reader in (ft, start, base))
        x = f - a
        if flat is not None:
            flat[i:j] = x
        x, y = x.double(), (a - b).double()
        task, align, dot = task + float(x.pow(2).sum()), align + float(y.pow(2).sum()), dot + float((x * y).sum())
    return task, align, dot


@dataclass
class TensorProjection:
    """Everything needed to project one tensor's task update at any rank, mode and scale."""

    name: str
    shape: tuple[int, ...]
    U: torch.Tensor  # (M, r) left singular vectors of dA
    s: torch.Tensor  # (r,)
    Ur: torch.Tensor  # (M, r) random-subspace basis
    perm: torch.Tensor  # (r,) Random-K order
    C: torch.Tensor  # (r, N) = U^T dT
    Cr: torch.Tensor  # (r, N) = Ur^T dT
    dT: torch.Tensor  # (M, N) task update
    task_sq: float  # ||dT||^2
    align_sq: float  # ||dA||^2
    dot_align: float  # <dT, dA>
    cum: dict[str, torch.Tensor] | None = None  # subspace -> (r,) cumulative ||P_k dT||^2, computed on first use

    @property
    def resident(self) -> bool:
        return self.U is not None

    @property
    def r(self) -> int:
        return len(self.s)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.U, self.Ur, self.C, self.Cr, self.dT))

    def cumulative_energy(self, subspace: str) -> torch.Tensor:
        """(r,) float64: ||P_k dT||^2 for k = 1..r in the subspace's order."""
        if self.cum is None:
            rows, rows_r = self.C.double().pow(2).sum(1).cpu(), self.Cr.double().pow(2).sum(1).cpu()
            self.cum = dict(topk=rows.cumsum(0), randomk=rows[self.perm].cumsum(0), random=rows_r.cumsum(0))
        return self.cum[subspace]

    def summary(self) -> "TensorProjection":
        """The same tensor without its matrices (the numbers diagnostics need, a few floats per rank)."""
        for sub in SUBSPACES:
            self.cumulative_energy(sub)
        return replace(self, U=None, Ur=None, C=None, Cr=None, dT=None)

    def _basis(self, cfg: ProjectionConfig, k: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_k, C_k): the rank-k basis (M, k) of the point's subspace and the update's coordinates in it (k, N);
        with `end`, its directions k..end-1 instead (M, end - k), (end - k, N)."""
        lo, hi = (0, k) if end is None else (k, end)
        if cfg.subspace == "random":
            return self.Ur[:, lo:hi], self.Cr[lo:hi]
        idx = slice(lo, hi) if cfg.subspace == "topk" else self.perm[lo:hi].to(self.U.device)
        return self.U[:, idx], self.C[idx]

    def spans_rows(self, cfg: ProjectionConfig) -> bool:
        """Whether the point's full basis spans R^M (M <= N and a nonzero alignment update, or the random one), so
        P_k dT = dT - U_{k:} C_{k:} and a rank past the middle costs r - k columns instead of k."""
        M, r = self.U.shape
        return M == r and (cfg.subspace == "random" or bool(self.s[0] > 0))

    def kept_update(self, cfg: ProjectionConfig, k: int) -> torch.Tensor:
        """X (the update kept at rank k, before alpha) in the tensor's own shape."""
        Uk, Ck = self._basis(cfg, k)
        P = Uk @ Ck
        X = {"parallel": P, "opposite": -P, "orthogonal": self.dT - P}[cfg.mode]
        return X.reshape(self.shape)

    def compose(self, out: torch.Tensor, w_start: torch.Tensor | None, cfg: ProjectionConfig, k: int) -> None:
        """Write W = w_start + alpha * X into `out` (same shape as w_start; `w_start` None: zero, so `out` receives
        the update alpha X alone, as the float32 side path holds it). Where `out` has the bases' dtype and
        device this is one fused multiply-add, out = w_start + a alpha dT + b alpha B C_B, with no temporary of
        the tensor's size: B C_B = U_k C_k, or for k past the middle of a basis that spans R^M its complement
        U_{k:} C_{k:} = dT - U_k C_k (`spans_rows`), whichever has fewer columns. Otherwise X is formed and cast."""
        if out.dtype != self.U.dtype or out.device != self.U.device or not out.is_contiguous():
            update = (cfg.alpha * self.kept_update(cfg, k)).to(device=out.device)
            out.copy_(update if w_start is None else w_start + update.to(out.dtype))
            return
        a, b = {"parallel": (0, 1), "opposite": (0, -1), "orthogonal": (1, -1)}[cfg.mode]  # X = a dT + b U_k C_k
        if 2 * k > self.r and self.spans_rows(cfg):
            B, CB = self._basis(cfg, k, self.r)
            a, b = a + b, -b
        else:
            B, CB = self._basis(cfg, k)
        W = as_matrix(out)
        if w_start is None:
            torch.mul(self.dT, a * cfg.alpha, out=W) if a else W.zero_()
        elif a:
            torch.add(as_matrix(w_start), self.dT, alpha=a * cfg.alpha, out=W)
        else:
            W.copy_(as_matrix(w_start))
        W.addmm_(B, CB, alpha=b * cfg.alpha)

    def move(self, out: torch.Tensor, cfg: ProjectionConfig, k0: int, k: int) -> bool:
        """Move `out`, which holds W at rank k0 of `cfg`'s subspace, mode and alpha, to rank k in place:
        W += s alpha U_{lo:hi} C_{lo:hi} (lo, hi = the two ranks in order; s = the mode's sign of P_k dT in X,
        negated for a lower rank), the same W as `compose` to float rounding. False, and nothing written, where
        that is not cheaper than `compose` (as many columns, or `out` not of the bases' dtype and device)."""
        if out.dtype != self.U.dtype or out.device != self.U.device or not out.is_contiguous():
            return False
        fresh = min(k, self.r - k) if self.spans_rows(cfg) else k
        if abs(k - k0) >= max(fresh, 1):
            return False
        if k != k0:
            B, CB = self._basis(cfg, min(k, k0), max(k, k0))
            sign = (1 if cfg.mode == "parallel" else -1) * (1 if k > k0 else -1)
            as_matrix(out).addmm_(B, CB, alpha=sign * cfg.alpha)
        return True


class SubspaceEngine:
    """The projections of one fine-tuned variant's update onto the family's alignment subspaces.

    Build it once with `SubspaceEngine.build(family, variant)`; then `diagnostics(cfg)`, `curves(...)` and
    `apply(model, reference, cfg)` are cheap at any point: the per-tensor cumulative energies are stacked into
    (T, r_max) tables so a point's diagnostics are a few vector operations over all T tensors.

    Memory: only those tables need to live in the engine. The tensors' U, Ur, C and Cr are disk-cache entries in
    groups of at most CHUNK_BYTES (and an eighth of a checkpoint); the engine keeps as many tensors resident as
    `resident_bytes` allows (all of them for small models; a quarter of a checkpoint's size by default) and
    streams the rest from the cache, one group at a time, with the task update dT read from the checkpoints.
    """

    def __init__(self, family_name: str, variant: str, tensors: list[TensorProjection], seed: int = 0,
                 loader: Callable[[int], TensorProjection] | None = None):
        self.family_name, self.variant, self.tensors, self.seed = family_name, variant, tensors, seed
        self._loader = loader
        f64 = dict(dtype=torch.float64)
        self.names = [t.name for t in tensors]
        self.task = torch.tensor([t.task_sq for t in tensors], **f64)
        self.align = torch.tensor([t.align_sq for t in tensors], **f64)
        self.dot_align = torch.tensor([t.dot_align for t in tensors], **f64)
        self.task_sq = float(self.task.sum())
        if self.task_sq == 0:
            raise SafesubError(f"variant '{variant}': its task update is zero (identical to the start model)")
        unaligned = [t.name for t in tensors if t.align_sq == 0 and t.task_sq > 0]
        self.warnings: list[str] = []  # one line each, for the CLI and the pages to show beside the numbers
        if unaligned:
            self.warnings.append(
                f"variant '{variant}': the alignment update is zero in {len(unaligned)} of {len(tensors)} tensors "
                f"where the task update is not (e.g. {unaligned[0]}): there the alignment subspace is empty, so "
                "Top-K and Random-K keep none of the task update in parallel and opposite modes and all of it in "
                "orthogonal mode")
        self.r = torch.tensor([t.r for t in tensors])
        self.cum = {sub: _stack_padded([t.cumulative_energy(sub) for t in tensors]) for sub in SUBSPACES}
        spectrum = _stack_padded([t.s.double().pow(2).cumsum(0).cpu() for t in tensors])
        self.spectrum = spectrum / spectrum[:, -1:].clamp_min(1e-300)  # cumulative energy share of dA, (T, r_max)

    def tensor(self, i: int) -> TensorProjection:
        """Tensor i with its bases and coordinates (resident, or streamed from the disk cache)."""
        t = self.tensors[i]
        return t if t.resident or self._loader is None else self._loader(i)

    def ranks(self, cfg: ProjectionConfig) -> torch.Tensor:
        """(T,) rank k of every tensor at this point: from rho, max(1, round(rho r)); from eta, by dA's energy."""
        if cfg.energy is not None:
            k = torch.searchsorted(self.spectrum, torch.full((len(self.r), 1), cfg.energy * (1 - 1e-12),
                                                              dtype=torch.float64)).squeeze(1) + 1
            k = torch.where(self.align > 0, k, torch.ones_like(k))
        else:
            k = torch.floor(cfg.rank_fraction * self.r.double() + 0.5).long()
        return torch.minimum(k.clamp_min(1), self.r)

    @classmethod
    def build(
        cls,
        family: Family,
        variant: str,
        seed: int = 0,
        device: str = "cpu",
        cache=None,
        progress: Callable[[int, int, str], None] | None = None,
        resident_bytes: int | None = None,
    ) -> "SubspaceEngine":
        """Stream the base, start and variant tensors one at a time; bases and coordinates go to the disk cache.

        `resident_bytes` bounds what stays in memory (default: `settings.resident_bytes()`, else a quarter of one
        checkpoint in float32, at least 64 MiB and at most 4 GiB). Peak memory is then that, plus one cache group
        (at most CHUNK_BYTES or an eighth of a checkpoint), plus one tensor's working set: for the largest matrix
        (M x N, M >= N) about three of its size (dA, LAPACK's copy of it and U during the exact SVD; the Gaussian, Q
        and LAPACK's workspace while a draw's random basis is made; benchmarks/bench_memory.py). What no draw changes
        (U, s and C) is computed and cached once; a new `seed` adds only its random basis and coordinates. The
        checkpoints are read a block of rows at a time (the sums, dA and the coordinates), so no whole W_FT, W_start
        or W0 is ever held beside them.
        """
        base, start, ft = family.update_readers(variant)
        cache = cache or DiskCache()
        names = start.names()
        numel = {n: math.prod(start.shape(n)) for n in names}
        checkpoint_bytes = 4 * sum(numel.values())
        budget = resident_bytes if resident_bytes is not None else settings.resident_bytes()
        if budget is None:
            budget = min(DEFAULT_RESIDENT_BYTES, max(MIN_RESIDENT_BYTES, checkpoint_bytes // 4))
        chunks = _chunks(names, start.shape, min(CHUNK_BYTES, max(MIN_RESIDENT_BYTES, checkpoint_bytes // 8)))
        basis_parts = dict(base=family.base.fingerprint(), start=family.start_checkpoint.fingerprint())
        if basis_parts["base"] == basis_parts["start"]:
            raise _zero_alignment(family, f"{family.start} has the same files as base")
        # cached apart: what no draw changes (U, s; C) once, what a draw changes (Ur, perm; Cr) per seed
        random_parts = basis_parts | dict(seed=seed, random=RANDOM_BASIS)
        coord_parts = basis_parts | dict(variant=family.checkpoint(variant).fingerprint())
        where = {n: c for c, chunk in enumerate(chunks) for n in chunk}
        memo: dict[int, dict] = {}

        def chunk_entries(c: int) -> dict:
            """The cache entries of chunk c (U, s, Ur, perm, C and Cr of its tensors); the last one read is kept."""
            if c not in memo:
                memo.clear()
                release_freed_memory()
                chunk, tag = chunks[c], dict(tensors=chunks[c])

                def per_tensor(fn: Callable[[str], dict]) -> Callable[[], dict]:
                    return lambda: {f"{n}::{key}": value for n in chunk for key, value in fn(n).items()}

                def svd(n: str) -> dict:
                    return _svd_basis(lambda: as_matrix(start.difference(base, n)).to(device))

                def draw(n: str) -> dict:
                    M, N, _ = _dims(start.shape(n))
                    return random_basis(M, N, n, seed, device=device)

                b = dict(cache.get_or_compute("alignment_basis", basis_parts | tag, per_tensor(svd)))  # a copy
                b |= cache.get_or_compute("random_basis", random_parts | tag, per_tensor(draw))

                def coordinates(basis: str, out: str) -> Callable[[str], dict]:
                    def run(n: str) -> dict:
                        U = b[f"{n}::{basis}"].to(device)
                        M, N = U.shape[0], numel[n] // U.shape[0]
                        C = U.new_zeros(U.shape[1], N)
                        for rows in row_blocks((M, N)):  # dT a block of rows at a time, read from the checkpoints
                            i, j = rows.start, rows.stop
                            dT = (ft.get_rows(n, i, j) - start.get_rows(n, i, j)).reshape(j - i, N).to(device)
                            C += U[rows].T @ dT
                        return {out: C}
                    return run

                b |= cache.get_or_compute("task_coords", coord_parts | tag, per_tensor(coordinates("U", "C")))
                b |= cache.get_or_compute("random_coords", coord_parts | random_parts | tag,
                                          per_tensor(coordinates("Ur", "Cr")))
                memo[c] = b
            return memo[c]

        def load(i: int, keep: bool = True) -> TensorProjection:
            """Tensor i; without `keep`, only its numbers (the sums and cumulative energies, no matrices)."""
            n = names[i]
            shape = tuple(start.shape(n))
            # kept: the task update dT; not kept, nothing is held while the bases are computed or read
            dT = torch.empty(shape) if keep else None
            task_sq, align_sq, dot_align = _update_sums(ft, start, base, n, dT)
            dT = as_matrix(dT).to(device) if keep else None
            b = chunk_entries(where[n])
            t = TensorProjection(
                name=n, shape=shape, U=b[f"{n}::U"].to(device), s=b[f"{n}::s"], Ur=b[f"{n}::Ur"].to(device),
                perm=b[f"{n}::perm"], C=b[f"{n}::C"].to(device), Cr=b[f"{n}::Cr"].to(device), dT=dT,
                task_sq=task_sq, align_sq=align_sq, dot_align=dot_align,
            )
            return t if keep else t.summary()

        tensors, used = [], 0
        for i, n in enumerate(names):
            if progress:
                progress(i, len(names), f"alignment basis and task coordinates: {n}")
            M, N, r = _dims(start.shape(n))
            need = 4 * (2 * M * r + 2 * r * N + M * N)  # U, Ur, C, Cr and dT in float32 (TensorProjection.nbytes)
            keep = used + need <= budget
            used += need if keep else 0
            tensors.append(load(i, keep))  # not kept: the numbers stay, the matrices stream from the cache
        memo.clear()
        if not any(t.align_sq > 0 for t in tensors):
            raise _zero_alignment(family, f"{family.start} equals base in every tensor")
        if progress:
            progress(len(names), len(names), "done")
        return cls(family.name, variant, tensors, seed, loader=load)

    # ---------------------------------------------------------------------------------------- diagnostics
    def parallel_energy(self, subspace: str, k: torch.Tensor) -> torch.Tensor:
        """(T,) ||P_k dT||^2 per tensor at ranks k, by lookup in the cumulative sums."""
        return self.cum[subspace].gather(1, (k - 1).unsqueeze(1)).squeeze(1)

    def diagnostics(self, cfg: ProjectionConfig) -> ProjectionDiagnostics:
        k = self.ranks(cfg)
        par = self.parallel_energy(cfg.subspace, k)
        kept = self.task - par if cfg.mode == "orthogonal" else par
        dot = -par if cfg.mode == "opposite" else kept  # <dT, P dT> = ||P dT||^2; <dT, dT - P dT> = ||dT - P dT||^2
        total_kept = float(kept.sum())

        def table() -> pd.DataFrame:
            df = pd.DataFrame(dict(
                tensor=[t.name for t in self.tensors], module=[module_type(t.name) for t in self.tensors],
                block=pd.array([block_index(t.name) for t in self.tensors], dtype="Int64"),
                rank=k.numpy(), max_rank=self.r.numpy(), task_energy=self.task.numpy(), kept_energy=kept.numpy(),
                removed_energy=(self.task - kept).numpy(), dot_kept=dot.numpy(), align_energy=self.align.numpy(),
                dot_align=self.dot_align.numpy(),
            ))
            df["energy_kept"] = df["kept_energy"] / df["task_energy"].where(df["task_energy"] > 0)
            return df

        return ProjectionDiagnostics(
            config=cfg,
            energy_kept=total_kept / self.task_sq,
            cos_task_kept=cosine(float(dot.sum()), self.task_sq, total_kept),
            cos_task_align=cosine(float(self.dot_align.sum()), self.task_sq, float(self.align.sum())),
            mean_rank_fraction=float((k / self.r).mean()),
            _table=table,
        )

    def curves(self, fractions=None, modes=("parallel", "orthogonal")) -> pd.DataFrame:
        """Energy kept and cos(task, kept) at every rank fraction for each subspace and mode, from one SVD."""
        fractions = fractions if fractions is not None else [i / 100 for i in range(1, 101)]
        rows = []
        for sub in SUBSPACES:
            for rho in fractions:
                for mode in modes:
                    d = self.diagnostics(ProjectionConfig(sub, mode, rho))
                    rows.append(dict(subspace=sub, mode=mode, rank_fraction=rho, energy_kept=d.energy_kept,
                                     cos_task_kept=d.cos_task_kept))
        return pd.DataFrame(rows)

    # ---------------------------------------------------------------------------------------- composition
    @torch.no_grad()
    def apply(self, model: torch.nn.Module, reference: torch.nn.Module, cfg: ProjectionConfig,
              applied: ProjectionConfig | None = None) -> torch.nn.Module:
        """Write W = W_start + alpha * X into `model`'s parameters in place, with W_start read from `reference`.

        `model` and `reference` are two loaded copies of the start model (the reference stays untouched).
        `applied`: the point `model` holds now, written by this engine; where it differs from `cfg` in the rank
        alone, each tensor is moved from its rank there (`TensorProjection.move`, where cheaper) instead of
        composed anew: the same weights to float rounding, which builds up over moves (a caller composes anew
        now and then, and before an export). In a model of a coarser dtype than the bases (bfloat16, float16) the
        parameters keep W_start and the update goes to the float32 side path (`precision.ExactUpdates`): exact, and
        moved the same way; export through `precision.composed_state_dict`.
        """
        params = dict(model.named_parameters())
        ref = dict(reference.named_parameters())
        ranks = self.ranks(cfg).tolist()
        same = applied is not None and (applied.subspace, applied.mode, applied.alpha) == (cfg.subspace, cfg.mode,
                                                                                           cfg.alpha)
        before = self.ranks(applied).tolist() if same else [None] * len(ranks)
        side = None
        for i, (k0, k) in enumerate(zip(before, ranks)):
            t = self.tensor(i)
            if t.name not in params:
                raise SafesubError(f"model: has no parameter {t.name} (is it the family's start model?)")
            p = params[t.name]
            if coarser(p.dtype, t.U.dtype):  # the exact path: p keeps W_start, the side path holds alpha X
                side = side or ExactUpdates.of(model)
                out, fresh = side.delta(t.name, p, ref[t.name])
                if fresh or k0 is None or not t.move(out, cfg, k0, k):
                    t.compose(out, None, cfg, k)
            # the parameter itself: the write moves its version
            elif k0 is None or not t.move(p, cfg, k0, k):
                t.compose(p, ref[t.name], cfg, k)
        return model


def _zero_alignment(family: Family, why: str) -> SafesubError:
    """The error for a family whose alignment update W_start - W0 is zero: nothing to project onto."""
    return SafesubError(f"family '{family.name}': the alignment update is zero ({why}), so there is no alignment "
                        f"subspace to project onto; check the paths of base and {family.start}")


def _chunks(names: list[str], shape_of: Callable[[str], tuple], limit: int) -> list[list[str]]:
    """Consecutive groups of tensor names whose bases and coordinates take at most `limit` bytes (or one tensor)."""
    out, size = [[]], 0
    for n in names:
        M, N, r = _dims(shape_of(n))
        need = 4 * 2 * (M * r + r * N)  # U, Ur (M x r) and C, Cr (r x N) in float32
        if out[-1] and size + need > limit:
            out.append([])
            size = 0
        out[-1].append(n)
        size += need
    return out


def _dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(M, N, r = min(M, N)) of the matrix a tensor of `shape` is taken as (`linalg.as_matrix`)."""
    M = shape[0] if len(shape) > 1 else math.prod(shape)
    N = math.prod(shape) // M
    return M, N, min(M, N)


def _stack_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack 1-D tensors of different lengths into (T, max_len), padding each with its last value."""
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in rows])
