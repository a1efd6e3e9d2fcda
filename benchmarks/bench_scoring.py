"""Live scoring speed on the tiny family: the refusal log-odds on 32 harmful evaluation prompts (one live wave).

Target (issue): the harm score of one wave (32 prompts) on the tiny family in at most 0.3 s. Printed beside a
baseline measured in the same run: one bare batched forward pass over the same prompts (the floor any such score
sits on), the old two-opening margin, and the whole live read-out of one wave of a slider point (log-odds + NLL +
arithmetic + KL), with the greedy answers decoded from scratch and with a draft that holds (a slider's previous
point, checked in one pass).
Run: `python benchmarks/bench_scoring.py`.
"""
import statistics
import time

from common import machine, tiny_family_path

import torch

from safesub_core import scoring
from safesub_core.loading import load_model
from safesub_core.family import Family
from safesub_core.generation import encode_batch, format_prompt
from safesub_core.prompts import EvalSets
from safesub_core.session import FamilySession


def median_time(fn, repeats=7):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default=None, help="family file (default: the built-in tiny family)")
    family = Family.from_file(ap.parse_args().family or tiny_family_path())
    model, tok = load_model(family.aligned, family)
    sets = EvalSets.default(32)  # one wave of 32 prompts a set
    prompts = list(sets.harmful.prompts)
    batch, _ = encode_batch(tok, [format_prompt(tok, p) for p in prompts], 10_000, "cpu")

    @torch.no_grad()
    def bare():
        model(**batch)

    t_bare = median_time(bare)
    t_margin = median_time(lambda: scoring.logprob_margin(model, tok, prompts))
    t_logodds = median_time(lambda: scoring.refusal_logodds(model, tok, prompts))
    own = family.refusal_openings or scoring.DEFAULT_REFUSAL_OPENINGS  # what the family's sessions score with
    t_own = median_time(lambda: scoring.refusal_logodds(model, tok, prompts, own))
    session = FamilySession(family, sets=sets, batch=32)

    def wave(point=None):
        session.forward_values(session.reference, point)
        session.decoded_values(session.reference, point)

    t_live = median_time(wave)  # no point: no draft kept
    point = (family.start, None, None)
    t_drafted = median_time(lambda: wave(point))  # the last answers as draft
    print(f"machine: {machine()}")
    print(f"family: {family.name}; {len(prompts)} harmful eval prompts; live read-out on "
          f"{len(sets.harmful)}+{len(sets.utility)}+{len(sets.benign)} prompts")
    print(f"bare batched forward:            {t_bare * 1e3:7.1f} ms")
    print(f"two-opening margin (old):        {t_margin * 1e3:7.1f} ms  ({t_margin / t_bare:.2f}x bare)")
    print(f"refusal log-odds ({len(scoring.DEFAULT_REFUSAL_OPENINGS)} openings):  {t_logodds * 1e3:7.1f} ms  "
          f"({t_logodds / t_bare:.2f}x bare)")
    print(f"refusal log-odds (the family's {len(own)}):  {t_own * 1e3:7.1f} ms  ({t_own / t_bare:.2f}x bare; "
          "target <= 300 ms)")
    print(f"one live wave of a point:        {t_live * 1e3:7.1f} ms  ({t_live / t_bare:.2f}x bare)")
    print(f"  with the answers drafted:      {t_drafted * 1e3:7.1f} ms  ({t_drafted / t_bare:.2f}x bare)")


if __name__ == "__main__":
    main()
