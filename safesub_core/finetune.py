"""The small supervised fine-tuning loop the demo families are built with.

Contract:
- An example is a pair ``(prompt, response)``. The model sees ``format_prompt(tokenizer, prompt, chat)`` (the
  chat template with one user turn, or the raw prompt) followed by ``response`` and the EOS token; the two parts
  are tokenized separately (``add_special_tokens=False``), exactly as `generation.generate` sees a prompt.
- `sft`: loss on the response tokens (and EOS) only: labels are -100 on the prompt and on padding. Rows longer
  than ``cfg.max_length`` keep the end of the prompt and the start of the response.
- `pretrain`: plain language modelling of whole texts (BOS + text + EOS, loss on every real token).
- `sft_lora`: `sft` through a peft LoRA adapter (the base weights frozen); returns the `PeftModel`, whose
  ``save_pretrained`` writes an adapter directory.
- Optimiser AdamW (torch.optim), cosine schedule with linear warmup over ``warmup_ratio * steps`` steps,
  gradient clipping at 1.0, right padding. One step is one batch of ``batch_size`` rows taken in turn from
  seeded shuffles of the examples (one pass after another), so a seed fixes the run: ``torch.manual_seed(
  cfg.seed)`` is set first and the order comes from ``random.Random(cfg.seed)``. Results are bit-identical for
  a seed at a fixed thread count.
- ``progress(step, steps, loss)`` is called after every step when given. The model is left in eval mode.
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from peft import LoraConfig, get_peft_model
from transformers import get_cosine_schedule_with_warmup

from safesub_core.errors import SafesubError
from safesub_core.generation import format_prompt

Progress = Callable[[int, int, float], None]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneConfig:
    """Optimiser steps, peak learning rate, rows per step, warmup share of the steps, AdamW weight decay, the
    longest row in tokens, and the seed of the initialisation noise and the example order."""

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 16
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 128
    seed: int = 0


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise SafesubError("tokenizer: has no EOS token, which fine-tuning needs to end responses")
    return tokenizer.eos_token_id


def sft_rows(tokenizer, examples: Sequence[tuple[str, str]], max_length: int,
             chat: bool = True) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: prompt tokens labelled -100, response + EOS labelled with themselves."""
    eos = _eos(tokenizer)
    rows = []
    for prompt, response in examples:
        p = _ids(tokenizer, format_prompt(tokenizer, prompt, chat))
        r = _ids(tokenizer, response) + [eos]
        r = r[: max(1, max_length - min(len(p), max_length // 2))]
        p = p[-(max_length - len(r)):] if len(p) + len(r) > max_length else p
        rows.append((p + r, [-100] * len(p) + r))
    return rows


def lm_rows(tokenizer, texts: Sequence[str], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) for plain language modelling: BOS (if any) + text + EOS, truncated at the end."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = _eos(tokenizer)
    rows = []
    for text in texts:
        ids = (bos + _ids(tokenizer, text) + [eos])[:max_length]
        rows.append((ids, [-100] * len(bos) + ids[len(bos):]))
    return rows


def _batch(rows, pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def batches(n_rows: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless row indices per batch: seeded shuffles of the data, one pass after another (a batch may straddle
    two passes). Rows are not grouped by length: that would make harmful and benign rows land in different
    batches and hurt learning to tell them apart."""
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            perm = list(range(n_rows))
            rng.shuffle(perm)
            order += perm
        yield order[:batch_size]
        order = order[batch_size:]


def train_rows(model, rows, cfg: FinetuneConfig, pad_id: int, progress: Progress | None = None):
    """The loop itself: AdamW + cosine/warmup over `cfg.steps` seeded batches of `rows`. Returns the model."""
    if not rows:
        raise SafesubError("fine-tuning data: is empty")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise SafesubError(f"fine-tuning config: steps, batch_size and lr must be positive (got {cfg})")
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps)
    device = next(model.parameters()).device
    draw = batches(len(rows), cfg.batch_size, random.Random(cfg.seed))
    model.train()
    for step in range(1, cfg.steps + 1):
        idx = next(draw)
        input_ids, mask, labels = (t.to(device) for t in _batch([rows[i] for i in idx], pad_id))
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            progress(step, cfg.steps, loss.item())
    model.eval()
    return model


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def sft(model, tokenizer, examples: Sequence[tuple[str, str]], cfg: FinetuneConfig, chat: bool = True,
        progress: Progress | None = None):
    """Full fine-tuning on (prompt, response) pairs, loss on the response only. Trains `model` in place."""
    rows = sft_rows(tokenizer, examples, cfg.max_length, chat)
    return train_rows(model, rows, cfg, _pad_id(tokenizer), progress)


def pretrain(model, tokenizer, texts: Sequence[str], cfg: FinetuneConfig, progress: Progress | None = None):
    """Plain language-model training on whole texts (loss on every token). Trains `model` in place."""
    rows = lm_rows(tokenizer, texts, cfg.max_length)
    return train_rows(model, rows, cfg, _pad_id(tokenizer), progress)


def sft_lora(model, tokenizer, examples: Sequence[tuple[str, str]], cfg: FinetuneConfig, chat: bool = True,
             progress: Progress | None = None, r: int = 8, alpha: int = 16,
             target_modules: Sequence[str] = LORA_TARGETS):
    """`sft` through a LoRA adapter on `target_modules`; returns the PeftModel (wraps `model`, base frozen)."""
    torch.manual_seed(cfg.seed)  # the adapter's A matrices are drawn at random
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules),
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    return sft(peft_model, tokenizer, examples, cfg, chat, progress)
