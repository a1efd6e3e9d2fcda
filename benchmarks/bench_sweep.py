"""Sweep speed: one SVD per tensor + cumulative sums, against recomputing each tensor's SVD at every point.

Sweep: 3 subspaces x 2 modes x 5 rank fractions, diagnostics only (energy kept, cosines), on the tiny family.
Baseline (the study's released code): at every point and tensor, torch.svd_lowrank(dA, q=k, niter=2) for Top-K
(q = r for Random-K, then k random columns; a Gaussian matrix's for Random), then the projection P dT.
Target: at least 20x. Two figures for ours: cold (an empty cache: the one-time SVDs and cache writes are inside
the timing) and warm (the SVD bases read back from the disk cache, as on every later run and in the app).
Run: `python benchmarks/bench_sweep.py [--family F]`.
"""
import argparse
import math
import time

from common import machine, tiny_family_path

import torch

from safesub_core.cache import DiskCache
from safesub_core.family import Family
from safesub_core.linalg import as_matrix
from safesub_core.projection import ProjectionConfig
from safesub_core.subspace import SubspaceEngine

SUBSPACES, MODES, FRACS = ("topk", "randomk", "random"), ("parallel", "orthogonal"), (0.01, 0.25, 0.5, 0.75, 0.99)


def ours(family, variant, cache_dir):
    engine = SubspaceEngine.build(family, variant, cache=DiskCache(cache_dir, max_bytes=1 << 34))
    return {(s, m, f): engine.diagnostics(ProjectionConfig(s, m, f)).energy_kept
            for s in SUBSPACES for m in MODES for f in FRACS}


def baseline(family, variant):
    base, start, ft = family.reader("base"), family.reader(family.start), family.reader(variant)
    tensors = []
    for n in start.names():
        wa = start.get(n)
        tensors.append((as_matrix(wa - base.get(n)), as_matrix(ft.get(n) - wa)))
    out = {}
    g = torch.Generator().manual_seed(0)
    for s in SUBSPACES:
        for m in MODES:
            for f in FRACS:
                kept = task = 0.0
                for dA, dT in tensors:
                    r = min(dA.shape)
                    k = max(1, min(r, int(math.floor(f * r + 0.5))))
                    if s == "topk":
                        U = torch.svd_lowrank(dA, q=k, niter=2)[0][:, :k]
                    elif s == "randomk":
                        U = torch.svd_lowrank(dA, q=r, niter=2)[0][:, torch.randperm(r, generator=g)[:k]]
                    else:
                        U = torch.svd_lowrank(torch.randn(dA.shape, generator=g), q=k, niter=2)[0][:, :k]
                    P = U @ (U.T @ dT)
                    X = P if m == "parallel" else dT - P
                    kept += float(X.pow(2).sum())
                    task += float(dT.pow(2).sum())
                out[(s, m, f)] = kept / task
    return out


def main():
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default=None, help="family file (default: the built-in tiny family)")
    ap.add_argument("--variant", default="useful")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    family = Family.from_file(args.family or tiny_family_path())
    print(f"machine: {machine()}")
    print(f"family: {family.name}, variant {args.variant}, {len(family.reader('base').names())} tensors, "
          f"{len(SUBSPACES) * len(MODES) * len(FRACS)} points")
    t_cold, t_warm, t_base = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            a = ours(family, args.variant, tmp)
            t_cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            ours(family, args.variant, tmp)
            t_warm.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = baseline(family, args.variant)
        t_base.append(time.perf_counter() - t)
    top = max(abs(a[k] - b[k]) for k in a if k[0] == "topk")
    cold, warm, bl = (sorted(x)[len(x) // 2] for x in (t_cold, t_warm, t_base))
    print(f"baseline (svd_lowrank per tensor per point):           {bl:.3f} s (median of {args.repeats})")
    print(f"ours, cold cache (one SVD per tensor + 30 points):     {cold:.3f} s  -> {bl / cold:5.1f}x")
    print(f"ours, warm cache (bases from disk + 30 points):        {warm:.3f} s  -> {bl / warm:5.1f}x (target >= 20x)")
    print(f"max |energy kept difference| on Top-K points (svd_lowrank is approximate): {top:.2e}")


if __name__ == "__main__":
    main()
