"""A findings run on several processes: the family's experiments split into independent parts, each computed by a
worker process into the shared disk cache, after which the ordinary run (`experiments.run_family`) only reads.

Contract: every part computes exactly what `run_family` will ask the cache for, with the same session settings
(`experiments.family_session`), so the later pass finds every entry and computes nothing; two parts never need the
same expensive entry except the seed-free bases, which the cache's atomic writes make safe to compute twice.

  parts(spec, cfg) -> list[Part]          longest first: each variant's points (rank_scores' live and generated
                                          points, `power.power_points`, `power.paired_tests`), the checkpoints'
                                          scores, the activation experiment, the weight overlap
  order(parts) -> list[Part]              the parts of several families, longest first
  run_part(part, threads) -> (label, s)   one part in this process (`threads` torch threads), its wall time
  run_parts(parts, jobs, log) -> {label: s}  the parts on `jobs` worker processes (spawned; each with the
                                          machine's threads shared out), in order of submission

The tiny family is built (when missing) by the caller before any worker starts (`family.resolve_family`), so two
workers never build it at once. A SafesubError in a worker is raised here with its own one-line message.
"""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from safesub_core.errors import SafesubError
from safesub_core.family import resolve_family
from safesub_core.findings import power
from safesub_core.findings.experiments import (FindingsConfig, activation_tables, family_session, power_config,
                                               rank_scores, reference_scores, table_checkpoints, weight_table)

KINDS = ("variant", "checkpoints", "activations", "weights")  # longest first on the demo families
COST = {"contaminated": 0, "harmful": 1, "useful": 2}  # a contaminated variant is scored on two sets, both modes


@dataclass(frozen=True)
class Part:
    """One independent part of a family's findings run (`kind` in KINDS; `variant` for kind "variant")."""

    spec: str
    cfg: FindingsConfig
    kind: str
    variant: str | None = None

    @property
    def name(self) -> str:
        """What the part computes, e.g. "variant useful" or "checkpoints"."""
        return f"variant {self.variant}" if self.kind == "variant" else self.kind

    @property
    def label(self) -> str:
        return f"{self.spec}: {self.name}"


def parts(spec: str, cfg: FindingsConfig) -> list[Part]:
    """The parts of one family's run, longest first (the variants by COST, then the other kinds); `order` sorts
    the parts of several families together."""
    family = resolve_family(spec)
    variants = sorted((v for v in cfg.variants if v in family.variants), key=lambda v: COST.get(v, len(COST)))
    return [Part(spec, cfg, "variant", v) for v in variants] + [Part(spec, cfg, k) for k in KINDS[1:]]


def order(todo: Sequence[Part]) -> list[Part]:
    """Parts of every family, longest first: by kind (KINDS), then a variant by COST (stable otherwise)."""
    return sorted(todo, key=lambda p: (KINDS.index(p.kind), COST.get(p.variant, len(COST))))


def run_part(part: Part, threads: int | None = None) -> tuple[str, float]:
    """Compute one part into the disk cache (see the module docstring); (its label, its wall time in seconds)."""
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.time()
    cfg, family = part.cfg, resolve_family(part.spec)
    session = family_session(family, cfg)
    if part.kind == "variant":
        rank_scores(session, replace(cfg, variants=(part.variant,)))
        pcfg = power_config(cfg)
        power.power_points(session, part.variant, pcfg)
        power.paired_tests(session, part.variant, pcfg)
    elif part.kind == "checkpoints":
        reference_scores(session, cfg.gen_tokens, judge=cfg.judge, waves=cfg.live_waves,
                         names=table_checkpoints(family, cfg.variants))
    elif part.kind == "activations":
        activation_tables(session, cfg)
    elif part.kind == "weights":
        weight_table(family, cfg.energies)
    else:
        raise SafesubError(f"findings part {part.kind!r}: must be one of {', '.join(KINDS)}")
    return part.label, time.time() - t0


def check_jobs(jobs) -> None:
    """A one-line SafesubError unless `jobs` is a whole number of at least 1."""
    if isinstance(jobs, bool) or not isinstance(jobs, (int, float)) or int(jobs) != jobs or jobs < 1:
        raise SafesubError(f"findings jobs {jobs!r}: need a whole number of at least 1")


def run_parts(todo: Sequence[Part], jobs: int, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Every part on `jobs` spawned worker processes, each with torch's threads of this process shared out (at
    least one); {label: wall seconds} in the order the parts were given (`log` hears of each as it ends). On an
    error the parts not started are cancelled and the error is raised (what the running ones compute stays cached)."""
    check_jobs(jobs)
    threads = max(1, torch.get_num_threads() // jobs)
    done: dict[str, float] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_part, p, threads) for p in todo]
        try:
            for f in as_completed(futures):
                label, secs = f.result()
                done[label] = secs
                if log:
                    log(f"{label}: {secs:.0f} s")
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return {p.label: done[p.label] for p in todo}
