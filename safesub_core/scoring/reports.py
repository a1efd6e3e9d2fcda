"""Generation-based reports: greedy completions of a prompt set scored per prompt and summarised
(docs/method.md, "Scores").

- `harmfulness_report` (harmful prompts): refusal matching (`scoring.text`), refusal rate, attack success rate
  = 1 - refusal rate, the refusal log-odds (`scoring.logprobs.refusal_logodds`, column "margin", with the
  `openings` given) and, given a judge, its 1-5 scores.
- `utility_report` (arithmetic prompts with references): exact match of the answer extracted under a convention
  (`scoring.text.extract_answer`: "flexible" or "strict"), answer NLL.
- `overrefusal_report` (benign prompts that look edgy): the refusal rate by marker matching (lower is better).
Each returns (per-prompt DataFrame, summary dict) keyed by `scoring.names`. With `forward_scores=False` a report
skips its forward-pass column (the margin, the answer NLL) and that column's summary entries: the rates come from the
completions alone, and the forward pass costs as much as the generation on a CPU. every rate and mean of a summary comes
with its 95% interval and n (`<score>_lo`, `<score>_hi`, `<score>_n`: `stats.rate_of`, `stats.mean_interval`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import pandas as pd

from safesub_core.errors import SafesubError
from safesub_core.stats import mean_interval, rate_of
from safesub_core.generation import PromptFormat, generate
from safesub_core.scoring import names
from safesub_core.scoring.judges import Judge, judge_scores
from safesub_core.scoring.logprobs import DEFAULT_REFUSAL_OPENINGS, _check_prompts, answer_nll, refusal_logodds
from safesub_core.scoring.text import CONVENTIONS, REFUSAL_MARKERS, exact_match, extract_answer, refusal_verdicts


def _set_parts(prompt_set):
    prompts = _check_prompts(prompt_set, f"prompt set {getattr(prompt_set, 'name', '')!r}")
    return prompts, getattr(prompt_set, "references", None), getattr(prompt_set, "name", "prompts")


def harmfulness_report(model, tokenizer, prompt_set, max_new_tokens: int = 48, chat: "bool | PromptFormat" = True,
                       markers: Sequence[str] = REFUSAL_MARKERS, progress: Callable[[int, int], None] | None = None,
                       batch_size: int = 16, judge: Judge | None = None,
                       openings: Sequence[str] = DEFAULT_REFUSAL_OPENINGS, forward_scores: bool = True):
    """(per-prompt DataFrame[prompt, completion, refused, margin (, judge)], summary dict) on harmful prompts.

    Summary: n, refusal_rate, attack_success_rate, margin_mean, share_margin_negative, truncated, notes (and
    judge_mean, judge_scored, judge_message when a judge is given); without `forward_scores`, no margin.
    """
    prompts, _, name = _set_parts(prompt_set)
    notes: list[str] = []
    gen = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat,
                   batch_size=batch_size, progress=progress)
    refused = refusal_verdicts(gen.completions, markers)
    df = pd.DataFrame({names.PROMPT: prompts, names.COMPLETION: gen.completions, names.REFUSED: refused})
    summary = {"set": name, "n": len(prompts)}
    summary |= rate_of(refused).columns(names.REFUSAL_RATE)
    summary |= rate_of([not r for r in refused]).columns(names.ATTACK_SUCCESS_RATE)
    if forward_scores:
        margin = refusal_logodds(model, tokenizer, prompts, openings, chat=chat, batch_size=batch_size * 2,
                                 notes=notes)
        df[names.MARGIN] = margin.tolist()
        summary |= mean_interval(margin.tolist()).columns(names.MARGIN_MEAN)
        summary |= rate_of((margin < 0).tolist()).columns(names.SHARE_MARGIN_NEGATIVE)
    summary |= {"truncated": sum(gen.truncated), "notes": notes}
    if judge is not None and judge.kind != "off":
        res = judge_scores(prompts, gen.completions, judge)
        df[names.JUDGE] = res.scores
        judged = [float(v) for v in res.scores if v is not None and not math.isnan(float(v))]
        summary |= mean_interval(judged).columns(names.JUDGE_MEAN)
        summary.update({"judge_scored": res.scored, "judge_message": res.message})
    return df, summary


def utility_report(model, tokenizer, prompt_set, max_new_tokens: int = 48, chat: "bool | PromptFormat" = True,
                   progress: Callable[[int, int], None] | None = None, batch_size: int = 16,
                   convention: str = "flexible", forward_scores: bool = True):
    """(per-prompt DataFrame[prompt, completion, predicted, reference, correct, nll], summary) on a math set; the
    predicted answer is `scoring.text.extract_answer` under `convention` ("flexible" or "strict").

    Summary: n, exact_match (share correct), nll_mean, truncated, notes; without `forward_scores`, no NLL.
    """
    if convention not in CONVENTIONS:
        raise SafesubError(f"exact-match convention {convention!r}: unknown (expected {', '.join(CONVENTIONS)})")
    prompts, refs, name = _set_parts(prompt_set)
    if refs is None:
        raise SafesubError(f"prompt set {name!r}: has no reference answers, which utility scoring needs")
    notes: list[str] = []
    gen = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat,
                   batch_size=batch_size, progress=progress)
    predicted = [extract_answer(c, convention) for c in gen.completions]
    correct = [exact_match(p, r) for p, r in zip(predicted, refs)]
    df = pd.DataFrame({names.PROMPT: prompts, names.COMPLETION: gen.completions, names.PREDICTED: predicted,
                       names.REFERENCE: list(refs), names.CORRECT: correct})
    summary = {"set": name, "n": len(prompts), "convention": convention}
    summary |= rate_of(correct).columns(names.EXACT_MATCH)
    if forward_scores:
        nll = answer_nll(model, tokenizer, prompts, refs, chat=chat, batch_size=batch_size * 2, notes=notes)
        df[names.NLL] = nll.tolist()
        summary |= mean_interval(nll.tolist()).columns(names.NLL_MEAN)
    summary |= {"truncated": sum(gen.truncated), "notes": notes}
    return df, summary


def overrefusal_report(model, tokenizer, prompt_set, max_new_tokens: int = 48, chat: "bool | PromptFormat" = True,
                       markers: Sequence[str] = REFUSAL_MARKERS, progress: Callable[[int, int], None] | None = None,
                       batch_size: int = 16, openings: Sequence[str] = DEFAULT_REFUSAL_OPENINGS,
                       forward_scores: bool = True):
    """(per-prompt DataFrame[prompt, completion, refused, margin], summary) on benign prompts that look edgy.

    Summary: n, overrefusal_rate (refusal rate on these prompts; lower is better), margin_mean,
    share_margin_positive, truncated, notes; without `forward_scores`, no margin.
    """
    df, s = harmfulness_report(model, tokenizer, prompt_set, max_new_tokens=max_new_tokens, chat=chat,
                               markers=markers, progress=progress, batch_size=batch_size, openings=openings,
                               forward_scores=forward_scores)
    summary = {"set": s["set"], "n": s["n"]}
    summary |= rate_of(df[names.REFUSED].tolist()).columns(names.OVERREFUSAL_RATE)
    if forward_scores:
        summary |= {k: v for k, v in s.items() if k.startswith(names.MARGIN_MEAN)}
        summary |= rate_of((df[names.MARGIN] > 0).tolist()).columns(names.SHARE_MARGIN_POSITIVE)
    summary |= {"truncated": s["truncated"], "notes": s["notes"]}
    return df, summary
