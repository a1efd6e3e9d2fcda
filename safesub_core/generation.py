"""Prompt formatting and batched greedy decoding.

Contract:
- `PromptFormat(chat=True, system=None)`: how a prompt is put to a model. Every `chat=` parameter in safesub takes
  a bool (= `PromptFormat(chat)`) or a PromptFormat; only `format_prompt` and `template_header` read it
  (`prompt_format` normalises).
- `format_prompt(tokenizer, prompt, chat=True)`: the tokenizer's chat template with the generation prompt when it
  has a template and `chat` is true: a system turn holding `system` when one is given (else the template's own
  default, e.g. SmolLM2's "You are a helpful AI assistant named SmolLM..."), then one user turn; a template that
  rejects a system turn gets the system text prepended to the user's message, followed by a blank line. Else the
  raw prompt text (the study used raw text, without system prompt); a system prompt then comes first, on its own
  line: ``system + "\n" + prompt``. The demo families are trained with exactly this formatting (no system prompt).
- `generate(model, tokenizer, prompts, ...)`: greedy (deterministic) decoding in batches with *left* padding, so
  every prompt's last real token sits at position -1; returns the decoded continuations only. Prompts longer
  than the model's context are truncated from the left, and `GenerationResult.truncated` says which. The
  template's header (`template_header`) is run once per state of the weights and shared by the batch
  (`prefix.PromptBatch`); completions are the same as without it.
- `greedy_answers(model, tokenizer, prompts, max_new_tokens, draft=...)`: the same greedy answers, defined as
  the fixed point of one batched forward pass and checked by it. With T = max_new_tokens, prompt x_i and answer
  y_i (T tokens, padding after its first EOS), the pass F runs every row x_i + y_i[:T-1] at once and takes the
  argmax at the last T positions; y is the answer iff F(y)_t = y_t for every t up to the first EOS. Position t
  depends on tokens before it only (causal attention; the pass's shape is fixed by the prompts and T), so the
  fixed point is unique and found from any draft: check it with one pass; a row that differs first at t keeps
  y_<t and F(y)_t, which is right, and takes F's later tokens as its next draft (a changed number in an
  arithmetic answer is usually followed by the same words); where a second check fails too, or the first one
  fails for most rows, the row is re-drafted after its difference by incremental decoding (`generate`'s path).
  Each round fixes at least one more token per row, so there are at most T + 1 passes, and the answer does not
  depend on the draft. A row that held is done (rows do not see each other): later checks run the others only.
  A draft that holds (a slider's previous point) costs one pass instead of T sequential ones. Incremental
  decoding and F round differently, so the two agree except where two logits tie to rounding.
  The first check may come from elsewhere (`checked=`): `scoring.live_forward_scores` runs the draft as a branch
  of its arithmetic rows, so on a slider a draft that holds costs no pass of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from safesub_core.errors import SafesubError
from safesub_core.prefix import PromptBatch, accepts as prefix_accepts, prefix_length, supports_prefix


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt is put to a model: through the chat template (`chat`) or as raw text, with an optional
    system prompt (`system`; None: none, or the template's default)."""

    chat: bool = True
    system: str | None = None

    def __post_init__(self):
        if self.system is not None and not isinstance(self.system, str):
            raise SafesubError(f"system prompt {self.system!r}: is not a string")


def prompt_format(chat: "bool | PromptFormat") -> PromptFormat:
    """`chat` as a PromptFormat: a PromptFormat as is, a bool (or anything truthy) as `PromptFormat(bool(chat))`."""
    return chat if isinstance(chat, PromptFormat) else PromptFormat(bool(chat))


