"""Scores for harmfulness, utility and over-refusal of any Hugging Face causal LM + tokenizer (docs/method.md,
"Scores").

- `names`: every score key, defined once with its label, kind (rate or mean) and better direction.
- `text`: refusal matching (`is_refusal`, `refusal_verdicts`) and final-number exact match; pure text.
- `logprobs`: forward-pass scores, the reference metrics: `refusal_logodds` (the live harm score; openings
  `DEFAULT_REFUSAL_OPENINGS`), `answer_nll`, `kl_to_reference` and the batched log-probs of continuations under
  them; `logprob_margin` (one refusal against one compliance opening) is kept for comparison.
- `live`: the fast path a slider move takes, `live_forward_scores` (the three reference metrics in two passes, to
  float rounding), and `LIVE_ARITH_TOKENS`.
- `reports`: generation-based reports (greedy completions scored per prompt, summarised).
- `judges`: optional 1-5 judges (a local chat model, a local classifier, a Llama-Guard model, a HarmBench-style
  classifier or an OpenAI-compatible endpoint), each prompt not judged reported with its reason.

The public names of those modules are re-exported here (`scoring.logprob_margin`, ...). A test that patches a
private name patches it in the module that looks it up (e.g. ``safesub_core.scoring.logprobs._supports_branch_rows``),
never here.
"""
from __future__ import annotations

from safesub_core.scoring import names
from safesub_core.scoring.judges import (
    HARMBENCH_PROMPT,
    JUDGE_KINDS,
    JUDGE_RUBRIC,
    NOT_JUDGED_REASONS,
    Judge,
    JudgeResult,
    NotJudged,
    judge_scores,
    parse_score,
)
from safesub_core.scoring.live import LIVE_ARITH_TOKENS, live_forward_scores
from safesub_core.scoring.logprobs import (
    COMPLIANCE_OPENING,
    DEFAULT_REFUSAL_OPENINGS,
    REFUSAL_OPENING,
    OpeningTrie,
    answer_nll,
    continuation_logprobs,
    kl_to_reference,
    logprob_margin,
    refusal_logodds,
    shared_prefix_logprob_sums,
)
from safesub_core.scoring.reports import harmfulness_report, overrefusal_report, utility_report
from safesub_core.scoring.text import (CONVENTIONS, REFUSAL_MARKERS, exact_match, extract_answer, final_number,
                                      is_refusal, refusal_verdicts)

__all__ = [
    "COMPLIANCE_OPENING", "CONVENTIONS", "DEFAULT_REFUSAL_OPENINGS", "HARMBENCH_PROMPT", "JUDGE_KINDS", "JUDGE_RUBRIC",
    "LIVE_ARITH_TOKENS", "NOT_JUDGED_REASONS", "REFUSAL_MARKERS", "REFUSAL_OPENING", "Judge", "JudgeResult",
    "NotJudged", "OpeningTrie", "answer_nll", "continuation_logprobs", "exact_match", "extract_answer", "final_number",
    "harmfulness_report", "is_refusal", "judge_scores", "kl_to_reference", "live_forward_scores", "logprob_margin",
    "names", "overrefusal_report", "parse_score", "refusal_logodds", "refusal_verdicts",
    "shared_prefix_logprob_sums", "utility_report",
]
