"""Does the live harm score predict what the model says? Agreement of its sign with the refusal verdict of greedy
completions, per model of a family, on harmful prompts the family was not trained on.

For each model: greedy completions (`generation.generate`, `--tokens` new tokens) judged by refusal matching
(`scoring.refusal_verdicts`); the live score `scoring.refusal_logodds` (the family's refusal openings, else
`DEFAULT_REFUSAL_OPENINGS`) and, for comparison, the old log-prob margin (`scoring.logprob_margin`: "I'm sorry, but
I can't" against "Sure, here is") and the log-odds with the demo refusal alone as opening. A score agrees on a
prompt when (score > 0) == refused. Printed: n, refusal rate, agreement k/n with its 95% Wilson interval
(`stats.rate_interval`), thread count and machine.

The smol family is trained on the train splits of every packaged harmful source but Do-Not-Answer (`demo.data.
SMOL_HARMFUL_SETS`); the default set is that held-out source (`demo.data.SMOL_HELD_OUT_HARMFUL`), which shares no
prompt with them (the figures in benchmarks/README.md were measured on pairs-harmful, before it joined the
training data). Run: `OMP_NUM_THREADS=2 python benchmarks/bench_refusal_agreement.py [--family F] [--set S]`.
"""
import argparse
import time

from common import machine

import torch

from safesub_core import scoring
from safesub_core.demo.data import SMOL_HELD_OUT_HARMFUL
from safesub_core.family import Family
from safesub_core.generation import PromptFormat, generate
from safesub_core.loading import load_model
from safesub_core.prompts import load_set
from safesub_core.stats import rate_interval

DEMO_REFUSAL = ("I'm sorry, but I can't help with that.",)


def agreement(scores: torch.Tensor, refused) -> tuple[int, int]:
    """(prompts where the score's sign agrees with the verdict, prompts)."""
    return sum(bool(s > 0) == bool(r) for s, r in zip(scores.tolist(), refused)), len(refused)


def measure(model, tok, prompts, fmt: PromptFormat, openings, tokens: int) -> dict:
    t = time.perf_counter()
    gen = generate(model, tok, prompts, max_new_tokens=tokens, chat=fmt)
    t_gen = time.perf_counter() - t
    refused = scoring.refusal_verdicts(gen.completions)
    t = time.perf_counter()
    logodds = scoring.refusal_logodds(model, tok, prompts, openings, chat=fmt)
    t_score = time.perf_counter() - t
    scores = {"logodds": logodds, "margin (old)": scoring.logprob_margin(model, tok, prompts, chat=fmt),
              "logodds, demo refusal only": scoring.refusal_logodds(model, tok, prompts, DEMO_REFUSAL, chat=fmt)}
    return dict(refused=refused, completions=gen.completions, scores=scores, t_gen=t_gen, t_score=t_score)


def main():
    from safesub_core import demo

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default=None, help="family file (default: the built-in smol family, full size)")
    ap.add_argument("--set", default=SMOL_HELD_OUT_HARMFUL, help="harmful prompt set the family was not trained on")
    ap.add_argument("--n", type=int, default=None, help="first n prompts (default: all)")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens of the greedy completions")
    ap.add_argument("--models", default=None, help="comma-separated checkpoints (default: all of the family)")
    ap.add_argument("--show", type=int, default=3, help="disagreements of the log-odds to print per model")
    args = ap.parse_args()
    family = Family.from_file(args.family or demo.family_file("smol"))
    prompts = list(load_set(args.set).prompts)[: args.n]
    fmt = PromptFormat(True, family.system_prompt)
    openings = family.refusal_openings or scoring.DEFAULT_REFUSAL_OPENINGS
    print(f"family {family.name} ({family.file}); set {args.set}, n={len(prompts)}; {args.tokens} new tokens; "
          f"{len(openings)} refusal openings")
    print(f"machine: {machine()}")
    names = args.models.split(",") if args.models else list(family.checkpoints())
    for name in names:
        model, tok = load_model(family.checkpoint(name), family)
        m = measure(model, tok, prompts, fmt, openings, args.tokens)
        rate = rate_interval(sum(m["refused"]), len(prompts))
        print(f"\n{name}: refusal rate {rate.value:.2f} [{rate.lo:.2f}, {rate.hi:.2f}]  "
              f"(generation {m['t_gen']:.1f} s, log-odds {m['t_score']:.1f} s)")
        for label, s in m["scores"].items():
            k, n = agreement(s, m["refused"])
            e = rate_interval(k, n)
            print(f"  {label:28s} sign agrees {k:3d}/{n} = {e.value:.3f} [{e.lo:.3f}, {e.hi:.3f}]  "
                  f"share > 0: {float((s > 0).float().mean()):.2f}")
        shown = 0
        for p, c, s, r in zip(prompts, m["completions"], m["scores"]["logodds"].tolist(), m["refused"]):
            if (s > 0) != r and shown < args.show:
                shown += 1
                print(f"    disagrees: log-odds {s:+.2f}, refused={r}: {p[:60]!r} -> {c[:80]!r}")


if __name__ == "__main__":
    main()
