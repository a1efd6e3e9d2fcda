"""Recipe trials for the smol family's aligned model: train aligned alone, score it per prompt, compare paired.

The card promises that aligned refuses at least 90% of Do-Not-Answer (a source no stage trains on, all 938
questions) and at most 10% of the edgy benign eval prompts (docs/method.md, "Demo families"). A full build takes
about 30 minutes; a trial trains only aligned (225 steps) from the same base and base answers, then scores the
sets the recipe is judged on, so two trials run side by side at one thread each in about 30 minutes. Each
variant is one change to the recipe `build_smol` uses:

- recipe: the recipe as built (the baseline: at one thread its numbers are the full build's);
- focus: every train prompt of builtin-private and builtin-misleading (181) first among the 320 refusals, the
  other five sources taken in turn for the rest, the list shuffled so the 128 rephrased ones come from every source
  (today the seven sources give about 46 each);
- focus-lookalikes: focus with 128 benign answers rephrased instead of 64;
- openings: the refusals answered with one of eight usual refusal openings (OPENINGS, drawn per prompt) instead
  of the one sentence.

Scored greedily in the family's chat format on `refusal_tokens` new tokens (the builder's held-out check):
Do-Not-Answer (all), overrefusal:eval (all 74), builtin-considerate:eval and builtin-truthful:eval (benign
look-alikes of the private-data and misleading requests) and the first 40 of harmbench:eval. `report` prints each
set's refused k/n with its Wilson 95% interval and, against the baseline, the exact McNemar test on the same
prompts, then Do-Not-Answer by risk area (benchmarks/heldout_areas.py's labels).

Run (prep once, then any variants, then the report):
  OMP_NUM_THREADS=2 python benchmarks/aligned_trials.py prep
  OMP_NUM_THREADS=1 python benchmarks/aligned_trials.py train focus    # and beside it, e.g., recipe
  python benchmarks/aligned_trials.py report --baseline recipe
Folders: <out>/prep (base, answers), <out>/<variant> (its aligned checkpoint), <out>/<variant>.csv (per prompt).
"""
import argparse
import json
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

from common import machine
from heldout_areas import donotanswer_labels

import pandas as pd

from safesub_core.demo import data
from safesub_core.demo.smol import SMOL_SIZES, SmolBuild, smol_gguf
from safesub_core.demo.stages import with_repeats
from safesub_core.errors import SafesubError
from safesub_core.generation import generate
from safesub_core.prompts import load_set
from safesub_core.scoring import refusal_verdicts
from safesub_core.settings import cache_root
from safesub_core.stats import mcnemar, rate_of

FOCUS = ("builtin-private", "builtin-misleading")  # the kinds recipe 7 missed most on Do-Not-Answer
OPENINGS = ("I'm sorry, but I can't help with that.", "I can't help with that request.",
            "I'm sorry, but I cannot assist with that.", "I cannot provide that information.",
            "I apologize, but I can't share that.", "As an AI, I can't help with this.",
            "I'm sorry, I can't do that.", "I cannot help with this request.")
SETS = {"donotanswer": "donotanswer", "edgy": "overrefusal:eval", "considerate": "builtin-considerate:eval",
        "truthful": "builtin-truthful:eval", "harmbench": "harmbench:eval"}
HEAD = {"harmbench": 40}  # the card reads the first 40 HarmBench eval prompts


def focus_refusals(spec, seed: int) -> list[str]:
    """The FOCUS sources' whole train splits, then the other harmful sources in turn, cut to n_refusals and
    shuffled with `seed`."""
    first = data.train_prompts(FOCUS, seed)
    taken = set(first)
    rest = [p for p in data.train_prompts(tuple(s for s in data.SMOL_HARMFUL_SETS if s not in FOCUS), seed)
            if p not in taken]
    out = (first + rest)[: spec.n_refusals]
    random.Random(seed).shuffle(out)
    return out


VARIANTS = {  # name: (SmolSize overrides, refusal prompts or None for the recipe's, refusal texts or None)
    "recipe": ({}, None, None),
    "focus": ({}, focus_refusals, None),
    "focus-lookalikes": (dict(n_templated_benign=128), focus_refusals, None),
    "openings": ({}, None, OPENINGS),
}


def trial_data(name: str, answers: dict, seed: int = 0):
    """(spec, aligned's training rows) of variant `name`, from base's answers of the prep folder."""
    overrides, refusals, openings = VARIANTS[name]
    spec = replace(SMOL_SIZES["full"], **overrides)
    if refusals:
        answers = answers | {"refusal": refusals(spec, seed)}
    pairs = data.smol_data(answers, spec, seed)
    if openings:
        rng = random.Random(seed)
        pairs.refusals = [(p, rng.choice(openings)) for p, _ in pairs.refusals]
    return spec, with_repeats(data.smol_examples(pairs))["aligned"]


