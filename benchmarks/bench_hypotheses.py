"""Benchmark: a slider move of a competing method against a rank move of the study's projection, same session.

For one variant of a family, with the app's live prompts per set on a CPU (`compute.live_prompts`; a fresh cache folder, or `--cache` where the subspaces, the refusal direction and the
SafeLoRA similarities exist but no scores), the forward-pass read-outs of the first wave (`point_scores(...,
waves=1, decoded=False)`, what the page shows first) at `--moves` new knob values per method, timed per move:
    baseline        the Subspaces page's move: Top-K, parallel, to a rank fraction never scored before
    ablation        refusal ablation at a new strength (hooks on the variant)
    orthogonalisation   the same written into the variant's weights (and written back after)
    safelora        SafeLoRA at a new tau, one slider step (0.05) on (the tensors whose status changes rewritten)
Printed: the median per method and its ratio to the baseline's median measured in the same run; the target is a
method move within the Subspaces page's first-wave latency (ratio <= 1.0, give or take the noise of two shared
cores), with the thread count and machine. The one-off costs (direction selection, similarities, engine) are
printed apart and not part of the moves.

    OMP_NUM_THREADS=1 python benchmarks/bench_hypotheses.py [--family PATH] [--variant harmful] [--moves 6]
                                                            [--cache DIR]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

from common import machine, tiny_family_path  # noqa: F401 (sets the threads first)

from safesub_core.cache import DiskCache
from safesub_core.compute import live_prompts
from safesub_core.family import Family
from safesub_core.hypotheses import MethodPoint
from safesub_core.projection import ProjectionConfig
from safesub_core.session import FamilySession


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default=None)
    ap.add_argument("--variant", default="harmful")
    ap.add_argument("--moves", type=int, default=6)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    path = args.family or str(tiny_family_path())
    cache = DiskCache(args.cache or tempfile.mkdtemp(prefix="bench_hyp_"))
    family = Family.from_file(path)
    S = FamilySession(family, cache=cache, batch=live_prompts(family, "cpu"))  # the app's first wave on a CPU
    v = args.variant
    print(f"machine: {machine()}\nfamily: {path}, variant {v}, first wave of {S.waves.size} prompts a role")
    t = time.perf_counter()
    S.point_scores(v, ProjectionConfig(rank_fraction=0.5), waves=1, decoded=False)  # engine, reference logits
    print(f"one-off: engine and first point {time.perf_counter() - t:.1f} s", end="")
    t = time.perf_counter()
    sel = S.refusal_selection()
    print(f"; refusal direction {time.perf_counter() - t:.1f} s (layer {sel.layer}, position {sel.position})", end="")
    t = time.perf_counter()
    S.safelora_table(v)
    print(f"; SafeLoRA similarities {time.perf_counter() - t:.1f} s")
    n = args.moves
    j = round((time.time() % 1) * 0.01, 4)  # a jitter, so a rerun on the same cache scores new points again
    plans = {
        "baseline (Top-K rank)": [ProjectionConfig(rank_fraction=0.30 + 0.03 * i + j) for i in range(n)],
        "ablation": [MethodPoint("ablation", 0.2 + 0.13 * i + j) for i in range(n)],
        "orthogonalisation": [MethodPoint("orthogonalisation", 0.21 + 0.13 * i + j) for i in range(n)],
        "safelora": [MethodPoint("safelora", 0.30 + 0.05 * i + j) for i in range(n)],  # the tau slider's step
    }
    for points in plans.values():  # each method's cold path once (first hooks, first plan), outside the timings
        S.point_scores(v, replace(points[0], **_nudge(points[0])), waves=1, decoded=False)
    medians = {}
    for name, points in plans.items():
        times = []
        for p in points:
            t = time.perf_counter()
            S.point_scores(v, p, waves=1, decoded=False)
            times.append(time.perf_counter() - t)
        medians[name] = statistics.median(times)
        print(f"{name:>24}: median {medians[name] * 1000:7.0f} ms over {len(times)} moves "
              f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f})")
    base = medians["baseline (Top-K rank)"]
    for name, m in medians.items():
        print(f"{name:>24}: {m / base:5.2f}x the Subspaces move (target <= 1.0x)")


def _nudge(point) -> dict:
    """A knob value next to the point's, for the warm-up move."""
    if isinstance(point, ProjectionConfig):
        return {"rank_fraction": point.rank_fraction - 0.01}
    return {"value": point.value - 0.01 if point.method != "safelora" else min(1.0, point.value + 0.01)}


if __name__ == "__main__":
    main()
