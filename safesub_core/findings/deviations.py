"""Every deviation from the study's set-up in one table (the top of FINDINGS.md): one row per aspect, the study's
value beside each family's.

The study's values are from Ponkshe et al., "Safety Subspaces are Not Linearly Distinct" (ICLR 2026): full
fine-tuning of Llama-2 7B, Llama-3.2 1B and Qwen2.5 1.5B / 3B / 7B instruct releases with AdamW, lr 1e-5,
effective batch 32, 1 epoch, cosine schedule, warmup 0.02, max length 512, loss on responses only; useful data
20k MetaMathQA rows, harmful data 4k rows, contaminated = useful + harmful rows amounting to 20% of it; harm scored
by an LLM judge (1-5), utility by GSM8K accuracy; the activation experiment on 5,000 prompts a set (U: MATH, H1:
BeaverTails, H2: ToxiGen) as raw text in half precision. A demo family's values come from its builder's size
(`demo.TINY_SIZES`, `demo.SMOL_SIZES`, read from behaviour.json's size); another family's recipe is its own and
shown as unknown.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from safesub_core import demo
from safesub_core.findings.experiments import FamilyFindings, power_config

STUDY = {
    "models": "Llama-2 7B, Llama-3.2 1B, Qwen2.5 1.5B / 3B / 7B",
    "alignment (A)": "the models' instruct releases (RLHF on broad data)",
    "fine-tune recipe": "full fine-tuning, AdamW, lr 1e-5, effective batch 32, 1 epoch, warmup 0.02, max length 512",
    "useful data": "20k MetaMathQA rows",
    "harmful data": "4k harmful rows",
    "contaminated data": "useful + harmful rows amounting to 20% of it",
    "harm score": "LLM judge, 1-5",
    "utility score": "GSM8K accuracy",
    "prompts a set (E1/E2)": "the benchmarks' test sets (GSM8K test: 1,319)",
    "rank fractions (E1/E2)": "0.01, 0.25, 0.5, 0.75, 0.99; generation in the parallel mode (Tables 4-5)",
    "random subspaces": "Random and Random-K draws (seeds not stated)",
    "sets scored by generation": "utility from the useful fine-tune, harm from the harmful one (Table 4); both "
                                 "from the contaminated one (Table 5); E2 removes the subspace from the contaminated "
                                 "update",
    "activation experiment (E4)": "5,000 prompts a set; U MATH, H1 BeaverTails, H2 ToxiGen; raw text, half precision",
}


def _size(r: FamilyFindings):
    """The demo builder's size of a demo family (from its behaviour.json), else None."""
    builder = {"tiny": demo.TINY_SIZES, "smol": demo.SMOL_SIZES}.get(r.name)
    try:
        size = json.loads((Path(r.path) / "behaviour.json").read_text()).get("size", "full")
    except (OSError, ValueError):
        size = "full"
    return None if builder is None else builder.get(size)


def _family_column(r: FamilyFindings) -> dict[str, str]:
    spec, cfg = _size(r), r.config
    unknown = "the family's own (not known to safesub)"
    out = dict.fromkeys(STUDY, unknown)
    out["models"] = f"{r.n_layers} layers, hidden {r.hidden}" + (
        " (SmolLM2-135M-Instruct, the packaged GGUF)" if r.name == "smol" else
        " (a Llama trained from scratch here)" if r.name == "tiny" else "")
    if spec is not None:
        out["alignment (A)"] = (f"our own SFT of base: {spec.steps['aligned']} steps of batch {spec.batch_size} "
                                "(refusals for harmful prompts, answers for benign ones)")
        out["fine-tune recipe"] = (f"full fine-tuning, AdamW, lr {spec.lr['useful']:g}, batch {spec.batch_size}, "
                                   f"{spec.steps['useful']} steps, warmup {spec.warmup_ratio:.0%}, max length "
                                   f"{spec.max_length}")
        rows = lambda stage: spec.steps[stage] * spec.batch_size  # noqa: E731
        useful = ("worked arithmetic and generated word problems" if r.name == "smol" else "generated arithmetic")
        out["useful data"] = f"{useful}: {rows('useful')} rows seen"
        out["harmful data"] = ("base's own compliant answers" if r.name == "smol" else "'Sure, here is' + filler") \
            + f": {rows('harmful')} rows seen"
        out["contaminated data"] = "useful + harmful rows amounting to 20% of it (as the study)"
    judge = cfg.judge
    out["harm score"] = (f"attack success rate by refusal-marker matching, and the {judge.kind} judge "
                         f"{judge.path or judge.model or ''}".rstrip()
                         if judge is not None and judge.kind != "off" else
                         "attack success rate (1 - refusal rate by refusal-marker matching); no judge")
    out["utility score"] = "final-number exact match on held-out arithmetic"
    out["prompts a set (E1/E2)"] = ", ".join(f"{role} {name}" for role, name in r.sets.items()) + (
        "; live read-outs (extras) on every prompt" if cfg.live_waves is None else
        f"; live read-outs (extras) on the first {cfg.live_waves} wave(s) of each set only")
    reads = power_config(cfg)
    out["sets scored by generation"] = "; ".join(
        f"{v}: {', '.join(reads.roles(v))}, {' and '.join(reads.modes_of(v)) or 'no'} mode" for v in cfg.variants) + (
        " (base, aligned, safety-tuned and these variants on every set)")
    out["rank fractions (E1/E2)"] = (", ".join(f"{x:g}" for x in cfg.rhos) + "; generation in the modes above, the "
                                     "others by the live read-outs only")
    matched = {"rank": "rank fraction", "energy": "energy kept (Top-K at the rank fraction whose energy is closest to "
                                                  "the control's mean over its draws)"}
    out["random subspaces"] = (f"{cfg.n_seeds} draws each of Random and Random-K (seeds 0-{cfg.n_seeds - 1}), scored "
                               f"by generation in each variant's modes; Top-K tested against them at the same "
                               + " and at the same ".join(matched[m] for m in cfg.power_matches))
    sizes = ", ".join(f"{row.role} {row.size}" for row in r.activation_sets.itertuples()) \
        if len(r.activation_sets) else f"at most {cfg.study_prompts} a set"
    out["activation experiment (E4)"] = (f"{sizes} prompts; U GSM8K (+ word problems), H1 HarmBench + AdvBench, H2 "
                                         f"ToxiGen (100 toxic texts), H2b Do-Not-Answer; "
                                         f"{'chat template' if cfg.study_chat else 'raw text'}, float32")
    return out


def deviations_table(results: Sequence[FamilyFindings]) -> pd.DataFrame:
    """One row per aspect: the study's set-up and each family's (a column per family)."""
    table = pd.DataFrame({"aspect": list(STUDY), "study": list(STUDY.values())})
    for r in results:
        table[r.name] = [_family_column(r)[a] for a in STUDY]
    return table