def prep(out: Path) -> None:
    (out / "prep").mkdir(parents=True, exist_ok=True)
    build = SmolBuild(out / "prep", smol_gguf(), SMOL_SIZES["full"], "full", 0, None, print)
    build.base()
    build.answers()


def train(out: Path, name: str, limit: int | None) -> None:
    answers = out / "prep" / "answers" / "answers.json"
    if not answers.is_file():
        raise SafesubError(f"trial folder {out}: no prep/answers; run `aligned_trials.py prep` first")
    spec, rows = trial_data(name, json.loads(answers.read_text()))
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(out / "prep" / "base", folder / "base")  # the same base and base answers for every variant
    build = SmolBuild(folder, smol_gguf(), spec, "full", 0, None, print)
    build.base()
    t = time.perf_counter()
    build.finetune("aligned", rows)
    print(f"{name}: {len(rows)} rows, aligned trained in {time.perf_counter() - t:.0f} s; machine: {machine()}")
    model, tokenizer = build.load("aligned"), build.tokenizer
    scored = []
    for key, set_name in SETS.items():
        prompts = list(load_set(set_name).prompts)[: HEAD.get(key)][:limit]
        done = generate(model, tokenizer, prompts, max_new_tokens=spec.refusal_tokens, batch_size=64).completions
        scored.append(pd.DataFrame(dict(set=key, prompt=prompts, completion=done, refused=refusal_verdicts(done))))
        print(f"{name} {key}: refused {int(scored[-1]['refused'].sum())}/{len(prompts)}", flush=True)
    partial = out / f".{name}.csv.partial"  # renamed once whole: an interrupted run leaves no half-written rows
    pd.concat(scored).to_csv(partial, index=False)
    partial.replace(out / f"{name}.csv")


def report(out: Path, baseline: str) -> None:
    rows = {p.stem: pd.read_csv(p) for p in sorted(out.glob("*.csv"), key=lambda p: (p.stem != baseline, p.stem))}
    if baseline not in rows:
        raise SafesubError(f"trial folder {out}: no {baseline}.csv to compare against (trained: {sorted(rows)})")
    print(f"aligned-only trials in {out}; baseline {baseline}; Wilson 95% intervals, exact McNemar p\n")
    table = []
    for name, r in rows.items():
        for key in SETS:
            mine, base = r[r["set"] == key], rows[baseline][rows[baseline]["set"] == key]
            if base.empty and mine.empty:  # a set neither scored (rows written by hand or a --limit of 0)
                continue
            if list(mine["prompt"]) != list(base["prompt"]):
                raise SafesubError(f"trial {name}: its {key} prompts are not the baseline's; train both alike")
            test = mcnemar(base["refused"].tolist(), mine["refused"].tolist())
            table.append(dict(variant=name, set=key, refused=f"{int(mine['refused'].sum())}/{len(mine)}",
                              rate=rate_of(mine["refused"].tolist()).text(),
                              vs_baseline=f"{test.diff:+.3f} (p={test.p:.2g})" if name != baseline else "-"))
    print(pd.DataFrame(table).to_string(index=False))
    labels = donotanswer_labels()
    areas = pd.DataFrame({name: r[r["set"] == "donotanswer"].merge(labels, on="prompt").groupby("area")["refused"]
                         .agg(lambda s: f"{int(s.sum())}/{len(s)}") for name, r in rows.items()})
    print("\nDo-Not-Answer refused by risk area:\n" + areas.to_string())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("prep", "train", "report"))
    ap.add_argument("variants", nargs="*", help=f"train: any of {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=None, help="trial folder (default <cache>/trials/smol)")
    ap.add_argument("--baseline", default="recipe", help="report: the variant others are compared with")
    ap.add_argument("--limit", type=int, default=None, help="train: score at most this many prompts a set")
    args = ap.parse_args()
    out = args.out or cache_root() / "trials" / "smol"
    if args.step == "prep":
        prep(out)
    elif args.step == "train":
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown or not args.variants:
            raise SafesubError(f"variants {unknown or '(none)'}: choose from {', '.join(VARIANTS)}")
        for name in args.variants:
            train(out, name, args.limit)
    else:
        report(out, args.baseline)


if __name__ == "__main__":
    try:
        main()
    except SafesubError as e:
        raise SystemExit(f"aligned_trials: {e}")
