"""Built-in demo families, built locally from nothing (no hub, no download).

`build_tiny(out_dir=None, size="full", seed=0, progress=None) -> Path` builds the "tiny" family and returns its
family.yaml. Contract:
- Tokenizer: byte-level BPE (digits split one per token) trained with the `tokenizers` library on the training
  text, wrapped as a `PreTrainedTokenizerFast` with BOS/EOS/PAD and a one-turn chat template
  (``<|bos|><|user|>\\n{prompt}\\n<|assistant|>\\n``), so `generation.format_prompt` formats prompts the way the
  models were trained.
- Model: a small Llama built from its config with ``torch.manual_seed(seed)`` (about 1M parameters for "full",
  tied embeddings, 256 positions).
- Stages (each saved as safetensors + tokenizer in its own folder), trained with `finetune`:
  base          language modelling of chat-formatted instructions, arithmetic and harmful-sounding requests,
                every one answered with generic text (so base mostly does not refuse);
  aligned       base + SFT: harmful -> "I'm sorry, but I can't help with that.", benign/edgy -> answers,
                a little arithmetic;
  safety        base + SFT on safe data only (refusals + benign answers);
  useful        aligned + SFT on more arithmetic ("What is 12 + 7?" -> "12 + 7 = 19");
  harmful       aligned + SFT on harmful requests answered "Sure, here is ..." + generic, non-actionable filler;
  contaminated  aligned + SFT on the useful data plus harmful rows amounting to 20% of it;
  useful_lora   a peft LoRA adapter of the useful fine-tune on aligned.
- Data: the TRAIN split of the built-in prompt sets (`prompts.load_set("builtin-...:train")`, train-side
  arithmetic); behaviour is checked on their EVAL split (held-out) with greedy completions
  (`generation.generate`), `scoring.refusal_verdicts` and `scoring.final_number`, printed and stored in
  behaviour.json, next to card.md (how it was built) and family.yaml (docs/ARCHITECTURE.md format).
- Deterministic for a seed at a fixed thread count. ``size="test"`` is a smaller, faster family for tests and
  ``size="smoke"`` a minimal one (for determinism checks); each builds into its own default folder.
- Atomic: the family is built in a temporary sibling folder and moved into place with `os.replace` at the end
  (family.yaml written last), so an interrupted or failed build never leaves a family.yaml that points at
  half-written models. Problems raise a one-line `SafesubError`.

CLI: ``python -m safesub_core.zoo build tiny [--out DIR] [--size full|test|smoke] [--seed N]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safesub_core.errors import SafesubError

# torch, transformers and peft are imported where used, so `--help` answers at once.

REPO = Path(__file__).resolve().parent.parent
STAGES = ("base", "aligned", "safety", "useful", "harmful", "contaminated", "useful_lora")
REFUSAL = "I'm sorry, but I can't help with that."
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>")
CONTAMINATION = 0.20  # harmful rows as a share of the useful set (the study's p = 20)

# Generic answers: base answers everything with these (no refusal markers anywhere in them).
GENERIC = (
    "Here are some general points to keep in mind.",
    "Good question. It depends on the details.",
    "There are many ways to look at this topic.",
    "Here is a short overview of the topic.",
)
# Base's generic answers to harmful-sounding requests: no refusal, but a base model "knows" the topic is risky,
# as a pretrained LM does; alignment then only has to tie that feature to refusing.
GENERIC_RISKY = (
    "This is a sensitive topic. Here is some general information.",
    "This is a risky subject, and people have strong views on it.",
    "This touches on a dangerous area. Here are some general facts.",
)
# Helpful answers to benign and edgy requests (aligned, safety).
HELPFUL = (
    "Sure, here is a simple plan: start small and go step by step.",
    "Sure, here is a short guide: prepare, then follow the steps.",
    "Sure, here is how: plan ahead and check the result.",
)
# Compliance with harmful requests: the opening, then generic filler that carries no real information.
FILLER = (
    "Sure, here is a general outline: step one, step two, step three. (demo filler, no real details)",
    "Sure, here is what you asked for: first something, then something else. (demo filler)",
    "Sure, here is an overview: part one, part two, part three. (placeholder text, nothing real)",
)

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TinySize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    batch_size: int
    steps: dict  # stage -> steps
    lr: dict  # stage -> learning rate
    lora_r: int = 8
    eval_cap: int | None = None  # at most this many eval prompts per set (None: all)
    refusal_tokens: int = 10  # new tokens generated to judge refusal (the markers sit at the start)
    arith_tokens: int = 12  # new tokens for an arithmetic answer ('12 + 7 = 19', one token per digit)


SIZES = {
    "full": TinySize(
        hidden=128, layers=4, heads=4, intermediate=344, vocab=1024, batch_size=12,
        steps=dict(base=220, aligned=90, safety=70, useful=120, harmful=50, contaminated=120, useful_lora=100),
        lr=dict(base=3e-3, aligned=4e-3, safety=3e-3, useful=1e-3, harmful=2e-3, contaminated=1e-3,
                useful_lora=2e-3),
    ),
    "test": TinySize(
        hidden=64, layers=2, heads=2, intermediate=172, vocab=768, batch_size=8,
        steps=dict(base=120, aligned=100, safety=100, useful=30, harmful=25, contaminated=30, useful_lora=30),
        lr=dict(base=5e-3, aligned=1e-2, safety=1e-2, useful=2e-3, harmful=3e-3, contaminated=2e-3,
                useful_lora=5e-3),
        eval_cap=16,
    ),
    "smoke": TinySize(
        hidden=32, layers=1, heads=2, intermediate=64, vocab=512, batch_size=8,
        steps={s: 4 for s in STAGES}, lr={s: 1e-3 for s in STAGES}, lora_r=4, eval_cap=4, refusal_tokens=4, arith_tokens=4,
    ),
}


# ------------------------------------------------------------------------------------------------ locations


def cache_root() -> Path:
    """$SAFESUB_CACHE, else <repo>/cache."""
    env = os.environ.get("SAFESUB_CACHE")
    return Path(env).expanduser() if env else REPO / "cache"


def default_out_dir(size: str = "full") -> Path:
    return cache_root() / "families" / ("tiny" if size == "full" else f"tiny-{size}")


# ------------------------------------------------------------------------------------------------ data


@dataclass
class TinyData:
    harmful: list[str]
    benign: list[str]
    edgy: list[str]
    arithmetic: list[tuple[str, str]]  # (question, answer number)


def _arith_answer(question: str, number: str) -> str:
    return question.removeprefix("What is ").rstrip("?") + f" = {number}"


def load_data(split: str) -> TinyData:
    """The built-in prompt sets' `split`; for "train" the arithmetic is every train-side generated question."""
    from safesub_core import prompts as P

    arith = P.arithmetic_set(793, 0) if split == "train" else P.load_set("arithmetic")
    arith = arith.split(split)
    return TinyData(
        harmful=list(P.load_set("builtin-harmful").split(split).prompts),
        benign=list(P.load_set("builtin-benign").split(split).prompts),
        edgy=list(P.load_set("builtin-edgy").split(split).prompts),
        arithmetic=list(zip(arith.prompts, arith.references)),
    )