def format_prompt(tokenizer, prompt: str, chat: "bool | PromptFormat" = True) -> str:
    """The text the model sees for `prompt`: its chat template (an optional system turn, one user turn) or the raw
    prompt (the system prompt, if any, on its own line before it)."""
    fmt = prompt_format(chat)
    if fmt.chat and getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        if fmt.system is None:
            return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        try:
            return tokenizer.apply_chat_template([{"role": "system", "content": fmt.system}] + user, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception:  # a template without a system role (it raises): the system text opens the user turn
            user = [{"role": "user", "content": f"{fmt.system}\n\n{prompt}"}]
            return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    return prompt if fmt.system is None else f"{fmt.system}\n{prompt}"


_HEADER_PROBE = "\x00probe\x00"


def template_header(tokenizer, chat: "bool | PromptFormat" = True) -> list[int]:
    """Token ids of the formatted text before the user's message (the chat template's fixed opening: system
    prompt, user-turn marker; for raw prompts the system line, if any); empty for raw prompts without one. Rows
    share at most this much (`prefix.prefix_length`)."""
    text = format_prompt(tokenizer, _HEADER_PROBE, chat)
    head = text[: text.find(_HEADER_PROBE)] if _HEADER_PROBE in text else ""
    return list(tokenizer(head, add_special_tokens=False)["input_ids"]) if head else []


def prepare_tokenizer(tokenizer):
    """Left padding and a pad token (the EOS token when the tokenizer has none) for batched decoding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            name = getattr(tokenizer, "name_or_path", "")
            raise SafesubError(f"tokenizer {name!r}: has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def context_length(model) -> int:
    """The longest input the model accepts (max_position_embeddings), or 2048 when the config says nothing."""
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def encode_rows(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of already formatted texts, each cut to its last `max_length` tokens; (rows, truncated flags)."""
    prepare_tokenizer(tokenizer)
    rows = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    truncated = [len(x) > max_length for x in rows]
    rows = [x[-max_length:] for x in rows]
    if any(len(x) == 0 for x in rows):
        raise SafesubError("prompt set: contains an empty prompt")
    return rows, truncated


def encode_batch(tokenizer, texts: Sequence[str], max_length: int, device) -> tuple[dict, list[bool]]:
    """Left-padded, left-truncated batch of already formatted texts; returns (tensors, truncated flags)."""
    rows, truncated = encode_rows(tokenizer, texts, max_length)
    batch = PromptBatch.build(rows, tokenizer.pad_token_id, 0, device)
    return {"input_ids": batch.ids, "attention_mask": batch.mask}, truncated


@dataclass
class GenerationResult:
    completions: list[str]
    truncated: list[bool]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    chat: "bool | PromptFormat" = True,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Greedy completions of `prompts` (continuations only, special tokens stripped)."""
    all_rows, truncated, header, device = _answer_rows(model, tokenizer, prompts, max_new_tokens, chat)
    completions: list[str] = []
    for start in range(0, len(all_rows), batch_size):
        rows = all_rows[start : start + batch_size]
        batch = PromptBatch.build(rows, tokenizer.pad_token_id, prefix_length(rows, header), device)
        new = batch.generate(model, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(new, skip_special_tokens=True)
        if progress:
            progress(min(start + batch_size, len(all_rows)), len(all_rows))
    return GenerationResult(completions, truncated)


def _answer_rows(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, chat: "bool | PromptFormat"):
    """(rows, truncated, header, device): the formatted prompts' token ids, each cut from the left to leave room
    for `max_new_tokens` in the model's context, the template header the rows may share, the model's device."""
    if len(prompts) == 0:
        raise SafesubError("prompt set: is empty")
    prepare_tokenizer(tokenizer)
    rows, truncated = encode_rows(tokenizer, [format_prompt(tokenizer, p, chat) for p in prompts],
                                  max(1, context_length(model) - max_new_tokens))
    header = template_header(tokenizer, chat) if supports_prefix(model) else []
    return rows, truncated, header, next(model.parameters()).device


@dataclass
class GreedyAnswers:
    tokens: torch.Tensor  # (n, T) the answers' tokens, padding after each row's first EOS
    completions: list[str]  # the answers decoded, special tokens stripped
    passes: int  # checking passes run (1: the draft held)
    drafted: int  # rows decoded incrementally to make or mend a draft


def _first_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(n,) index of each row's first EOS, or T - 1 (the last position) where there is none."""
    hit = tokens == eos_id
    return torch.where(hit.any(1), hit.int().argmax(1), tokens.shape[1] - 1)


def _pad_after_eos(tokens: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    end = _first_eos(tokens, eos_id)
    return tokens.masked_fill(torch.arange(tokens.shape[1])[None, :] > end[:, None], pad_id)


def _decode_from(model, rows: list[list[int]], header: Sequence[int], n_new: int, pad_id: int,
                 eos_id: int) -> torch.Tensor:
    """(len(rows), n_new) greedy continuations of token rows, incrementally (padding after EOS)."""
    batch = PromptBatch.build(rows, pad_id, prefix_length(rows, header), next(model.parameters()).device)
    new = batch.generate(model, max_new_tokens=n_new, do_sample=False, pad_token_id=pad_id,
                         eos_token_id=eos_id if eos_id >= 0 else None)
    out = torch.full((len(rows), n_new), pad_id, dtype=torch.long)
    out[:, : new.shape[1]] = new.cpu()
    return _pad_after_eos(out, eos_id, pad_id)


@torch.no_grad()
def greedy_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    chat: "bool | PromptFormat" = True,
    draft: torch.Tensor | None = None,
    checked: torch.Tensor | None = None,
) -> GreedyAnswers:
    """Greedy answers of `max_new_tokens` tokens as the fixed point of one batched pass (see the module
    docstring): `draft` (n, T) is any guess (a previous point's `tokens`), None to decode one incrementally;
    `checked` (n, T), the draft's first check F(draft) when a pass has already run it (`scoring.live_forward_scores`
    does, beside the forward scores): then a draft that holds costs no pass here."""
    rows, _, header, device = _answer_rows(model, tokenizer, prompts, max_new_tokens, chat)
    T, n = max_new_tokens, len(prompts)
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1  # -1: no row ever stops
    P = prefix_length(rows, header)
    if draft is None or tuple(draft.shape) != (n, T):
        y, drafted = _decode_from(model, rows, header, T, pad_id, eos_id), n
    else:
        y, drafted = _pad_after_eos(draft.to(torch.long).cpu(), eos_id, pad_id), 0
    if drafted or checked is None or tuple(checked.shape) != (n, T):
        checked = None
    todo = list(range(n))  # rows not yet checked to hold (a row's check depends on its own tokens only)
    for passes in range(1, T + 2):
        if passes == 1 and checked is not None:
            f = checked.to(torch.long).cpu()
        else:
            batch = PromptBatch.build([rows[i] + y[i, : T - 1].tolist() for i in todo], pad_id, P, device)
            kwargs = {"logits_to_keep": T} if prefix_accepts(model, "logits_to_keep") else {}
            f = y.clone()
            f[todo] = batch.forward(model, **kwargs).logits[:, -T:].argmax(-1).cpu()  # (n, T): F(y)
        t = torch.arange(T)[None, :]
        wrong = (f != y) & (t <= _first_eos(y, eos_id)[:, None])
        if not wrong.any():
            break
        todo = bad = wrong.any(1).nonzero()[:, 0].tolist()
        first = wrong.int().argmax(1)
        for i in bad:  # keep the agreed tokens and F's from the first difference on (F's first one is right)
            y[i, first[i]:] = f[i, first[i]:]
        mend = [i for i in bad if first[i] < T - 1 and y[i, first[i]] != eos_id]
        y = _pad_after_eos(y, eos_id, pad_id)
        if mend and (passes > 1 or 2 * len(bad) > n):  # decode after the difference where F's later tokens did
            # not hold either, or where most answers changed (F's tokens after a changed answer rarely hold then)
            k0 = min(int(first[i]) for i in mend)
            cont = _decode_from(model, [rows[i] + y[i, : first[i] + 1].tolist() for i in mend], header,
                                T - k0 - 1, pad_id, eos_id)
            for j, i in enumerate(mend):
                y[i, first[i] + 1:] = cont[j, : T - first[i] - 1]
            drafted += len(mend)
            y = _pad_after_eos(y, eos_id, pad_id)
    else:  # pragma: no cover - each round fixes a token per row; T + 1 rounds always suffice
        raise SafesubError(f"greedy answers: no fixed point after {T + 1} passes")
    return GreedyAnswers(y, tokenizer.batch_decode(y, skip_special_tokens=True), passes, drafted)
