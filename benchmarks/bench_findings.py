"""What a findings run costs on a family, unit by unit, each against how it was computed before (same run), and
the whole run at the issue's settings projected from those units.

Units (each in its own empty disk cache unless said):
- engine: the first draw cold (exact SVD of dA, Top-K coordinates, draw 0's random basis and coordinates), then a
  second draw (seed 1), which reuses what no draw changes; baseline: a second cold build in another empty cache,
  what every draw cost before the seed-free parts were cached apart (plus the SVD of a Gaussian, now a QR).
- a generated point (24 new tokens): the useful variant on the utility set only, at the CPU's generation batch
  (`compute.CPU_BATCH`), and the harmful variant on the harmful set only: what findings generate now
  (`power.READS`); baseline: the same useful point on all three sets at batch 16, as before.
- live read-outs of a point: the first wave (`--live-waves 1`) against every wave, after one warm-up point (the
  start model's logits, computed once a session).
Projection (printed, not measured): the issue's settings, 100 prompts a set, rank fractions 0.01-0.99 (five), both
modes, 3 draws, rank- and energy-matched controls. Per variant 70 rank-matched points plus its energy-matched ones
(counted on the useful variant's engines, assumed alike for the others), each generated on its READS sets; the
checkpoints the tables show (base, aligned, safety-tuned, the variants) on all three sets; live read-outs on one wave; engines; the activation experiment (100 prompts a set,
200 + 200 resamples) measured on the start model, times four models.

Run: `OMP_NUM_THREADS=1 python benchmarks/bench_findings.py [--family cache/families/smol/family.yaml]
[--prompts 100]` (default family: the built-in tiny one).
"""
import argparse
import os
import tempfile
import time

from common import machine, tiny_family_path

from safesub_core import compute
from safesub_core.activation_study import StudyActivationConfig, run_study, study_session
from safesub_core.cache import DiskCache
from safesub_core.family import Family
from safesub_core.findings import power
from safesub_core.findings.experiments import eval_sets, table_checkpoints
from safesub_core.projection import ProjectionConfig
from safesub_core.session import FamilySession

TOKENS = 24
ISSUE = dict(rhos=(0.01, 0.25, 0.5, 0.75, 0.99), modes=("parallel", "orthogonal"), seeds=3)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def session(family: Family, prompts: int, batch: int | None = None) -> FamilySession:
    s = FamilySession(family, sets=eval_sets(family, prompts), cache=DiskCache(tempfile.mkdtemp(prefix="bench-")))
    if batch is not None:  # the session's remembered batch size: what the first call starts from
        s._batch_sizes["generation"] = batch
    return s


def energy_matched_points(s: FamilySession, variant: str) -> int:
    """Distinct control points the energy-matched tests add at the issue's settings (beyond the rank grid)."""
    grid = set(ISSUE["rhos"])
    extra = set()
    for seed in range(ISSUE["seeds"]):
        for sub in ("randomk", "random"):
            for mode in ISSUE["modes"]:
                for rho in ISSUE["rhos"]:
                    m = power.session_match(s, variant, sub, mode, rho, seed)
                    if m.rho not in grid:
                        extra.add((seed, sub, mode, m.rho))
        s.drop_engine(variant)
    return len(extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default=None)
    ap.add_argument("--prompts", type=int, default=100)
    args = ap.parse_args()
    family = Family.from_file(args.family or tiny_family_path())
    print(machine())
    print(f"family {family.name} ({family.root}), {args.prompts} prompts a set, {TOKENS} new tokens")

    new = session(family, args.prompts)
    sizes = {r: len(getattr(new.sets, r)) for r in power.ROLES}
    print("sets:", sizes)
    _, cold = timed(lambda: new.engine("useful"))
    _, draw = timed(lambda: new.engine("useful", seed=1))
    new.drop_engine("useful")
    _, cold2 = timed(lambda: session(family, args.prompts).engine("useful", seed=1))
    print(f"engine: cold {cold:.1f} s; a second draw {draw:.1f} s against a cold build of it {cold2:.1f} s "
          f"= {cold2 / draw:.2f}x")

    pc = ProjectionConfig("topk", "parallel", 0.5)
    _, t_util = timed(lambda: new.generation_scores("useful", pc, TOKENS, roles=("utility",)))
    _, t_harm = timed(lambda: new.generation_scores("harmful", pc, TOKENS, roles=("harmful",)))
    old = session(family, args.prompts, batch=16)
    _, t_old = timed(lambda: old.generation_scores("useful", pc, TOKENS))
    print(f"generated point: useful on utility {t_util:.1f} s, harmful on harmful {t_harm:.1f} s (batch "
          f"{compute.CPU_BATCH['generation']}); before, useful on all three sets at batch 16 {t_old:.1f} s "
          f"= {t_old / t_util:.2f}x the useful point")

    new.point_scores("useful", ProjectionConfig("topk", "parallel", 0.25), waves=1)  # warm-up: the start's logits
    _, t_one = timed(lambda: new.point_scores("useful", ProjectionConfig("topk", "parallel", 0.99), waves=1))
    _, t_all = timed(lambda: new.point_scores("useful", ProjectionConfig("topk", "parallel", 0.75),
                                              waves=new.waves.count))
    print(f"live read-outs of a point: first wave {t_one:.1f} s, every wave ({new.waves.count}) {t_all:.1f} s "
          f"= {t_all / t_one:.1f}x")

    energy, t_match = timed(lambda: energy_matched_points(new, "useful"))
    print(f"energy matching adds {energy} points a variant (counted on useful's engines in {t_match:.0f} s)")

    per_prompt = {"utility": t_util / sizes["utility"], "harmful": t_harm / sizes["harmful"]}
    per_prompt["edgy"] = per_prompt["harmful"]  # refusal scoring, like the harmful set (not measured apart)
    points = len(ISSUE["modes"]) * len(ISSUE["rhos"]) * (1 + 2 * ISSUE["seeds"]) + energy
    variants = [v for v in ("useful", "harmful", "contaminated") if v in family.variants]
    gen = sum(points * sum(per_prompt[r] * sizes[r] for r in power.READS[v]) for v in variants)
    shown = table_checkpoints(family, variants)
    refs = len(shown) * sum(per_prompt[r] * sizes[r] for r in power.ROLES)
    live = (len(variants) * 3 * len(ISSUE["modes"]) * len(ISSUE["rhos"]) + len(shown)) * t_one
    engines = len(variants) * (cold + ISSUE["seeds"] * draw)
    scfg = StudyActivationConfig()
    _, e4_one = timed(lambda: run_study(study_session(family, scfg, cache=DiskCache(tempfile.mkdtemp(prefix="bench-"))),
                                        [family.start], scfg))
    print(f"activation experiment on {family.start}: {e4_one:.0f} s")
    e4 = 4 * e4_one
    total = gen + refs + live + engines + e4
    threads = os.environ["OMP_NUM_THREADS"]
    print(f"projection at the issue's settings, {threads} thread(s): generation {gen / 60:.0f} min ({points} points a "
          f"variant), checkpoints {refs / 60:.0f} min, live read-outs (one wave) {live / 60:.0f} min, engines "
          f"{engines / 60:.0f} min, activation experiment {e4 / 60:.0f} min: {total / 3600:.2f} h "
          f"(weight overlap not counted)")


if __name__ == "__main__":
    main()
