"""What a findings run costs on a family, unit by unit, each against how it was computed before (same run), and
the whole run at the issue's settings projected from those units.

Units (each in its own empty disk cache unless said):
- engine: the first draw cold (exact SVD of dA, Top-K coordinates, draw 0's random basis and coordinates), then a
  second draw (seed 1), which reuses what no draw changes; baseline: a second cold build in another empty cache,
  what every draw cost before the seed-free parts were cached apart (plus the SVD of a Gaussian, now a QR).
- a generated point (24 new tokens): the useful variant on the utility set and the harmful variant on the harmful
  set (`power.READS`), at the CPU's generation batch (`compute.CPU_BATCH`), without the forward-pass column (refusal
  log-odds, answer NLL) that no finding reads: what findings generate now (`power.generation_point`); baseline: the
  same point with it, as before.
- live read-outs of a point: the first wave (`--live-waves 1`) against every wave, after one warm-up point (the
  start model's logits, computed once a session).
- energy matching: the points off the rank grid that the energy-matched tests add, now (Top-K moved to the
  controls' mean energy) and before (each control draw moved to Top-K's energy), counted on the useful variant's
  engines per mode and assumed alike for the others.
Projection (printed, not measured): the issue's settings, 100 prompts a set, rank fractions 0.01-0.99 (five), 3
draws, rank- and energy-matched controls; per variant 35 rank-matched points a mode in its modes (`power.MODES`: E2's
orthogonal mode on the contaminated variant only) plus its energy-matched ones, each generated on its READS sets;
the checkpoints the tables show (base, aligned, safety-tuned, the variants) on all three sets; live read-outs on one
wave; engines; the activation experiment (100 prompts a set, 200 + 200 resamples) measured on the start model, times
four models. The baseline projection: the forward-pass column, both modes for every variant, controls moved.

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
from safesub_core.findings import energy, power
from safesub_core.findings.experiments import eval_sets, table_checkpoints
from safesub_core.projection import ProjectionConfig
from safesub_core.session import FamilySession

TOKENS = 24
ISSUE = dict(rhos=(0.01, 0.25, 0.5, 0.75, 0.99), modes=("parallel", "orthogonal"), seeds=3)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def session(family: Family, prompts: int) -> FamilySession:
    return FamilySession(family, sets=eval_sets(family, prompts), cache=DiskCache(tempfile.mkdtemp(prefix="bench-")))


def energy_matched_points(s: FamilySession, variant: str) -> dict[str, tuple[int, int]]:
    """mode -> (now, before): distinct points the energy-matched tests add beyond the rank grid at the issue's
    settings. Now Top-K moves to the controls' mean energy (`energy.match_energy`: at most one Top-K point per rank
    fraction and control); before, each control draw moved to Top-K's energy (one point per draw)."""
    grid, controls, seeds = set(ISSUE["rhos"]), ("randomk", "random"), range(ISSUE["seeds"])
    now, before, energies = {m: set() for m in ISSUE["modes"]}, {m: set() for m in ISSUE["modes"]}, {}
    for seed in seeds:
        eng = s.engine(variant, seed=seed)
        at = lambda sub, mode, r: float(eng.diagnostics(ProjectionConfig(sub, mode, r)).energy_kept)  # noqa: E731
        for sub in controls:
            for mode in ISSUE["modes"]:
                for rho in ISSUE["rhos"]:
                    energies[(sub, mode, rho, seed)] = at(sub, mode, rho)
                    r, _ = energy.closest_on_grid(lambda x: at(sub, mode, x), at("topk", mode, rho),
                                                 increasing=mode != "orthogonal")
                    if r not in grid:
                        before[mode].add((seed, sub, r))
        s.drop_engine(variant)
    top = s.engine(variant)
    for sub in controls:
        for mode in ISSUE["modes"]:
            for rho in ISSUE["rhos"]:
                m = energy.match_energy(top, [energies[(sub, mode, rho, seed)] for seed in seeds], sub, mode, rho)
                if m.rho_topk not in grid:
                    now[mode].add(m.rho_topk)
    s.drop_engine(variant)
    return {m: (len(now[m]), len(before[m])) for m in ISSUE["modes"]}


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
    t_gen = {}
    for variant, role in (("useful", "utility"), ("harmful", "harmful")):
        new.projected(variant, pc)  # the engine and the applied point first: both timings are the scoring alone
        for forward in (True, False):
            t_gen[(role, forward)] = timed(lambda: new.generation_scores(variant, pc, TOKENS, roles=(role,),
                                                                         forward_scores=forward))[1]
        print(f"generated point, {variant} on its {role} set (batch {compute.CPU_BATCH['generation']}): "
              f"{t_gen[(role, False)]:.1f} s without the forward-pass column findings never read; with it (before) "
              f"{t_gen[(role, True)]:.1f} s = {t_gen[(role, True)] / t_gen[(role, False)]:.2f}x")

    new.point_scores("useful", ProjectionConfig("topk", "parallel", 0.25), waves=1)  # warm-up: the start's logits
    _, t_one = timed(lambda: new.point_scores("useful", ProjectionConfig("topk", "parallel", 0.99), waves=1))
    _, t_all = timed(lambda: new.point_scores("useful", ProjectionConfig("topk", "parallel", 0.75),
                                              waves=new.waves.count))
    print(f"live read-outs of a point: first wave {t_one:.1f} s, every wave ({new.waves.count}) {t_all:.1f} s "
          f"= {t_all / t_one:.1f}x")

    energy, t_match = timed(lambda: energy_matched_points(new, "useful"))
    print(f"energy matching adds, per mode (now, before): {energy} points a variant (counted on useful's engines in "
          f"{t_match:.0f} s)")

    variants = [v for v in ("useful", "harmful", "contaminated") if v in family.variants]
    shown = table_checkpoints(family, variants)
    cfg = power.PowerConfig()

    def generation(forward: bool, modes_of, matched: int) -> tuple[float, dict]:
        """Seconds to generate every variant's points, and the points a variant."""
        per_prompt = {r: t_gen[(r, forward)] / sizes[r] for r in ("utility", "harmful")}
        per_prompt["edgy"] = per_prompt["harmful"]  # refusal scoring, like the harmful set (not measured apart)
        secs, counts = 0.0, {}
        for v in variants:
            counts[v] = sum(len(ISSUE["rhos"]) * (1 + 2 * ISSUE["seeds"]) + energy[m][matched] for m in modes_of(v))
            secs += counts[v] * sum(per_prompt[r] * sizes[r] for r in cfg.roles(v))
        refs = len(shown) * sum(per_prompt[r] * sizes[r] for r in power.ROLES)
        return secs, refs, counts

    gen, refs, counts = generation(False, cfg.modes_of, 0)
    gen0, refs0, counts0 = generation(True, lambda v: ISSUE["modes"], 1)
    live = (len(variants) * 3 * len(ISSUE["modes"]) * len(ISSUE["rhos"]) + len(shown)) * t_one
    engines = len(variants) * (cold + ISSUE["seeds"] * draw)
    scfg = StudyActivationConfig()
    _, e4_one = timed(lambda: run_study(study_session(family, scfg, cache=DiskCache(tempfile.mkdtemp(prefix="bench-"))),
                                        [family.start], scfg))
    print(f"activation experiment on {family.start}: {e4_one:.0f} s")
    e4 = 4 * e4_one
    rest = live + engines + e4
    total, total0 = gen + refs + rest, gen0 + refs0 + rest
    threads = os.environ["OMP_NUM_THREADS"]
    print(f"projection at the issue's settings, {threads} thread(s): generation {gen / 60:.0f} min (points a variant "
          f"{counts}), checkpoints {refs / 60:.0f} min, live read-outs (one wave) {live / 60:.0f} min, engines "
          f"{engines / 60:.0f} min, activation experiment {e4 / 60:.0f} min: {total / 3600:.2f} h; before (forward "
          f"columns, both modes for every variant, controls moved to Top-K's energy: {counts0}): generation "
          f"{gen0 / 60:.0f} min, checkpoints {refs0 / 60:.0f} min, {total0 / 3600:.2f} h = {total0 / total:.2f}x "
          f"(weight overlap not counted)")


if __name__ == "__main__":
    main()
