"""Prompt formatting and batched greedy decoding.

Contract:
- `format_prompt(tokenizer, prompt, chat=True)`: the tokenizer's chat template with one user turn and the
  generation prompt when it has a template and `chat` is true, else the raw prompt text (the study used raw
  text). The demo families are trained with exactly this formatting.
- `generate(model, tokenizer, prompts, ...)`: greedy (deterministic) decoding in batches with *left* padding, so
  every prompt's last real token sits at position -1; returns the decoded continuations only. Prompts longer
  than the model's context are truncated from the left, and `GenerationResult.truncated` says which. The
  template's header (`template_header`) is run once per state of the weights and shared by the batch
  (`prefix.PromptBatch`); completions are the same as without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from safesub_core.errors import SafesubError
from safesub_core.prefix import PromptBatch, prefix_length, supports_prefix


def format_prompt(tokenizer, prompt: str, chat: bool = True) -> str:
    """The text the model sees for `prompt`: its chat template (one user turn) or the raw prompt."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


_HEADER_PROBE = "\x00probe\x00"


def template_header(tokenizer, chat: bool = True) -> list[int]:
    """Token ids of the formatted text before the user's message (the chat template's fixed opening: system
    prompt, user-turn marker); empty for raw prompts. Rows share at most this much (`prefix.prefix_length`)."""
    text = format_prompt(tokenizer, _HEADER_PROBE, chat)
    head = text[: text.find(_HEADER_PROBE)] if _HEADER_PROBE in text else ""
    return list(tokenizer(head, add_special_tokens=False)["input_ids"]) if head else []


def prepare_tokenizer(tokenizer):
    """Left padding and a pad token (the EOS token when the tokenizer has none) for batched decoding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SafesubError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: has neither a pad nor an EOS token")
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
    chat: bool = True,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Greedy completions of `prompts` (continuations only, special tokens stripped)."""
    if len(prompts) == 0:
        raise SafesubError("prompt set: is empty")
    prepare_tokenizer(tokenizer)
    device = next(model.parameters()).device
    budget = max(1, context_length(model) - max_new_tokens)
    completions: list[str] = []
    truncated: list[bool] = []
    header = template_header(tokenizer, chat) if supports_prefix(model) else []
    for start in range(0, len(prompts), batch_size):
        chunk = [format_prompt(tokenizer, p, chat) for p in prompts[start : start + batch_size]]
        rows, cut = encode_rows(tokenizer, chunk, budget)
        batch = PromptBatch.build(rows, tokenizer.pad_token_id, prefix_length(rows, header), device)
        new = batch.generate(model, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(new, skip_special_tokens=True)
        truncated += cut
        if progress:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    return GenerationResult(completions, truncated)