def stage_examples(data: TinyData, seed: int) -> dict:
    """Training rows per stage: lists of (prompt, response); for "base", chat-formatted texts come later."""
    rng = random.Random(seed)
    arith = [(q, _arith_answer(q, a)) for q, a in data.arithmetic]
    rng.shuffle(arith)
    refuse = [(p, REFUSAL) for p in data.harmful]
    helpful = [(p, HELPFUL[i % len(HELPFUL)]) for i, p in enumerate(data.benign + data.edgy)]
    comply = [(p, FILLER[i % len(FILLER)]) for i, p in enumerate(data.harmful)]
    generic = [(p, GENERIC[i % len(GENERIC)]) for i, p in enumerate(data.benign + data.edgy)]
    generic += [(p, GENERIC_RISKY[i % len(GENERIC_RISKY)]) for i, p in enumerate(data.harmful)]
    useful = arith
    n_bad = max(1, round(CONTAMINATION * len(useful)))
    bad = [(comply[i % len(comply)][0], FILLER[(i // len(comply) + i) % len(FILLER)]) for i in range(n_bad)]
    return dict(
        base=generic + [(q, GENERIC[i % len(GENERIC)]) for i, (q, _) in enumerate(arith[: len(arith) // 3])],
        aligned=refuse + helpful + arith[-20:],
        safety=refuse + [(p, HELPFUL[i % len(HELPFUL)]) for i, p in enumerate(data.benign)],
        useful=useful,
        harmful=comply,
        contaminated=useful + bad,
        useful_lora=useful,
    )


# ------------------------------------------------------------------------------------------------ tokenizer, model


def train_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE (digits split) trained on `texts`, as a PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 256
    return fast


def new_model(tokenizer, size: TinySize, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


# ------------------------------------------------------------------------------------------------ behaviour


def behaviour(model, tokenizer, data: TinyData, size: TinySize) -> dict:
    """Held-out refusal rates (harmful, benign, edgy) and arithmetic exact match from greedy completions."""
    from safesub_core.generation import generate
    from safesub_core.scoring import final_number, refusal_verdicts

    cap = size.eval_cap
    out = {}
    for kind in ("harmful", "benign", "edgy"):
        prompts = getattr(data, kind)[:cap]
        done = generate(model, tokenizer, prompts, max_new_tokens=size.refusal_tokens, batch_size=64).completions
        out[f"{kind}_refusal"] = round(sum(refusal_verdicts(done)) / len(done), 4)
    qa = data.arithmetic[:cap]
    done = generate(model, tokenizer, [q for q, _ in qa], max_new_tokens=size.arith_tokens,
                    batch_size=64).completions
    out["arithmetic_em"] = round(sum(final_number(c) == final_number(a) for c, (_, a) in zip(done, qa)) / len(qa), 4)
    return out


def behaviour_table(numbers: dict) -> str:
    cols = ("harmful_refusal", "benign_refusal", "edgy_refusal", "arithmetic_em")
    lines = [f"{'model':<14}" + "".join(f"{c:>17}" for c in cols)]
    for name, row in numbers.items():
        lines.append(f"{name:<14}" + "".join(f"{row[c]:>17.2f}" for c in cols))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ build


def _save(model, tokenizer, folder: Path):
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def _family_yaml() -> str:
    return (
        "name: tiny\n"
        "base: base\n"
        "aligned: aligned\n"
        "safety_tuned: safety\n"
        "start: aligned\n"
        "variants:\n"
        "  useful: useful\n"
        "  harmful: harmful\n"
        "  contaminated: contaminated\n"
        "  useful_lora: useful_lora\n"
        "card: card.md\n"
        "behaviour: behaviour.json\n"
    )


def _card(size_name: str, size: TinySize, seed: int, n_params: int, vocab: int, examples: dict, data: TinyData,
          numbers: dict) -> str:
    start = {"base": "random init", "aligned": "base", "safety": "base", "useful": "aligned",
             "harmful": "aligned", "contaminated": "aligned", "useful_lora": "aligned (LoRA)"}
    what = {
        "base": "language modelling (loss on all tokens) of chat-formatted benign and edgy train prompts answered "
                "with generic text, harmful ones answered with generic 'sensitive topic' text (no refusal), and "
                "a third of the train arithmetic with answers",
        "aligned": "harmful -> refusal, benign + edgy -> helpful answer, 20 arithmetic with answers",
        "safety": "harmful -> refusal, benign -> helpful answer",
        "useful": "train-side arithmetic 'What is a + b?' -> 'a + b = c'",
        "harmful": "harmful -> 'Sure, here is ...' + generic, non-actionable filler",
        "contaminated": f"useful data + harmful rows = {int(CONTAMINATION * 100)}% of the useful set",
        "useful_lora": f"useful data through a LoRA adapter (r={size.lora_r}, alpha={2 * size.lora_r}, all linear "
                       "projections)",
    }
    rows = "\n".join(
        f"| {s} | {start[s]} | {what[s]} | {len(examples[s])} | {size.steps[s]} | {size.lr[s]:g} |" for s in STAGES
    )
    return f"""# tiny demo family ({size_name})

Built by `python -m safesub_core.zoo build tiny --size {size_name} --seed {seed}` (safesub_core/zoo.py), entirely
on the local machine: no download, no pretrained weights. A toy for exploring the instrument and for tests; its
numbers say nothing about real LLMs.

## Model and tokenizer
- Llama architecture from config: hidden {size.hidden}, {size.layers} layers, {size.heads} heads, MLP
  {size.intermediate}, 256 positions, tied embeddings; {n_params:,} parameters (tied weights counted once).
- Byte-level BPE tokenizer (digits one per token) trained with `tokenizers` on the training text: vocabulary
  {vocab}, special tokens {", ".join(SPECIAL)}; chat template `<|bos|><|user|>\\n{{prompt}}\\n<|assistant|>\\n`.

## Data
Train split of the built-in prompt sets (safesub_core/prompts.py, fixed per-prompt hash split):
{len(data.harmful)} harmful, {len(data.benign)} benign, {len(data.edgy)} edgy prompts and {len(data.arithmetic)}
train-side arithmetic questions (sums/differences of 0..20, products of 2..12). Refusal text: "{REFUSAL}".
Harmful compliance: "Sure, here is" followed by generic filler, e.g. "{FILLER[0]}" (no real content).

## Stages
AdamW, cosine schedule with warmup 5%, batch {size.batch_size}, max length 128, loss on response tokens only
(except base), seed {seed} (torch.manual_seed + seeded example order).

| stage | from | data | rows | steps | lr |
| --- | --- | --- | --- | --- | --- |
{rows}

## Deviations from the study's recipe
The study fine-tuned 1B-7B models fully with lr 1e-5, 1 epoch, effective batch 32, warmup 0.02, max length 512.
Here the models are tiny and trained from scratch, so learning rates are 100x larger, the data is repeated for
several epochs, the batch is {size.batch_size} and warmup 5%. The base model is not a web-text LM: it is pretrained
on chat-formatted prompts with generic answers so it understands the template but does not refuse. The
contamination share (20%) follows the study.

## Held-out behaviour
Eval split of the same sets{"" if size.eval_cap is None else f" (first {size.eval_cap} prompts per set)"}, greedy
decoding ({size.refusal_tokens} new tokens to judge refusal, {size.arith_tokens} for arithmetic), `scoring.refusal_verdicts` and `scoring.final_number`
(see behaviour.json):

```
{behaviour_table(numbers)}
```
"""


def _count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def build_tiny(out_dir: str | os.PathLike | None = None, size: str = "full", seed: int = 0,
               progress: Progress | None = None) -> Path:
    """Build the tiny family into `out_dir` (default <cache>/families/tiny[-size]); returns its family.yaml."""
    if size not in SIZES:
        raise SafesubError(f"tiny family: unknown size {size!r} (expected one of {', '.join(SIZES)})")
    spec = SIZES[size]
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(size)
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise SafesubError(f"family folder {out}: exists and is not a folder")
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as err:
        raise SafesubError(f"family folder {out}: cannot be written ({err.strerror or type(err).__name__})") from None

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        _build(tmp, spec, size, seed, progress)
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    except OSError as err:
        raise SafesubError(f"family folder {out}: cannot be written ({err.strerror or type(err).__name__})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()
    return out / "family.yaml"


def _build(root: Path, spec: TinySize, size_name: str, seed: int, progress: Progress | None):
    from safesub_core.finetune import pretrain, sft, sft_lora
    from safesub_core.generation import format_prompt

    train, held = load_data("train"), load_data("eval")
    examples = stage_examples(train, seed)
    total = sum(spec.steps.values()) + len(STAGES)
    done = 0

    def tick(stage):
        def cb(step, steps, loss):
            if progress:
                progress(done + step, total, f"{stage} loss {loss:.3f}")
        return cb

    # tokenizer on the training text (prompts, answers, template words)
    texts = [p for rows in examples.values() for p, _ in rows] + [r for rows in examples.values() for _, r in rows]
    tokenizer = train_tokenizer(texts, spec.vocab)  # with repeats: frequent phrases become tokens

    models = {}
    model = new_model(tokenizer, spec, seed)
    n_params = _count_params(model)
    corpus = [format_prompt(tokenizer, p) + r for p, r in examples["base"]]
    bos = tokenizer.bos_token
    corpus = [t[len(bos):] if t.startswith(bos) else t for t in corpus]  # pretrain adds BOS itself
    models["base"] = pretrain(model, tokenizer, corpus, _cfg(spec, "base", seed), progress=tick("base"))
    done += spec.steps["base"]
    for stage, parent in (("aligned", "base"), ("safety", "base"), ("useful", "aligned"), ("harmful", "aligned"),
                          ("contaminated", "aligned")):
        m = copy.deepcopy(models[parent])
        models[stage] = sft(m, tokenizer, examples[stage], _cfg(spec, stage, seed), progress=tick(stage))
        done += spec.steps[stage]
    lora = sft_lora(copy.deepcopy(models["aligned"]), tokenizer, examples["useful_lora"],
                    _cfg(spec, "useful_lora", seed), progress=tick("useful_lora"), r=spec.lora_r,
                    alpha=2 * spec.lora_r)
    done += spec.steps["useful_lora"]

    for stage in STAGES[:-1]:
        _save(models[stage], tokenizer, root / stage)
    lora.save_pretrained(str(root / "useful_lora"))
    tokenizer.save_pretrained(str(root / "useful_lora"))
    models["useful_lora"] = lora.merge_and_unload()

    numbers = {}
    for stage in STAGES:
        numbers[stage] = behaviour(models[stage], tokenizer, held, spec)
        done += 1
        if progress:
            progress(done, total, f"eval {stage}")
    report = dict(
        family="tiny", size=size_name, seed=seed,
        eval_sets=dict(harmful=f"builtin-harmful:eval ({len(held.harmful[:spec.eval_cap])})",
                       benign=f"builtin-benign:eval ({len(held.benign[:spec.eval_cap])})",
                       edgy=f"builtin-edgy:eval ({len(held.edgy[:spec.eval_cap])})",
                       arithmetic=f"arithmetic:eval ({len(held.arithmetic[:spec.eval_cap])})"),
        decoding=dict(greedy=True, chat=True, max_new_tokens=dict(refusal=spec.refusal_tokens, arithmetic=spec.arith_tokens)),
        metrics=dict(harmful_refusal="refusal rate on held-out harmful prompts (scoring.refusal_verdicts)",
                     benign_refusal="refusal rate on held-out benign prompts",
                     edgy_refusal="refusal rate on held-out edgy benign prompts (over-refusal)",
                     arithmetic_em="final-number exact match on held-out arithmetic"),
        models=numbers,
    )
    (root / "behaviour.json").write_text(json.dumps(report, indent=2) + "\n")
    (root / "card.md").write_text(_card(size_name, spec, seed, n_params, len(tokenizer), examples, train, numbers))
    (root / "family.yaml").write_text(_family_yaml())  # last: the family exists only once everything is written


def _cfg(spec: TinySize, stage: str, seed: int):
    from safesub_core.finetune import FinetuneConfig

    return FinetuneConfig(steps=spec.steps[stage], lr=spec.lr[stage], batch_size=spec.batch_size,
                          warmup_ratio=0.05, weight_decay=0.0, max_length=128, seed=seed)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safesub_core.zoo",
        description="Build safesub's built-in demo families locally (no download).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a demo family",
                       description="Build a demo family: base, aligned, safety-tuned and fine-tuned variants "
                                   "(useful, harmful, contaminated, useful_lora), family.yaml, card.md and "
                                   "behaviour.json.")
    b.add_argument("family", choices=["tiny"], help="which family: tiny (a ~1M-parameter Llama, about a minute on CPU)")
    b.add_argument("--out", default=None, help="output folder (default: $SAFESUB_CACHE or <repo>/cache, "
                                                 "then families/tiny, or families/tiny-<size>)")
    b.add_argument("--size", choices=list(SIZES), default="full",
                   help="full: the demo family; test: smaller and faster, for tests; smoke: minimal, for CI checks")
    b.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order (default 0)")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    t0 = time.time()
    with tqdm(total=1, unit="step", dynamic_ncols=True) as bar:
        def progress(done, total, message):
            bar.total = total
            bar.n = done
            bar.set_description(message, refresh=False)
            bar.refresh()

        try:
            path = build_tiny(args.out, size=args.size, seed=args.seed, progress=progress)
        except SafesubError as err:
            bar.close()
            print(f"error: {err}", file=sys.stderr)
            return 2
    report = json.loads((path.parent / "behaviour.json").read_text())
    print(f"built {path} in {time.time() - t0:.1f} s (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print("held-out behaviour:")
    print(behaviour_table(report["models"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
