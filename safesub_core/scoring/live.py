"""The live fast path: what a slider move recomputes, the three forward-pass scores of `scoring.logprobs` and the
check of a draft of the greedy answers, in two passes (docs/method.md, "Scores").

`live_forward_scores` returns the same numbers as `refusal_logodds`, `answer_nll` and `kl_to_reference` (to float
rounding; tests/test_scoring.py holds the equivalence tests) and falls back to those three functions for models that
cannot run branch rows. `LIVE_ARITH_TOKENS`: the greedy tokens of the live arithmetic exact match.
"""
from __future__ import annotations

from typing import Sequence

import torch

from safesub_core.errors import SafesubError
from safesub_core.generation import PromptFormat, context_length, template_header
from safesub_core.prefix import PromptBatch, accepts as _accepts, prefix_length, supports_prefix
from safesub_core.scoring import names
from safesub_core.scoring.logprobs import (
    DEFAULT_REFUSAL_OPENINGS,
    OpeningTrie,
    _branch_logprobs,
    _clip_prompts,
    _cont_ids,
    _device,
    _eval_mode,
    _fit,
    _kl,
    _note_cut,
    _pad_id,
    _prompt_ids,
    _supports_branch_rows,
    answer_nll,
    kl_to_reference,
    refusal_logodds,
)

LIVE_ARITH_TOKENS = 12  # greedy tokens of the live arithmetic exact match (arith_exact_match)


def _supports_shared_prefix(model) -> bool:
    return supports_prefix(model) and _accepts(model, "logits_to_keep")


@torch.no_grad()
def live_forward_scores(
    model,
    ref_model,
    tokenizer,
    harmful,
    utility,
    references: Sequence[str],
    benign,
    chat: "bool | PromptFormat" = True,
    ref_cache: dict | None = None,
    notes: list[str] | None = None,
    drafts: torch.Tensor | None = None,
    openings: Sequence[str] = DEFAULT_REFUSAL_OPENINGS,
) -> dict[str, torch.Tensor]:
    """`refusal_logodds` with `openings` on `harmful` (n_h,), `answer_nll` on `utility` and its `references`
    (n_u,) and `kl_to_reference` on `benign` (n_b,), keyed margin, nll and kl: what a slider move recomputes, in
    two passes.

    One pass runs the harmful and the arithmetic prompts, each row with its continuations as branches
    (`prefix.PromptBatch`): the refusal openings' trie leaves; the reference answer and, given `drafts`
    (n_u, T) (a guess at the greedy answers, e.g. a nearby point's), the draft. The draft's check comes back as
    'checked' (n_u, T): the model's greedy token after each prefix of the draft (`generation.greedy_answers`'
    fixed-point test, so the exact match often needs no pass of its own). A second pass runs the benign prompts;
    `ref_cache` as in `kl_to_reference`: the reference model's logits on them are computed once. The numbers are the
    three functions' to float rounding. Models that cannot run branch rows get the three functions and no check.
    Any one or two of the three sets may be empty (a wave of live scoring past the end of a shorter set): its scores
    are then empty tensors and no pass runs for it.
    """
    harmful, utility, benign = (list(getattr(x, "prompts", x)) for x in (harmful, utility, benign))
    if not (harmful or utility or benign):
        raise SafesubError("live scores: the harmful, utility and benign prompts are all empty")
    none = torch.empty(0)
    if not (_supports_branch_rows(model) and _supports_shared_prefix(ref_model)):
        return {names.MARGIN: refusal_logodds(model, tokenizer, harmful, openings, chat=chat, notes=notes)
                if harmful else none,
                names.NLL: answer_nll(model, tokenizer, utility, references, chat=chat, notes=notes)
                if utility else none,
                names.KL: kl_to_reference(model, ref_model, tokenizer, benign, chat=chat, notes=notes,
                                          ref_cache=ref_cache) if benign else none}
    references = [str(r) for r in references]
    if len(references) != len(utility):
        raise SafesubError(f"prompt set: {len(utility)} prompts but {len(references)} references")
    limit = min(context_length(model), context_length(ref_model))
    pad_id, device, header = _pad_id(tokenizer), _device(model), template_header(tokenizer, chat)
    trie = OpeningTrie(tokenizer, openings)
    h_rows = _clip_prompts(_prompt_ids(tokenizer, harmful, chat, notes), max(1, limit - trie.longest), limit, notes)
    u_ids = _prompt_ids(tokenizer, utility, chat, notes)
    fitted = [_fit(p, _cont_ids(tokenizer, r, "reference answer"), limit) for p, r in zip(u_ids, references)]
    _note_cut(notes, sum(cut for *_, cut in fitted), len(fitted), limit)
    scored = [trie.leaves] * len(h_rows) + [[a] for _, a, _ in fitted]  # the continuations whose log-probs count
    T = 0 if drafts is None else drafts.shape[1]
    check = (drafts is not None and drafts.shape[0] == len(u_ids) and all(len(p) + T <= limit for p in u_ids)
             and not any(cut for *_, cut in fitted))
    # the draft runs where `greedy_answers` would check it, after the whole prompt: a branch after the reference
    conts = scored[:len(h_rows)] + [c + [d] for c, d in zip(scored[len(h_rows):], drafts.long().tolist())] if check \
        else scored
    b_rows = _clip_prompts(_prompt_ids(tokenizer, benign, chat, notes), limit, limit, notes)
    rows = h_rows + [p for p, _, _ in fitted]
    H = len(h_rows)
    with _eval_mode(model, ref_model):
        out = {names.MARGIN: none, names.NLL: none, names.KL: none}
        if rows:
            batch = PromptBatch.build(rows, pad_id, prefix_length(rows, header), device,
                                      branches=[[c[:-1] for c in cs] for cs in conts], share=True)
            spans = batch.branch_logits(batch.forward(model, logits_to_keep=batch.tail).logits)
            lps = _branch_logprobs(spans[H:], scored[H:])  # (a row's draft, its last branch, is not scored)
            if H:
                out[names.MARGIN] = trie.logodds_of_rows(spans[:H])
            if lps:
                out[names.NLL] = torch.stack([-row[0].mean() for row in lps])
            if check and lps:  # the draft's branch: the greedy token after each of its prefixes, F(draft)
                out[names.CHECKED] = torch.stack([row[1].argmax(-1) for row in spans[H:]]).cpu()
        if not b_rows:
            return out
        b_batch = PromptBatch.build(b_rows, pad_id, prefix_length(b_rows, header), device)
        lm = b_batch.forward(model, logits_to_keep=1).logits[:, -1].float()
        key = ("live", tuple(map(tuple, b_rows)))
        ref = None if ref_cache is None else ref_cache.get(key)
        if ref is None:
            ref = b_batch.forward(ref_model, logits_to_keep=1).logits[:, -1].float().to(lm.device)
            if ref_cache is not None:
                ref_cache[key] = ref
        out[names.KL] = _kl(ref, lm).cpu()
        return out

