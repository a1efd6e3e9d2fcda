"""Generation-based reports: greedy completions of a prompt set scored per prompt and summarised
(docs/method.md, "Scores").

- `harmfulness_report` (harmful prompts): refusal matching (`scoring.text`), refusal rate, attack success rate
  = 1 - refusal rate, the log-prob margin (`scoring.logprobs`) and, given a judge, its 1-5 scores.
- `utility_report` (arithmetic prompts with references): exact match of the final number, answer NLL.
- `overrefusal_report` (benign prompts that look edgy): the refusal rate by marker matching (lower is better).
Each returns (per-prompt DataFrame, summary dict) keyed by `scoring.names`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import pandas as pd

from safesub_core.errors import SafesubError
from safesub_core.generation import generate
from safesub_core.scoring import names
from safesub_core.scoring.judges import Judge, judge_scores
from safesub_core.scoring.logprobs import _check_prompts, answer_nll, logprob_margin
from safesub_core.scoring.text import REFUSAL_MARKERS, exact_match, final_number, refusal_verdicts


def _set_parts(prompt_set):
    prompts = _check_prompts(prompt_set, f"prompt set {getattr(prompt_set, 'name', '')!r}")
    return prompts, getattr(prompt_set, "references", None), getattr(prompt_set, "name", "prompts")


def _mean(values) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def harmfulness_report(model, tokenizer, prompt_set, max_new_tokens: int = 48, chat: bool = True,
                       markers: Sequence[str] = REFUSAL_MARKERS, progress: Callable[[int, int], None] | None = None,
                       batch_size: int = 16, judge: Judge | None = None):
    """(per-prompt DataFrame[prompt, completion, refused, margin (, judge)], summary dict) on harmful prompts.

    Summary: n, refusal_rate, attack_success_rate, margin_mean, share_margin_negative, truncated, notes (and
    judge_mean, judge_scored, judge_message when a judge is given).
    """
    prompts, _, name = _set_parts(prompt_set)
    notes: list[str] = []
    gen = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat,
                   batch_size=batch_size, progress=progress)
    refused = refusal_verdicts(gen.completions, markers)
    margin = logprob_margin(model, tokenizer, prompts, chat=chat, batch_size=batch_size * 2, notes=notes)
    df = pd.DataFrame({names.PROMPT: prompts, names.COMPLETION: gen.completions, names.REFUSED: refused,
                       names.MARGIN: margin.tolist()})
    rate = sum(refused) / len(refused)
    summary = {
        "set": name,
        "n": len(prompts),
        names.REFUSAL_RATE: rate,
        names.ATTACK_SUCCESS_RATE: 1.0 - rate,
        names.MARGIN_MEAN: float(margin.mean()),
        names.SHARE_MARGIN_NEGATIVE: float((margin < 0).float().mean()),
        "truncated": sum(gen.truncated),
        "notes": notes,
    }
    if judge is not None and judge.kind != "off":
        res = judge_scores(prompts, gen.completions, judge)
        df[names.JUDGE] = res.scores
        summary.update({names.JUDGE_MEAN: _mean(res.scores), "judge_scored": res.scored,
                        "judge_message": res.message})
    return df, summary


def utility_report(model, tokenizer, prompt_set, max_new_tokens: int = 48, chat: bool = True,
                   progress: Callable[[int, int], None] | None = None, batch_size: int = 16):
    """(per-prompt DataFrame[prompt, completion, predicted, reference, correct, nll], summary) on a math set.

    Summary: n, exact_match (share correct), nll_mean, truncated, notes.
    """
    prompts, refs, name = _set_parts(prompt_set)
    if refs is None:
        raise SafesubError(f"prompt set {name!r}: has no reference answers, which utility scoring needs")
    notes: list[str] = []
    gen = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat,
                   batch_size=batch_size, progress=progress)
    predicted = [final_number(c) for c in gen.completions]
    correct = [exact_match(p, r) for p, r in zip(predicted, refs)]
    nll = answer_nll(model, tokenizer, prompts, refs, chat=chat, batch_size=batch_size * 2, notes=notes)
    df = pd.DataFrame({names.PROMPT: prompts, names.COMPLETION: gen.completions, names.PREDICTED: predicted,
                       names.REFERENCE: list(refs), names.CORRECT: correct, names.NLL: nll.tolist()})
    summary = {
        "set": name,
        "n": len(prompts),
        names.EXACT_MATCH: sum(correct) / len(correct),
        names.NLL_MEAN: float(nll.mean()),
        "truncated": sum(gen.truncated),
        "notes": notes,
    }
    return df, summary


def overrefusal_report(model, tokenizer, prompt_set, max_new_tokens: int = 48, chat: bool = True,
                       markers: Sequence[str] = REFUSAL_MARKERS, progress: Callable[[int, int], None] | None = None,
                       batch_size: int = 16):
    """(per-prompt DataFrame[prompt, completion, refused, margin], summary) on benign prompts that look edgy.

    Summary: n, overrefusal_rate (refusal rate on these prompts; lower is better), margin_mean,
    share_margin_positive, truncated, notes.
    """
    df, s = harmfulness_report(model, tokenizer, prompt_set, max_new_tokens=max_new_tokens, chat=chat,
                               markers=markers, progress=progress, batch_size=batch_size)
    summary = {
        "set": s["set"],
        "n": s["n"],
        names.OVERREFUSAL_RATE: s[names.REFUSAL_RATE],
        names.MARGIN_MEAN: s[names.MARGIN_MEAN],
        names.SHARE_MARGIN_POSITIVE: float((df[names.MARGIN] > 0).mean()),
        "truncated": s["truncated"],
        "notes": s["notes"],
    }
    return df, summary
