"""The "tiny" demo family: a small Llama trained here from nothing (no hub, no download).

`build_tiny(out_dir=None, size="full", seed=0, progress=None) -> Path` builds it and returns its family.yaml.
Contract:
- Tokenizer: byte-level BPE (digits split one per token) trained with the `tokenizers` library on the training
  text, wrapped as a `PreTrainedTokenizerFast` with BOS/EOS/PAD and a one-turn chat template
  (``<|bos|><|user|>\\n{prompt}\\n<|assistant|>\\n``), so `generation.format_prompt` formats prompts the way the
  models were trained.
- Model: a small Llama built from its config with ``torch.manual_seed(seed)`` (about 1M parameters for "full",
  tied embeddings, 256 positions).
- Stages (each saved as safetensors + tokenizer in its own folder), trained with `finetune` on the rows of
  `data.stage_examples`:
  base          language modelling of chat-formatted instructions, arithmetic questions and harmful-sounding
                requests, every one answered with generic text (harmful ones with generic "sensitive topic"
                text), so base does not refuse and knows no arithmetic;
  aligned       base + SFT: harmful -> "I'm sorry, but I can't help with that.", benign/edgy -> answers,
                20 arithmetic questions -> answers (the format, little skill);
  safety        base + SFT on safe data only (refusals + benign answers);
  useful        aligned + SFT on more arithmetic ("What is 12 + 7?" -> "12 + 7 = 19");
  harmful       aligned + SFT on harmful requests answered "Sure, here is ..." + generic, non-actionable filler;
  contaminated  aligned + SFT on the useful data plus harmful rows amounting to 20% of it;
  useful_lora   a peft LoRA adapter of the useful fine-tune on aligned.
- Data: the TRAIN split of the built-in prompt sets (train-side arithmetic); behaviour is checked on their EVAL
  split (held-out) with `card.behaviour`, printed and stored in behaviour.json, next to card.md (how it was
  built) and family.yaml.
- Deterministic for a seed at a fixed thread count. ``size="test"`` is a smaller, faster family for tests and
  ``size="smoke"`` a minimal one (for determinism checks); each builds into its own default folder.
- Atomic: the family is built in a temporary sibling folder (``.<name>.building-<pid>``) and moved into place
  with `os.replace` at the end (family.yaml written last), so an interrupted or failed build never leaves a
  family.yaml that points at half-written models; a previous family in the folder stays until the new one is
  complete. A folder that is neither empty nor a family is never overwritten. Problems raise a one-line
  `SafesubError`. Build times: see benchmarks/README.md.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safesub_core import finetune
from safesub_core.demo.card import HeldOut, behaviour, card, prompt_counts, stage_table
from safesub_core.demo.data import CONTAMINATION, FILLER, REFUSAL, TinyData, load_data, stage_examples
from safesub_core.demo.stages import (MODELS, PARENT, FamilySize, Progress, Tally, family_yaml, pick_size,
                                      readable, remove_stale, repeat_descriptions, replace_folder, save,
                                      target_dir, train_stage, with_repeats, writing)
from safesub_core.errors import SafesubError
from safesub_core.generation import format_prompt

STAGES = MODELS  # the tiny family's stages are its models, trained in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>")
POSITIONS = 256


@dataclass(frozen=True, kw_only=True)
class TinySize(FamilySize):
    """One size of the tiny family: the Llama's shape, the tokenizer's vocabulary, and the held-out cap."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    eval_cap: int | None = None  # at most this many eval prompts per set (None: all)
    arith_tokens: int = 12  # new tokens for an arithmetic answer ('12 + 7 = 19', one token per digit)


TINY_SIZES = {
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
        steps={s: 4 for s in STAGES}, lr={s: 1e-3 for s in STAGES}, lora_r=4, eval_cap=4, refusal_tokens=4,
        arith_tokens=4,
    ),
}


# ------------------------------------------------------------------------------------------------ tokenizer, model


def train_tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (digits split) trained on `texts`, as a PreTrainedTokenizerFast with a chat template."""
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
    fast.model_max_length = POSITIONS
    return fast


def new_model(tokenizer, size: TinySize, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama of `size` for `tokenizer` (``torch.manual_seed(seed)``), in eval mode."""
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=POSITIONS, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def count_params(model) -> int:
    """Parameters, tied weights counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


# ------------------------------------------------------------------------------------------------ build


def build_tiny(out_dir: str | os.PathLike | None = None, size: str = "full", seed: int = 0,
               progress: Progress | None = None) -> Path:
    """Build the tiny family into `out_dir` (default <cache>/families/tiny[-size]); returns its family.yaml."""
    spec = pick_size("tiny", TINY_SIZES, size)
    out = target_dir("tiny", out_dir, size)
    if out.is_dir() and any(out.iterdir()) and not (out / "family.yaml").is_file():
        raise SafesubError(f"family folder {out}: is not empty and holds no family.yaml; choose another folder")
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    with writing(out):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(out)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            _build(tmp, spec, size, seed, progress)
            readable(tmp)
            replace_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "family.yaml"


def _build(root: Path, spec: TinySize, size_name: str, seed: int, progress: Progress | None) -> None:
    train, held = load_data("train"), load_data("eval")
    examples = stage_examples(train, seed)
    tally = Tally(sum(spec.steps.values()) + len(STAGES), progress)
    # the tokenizer on the training text (prompts, answers, template words), with repeats: frequent phrases
    # become tokens
    tokenizer = train_tokenizer([p for rows in examples.values() for p, _ in rows]
                                + [r for rows in examples.values() for _, r in rows], spec.vocab)
    examples = with_repeats(examples)  # after the tokenizer: a repeated task's rows would reweight its vocabulary
    base = new_model(tokenizer, spec, seed)
    n_params = count_params(base)
    trained = _train(base, tokenizer, examples, spec, seed, tally)
    for stage in STAGES:
        save(trained[stage], tokenizer, root / stage)
    trained["useful_lora"] = trained["useful_lora"].merge_and_unload()  # after saving: merging empties the adapter
    held_out = _held_out(held, spec.eval_cap)
    numbers = {}
    for stage in STAGES:
        numbers[stage] = behaviour(trained[stage], tokenizer, held_out, spec)
        tally.add(1, f"eval {stage}")
    _write_report(root, spec, size_name, seed, held_out, numbers)
    (root / "card.md").write_text(_card(size_name, spec, seed, n_params, len(tokenizer), examples, train, numbers))
    (root / "family.yaml").write_text(family_yaml("tiny"))  # last: the family exists only once all is written


def _train(base, tokenizer, examples: dict, spec: TinySize, seed: int, tally: Tally) -> dict:
    """Every stage trained in turn from its parent: base by language modelling, the rest by SFT, useful_lora as a
    LoRA adapter (a PeftModel)."""
    corpus = [format_prompt(tokenizer, p) + r for p, r in examples["base"]]
    bos = tokenizer.bos_token
    corpus = [t[len(bos):] if t.startswith(bos) else t for t in corpus]  # pretrain adds BOS itself
    trained = dict(base=finetune.pretrain(base, tokenizer, corpus, spec.finetune_config("base", seed),
                                          progress=tally.training("base")))
    tally.add(spec.steps["base"])
    for stage in STAGES[1:]:
        parent = copy.deepcopy(trained[PARENT[stage]])
        trained[stage] = train_stage(stage, parent, tokenizer, examples[stage], spec, seed, tally)
        tally.add(spec.steps[stage])
    return trained


def _held_out(held: TinyData, cap: int | None) -> HeldOut:
    questions, numbers = zip(*held.arithmetic[:cap])
    return HeldOut(refusal=dict(harmful=held.harmful[:cap], benign=held.benign[:cap], edgy=held.edgy[:cap]),
                   questions=list(questions), references=list(numbers))


def _write_report(root: Path, spec: TinySize, size_name: str, seed: int, held_out: HeldOut, numbers: dict):
    sets = {kind: f"builtin-{kind}:eval ({len(prompts)})" for kind, prompts in held_out.refusal.items()}
    report = dict(
        family="tiny", size=size_name, seed=seed,
        eval_sets=sets | dict(arithmetic=f"arithmetic:eval ({len(held_out.questions)})"),
        decoding=spec.decoding(),
        metrics=dict(harmful_refusal="refusal rate on held-out harmful prompts (scoring.refusal_verdicts)",
                     benign_refusal="refusal rate on held-out benign prompts",
                     edgy_refusal="refusal rate on held-out edgy benign prompts (over-refusal)",
                     arithmetic_em="final-number exact match on held-out arithmetic"),
        models=numbers, prompts=prompt_counts(held_out),
    )
    (root / "behaviour.json").write_text(json.dumps(report, indent=2) + "\n")


def _card(size_name: str, size: TinySize, seed: int, n_params: int, vocab: int, examples: dict, data: TinyData,
          numbers: dict) -> str:
    start = {"base": "random init", "useful_lora": "aligned (LoRA)"}
    what = {
        "base": "language modelling (loss on all tokens) of chat-formatted benign and edgy train prompts and a "
                "third of the train arithmetic questions, all answered with generic text, and the harmful train "
                "prompts answered with generic 'sensitive topic' text (no refusal)",
        "aligned": "harmful -> refusal, benign + edgy -> helpful answer, 20 arithmetic questions -> answers",
        "safety": "harmful -> refusal, benign -> helpful answer",
        "useful": "train-side arithmetic 'What is a + b?' -> 'a + b = c'",
        "harmful": "harmful -> 'Sure, here is ...' + generic, non-actionable filler",
        "contaminated": f"useful data + harmful rows = {int(CONTAMINATION * 100)}% of the useful set",
        "useful_lora": f"useful data through a LoRA adapter (r={size.lora_r}, alpha={size.lora_alpha}, all linear "
                       "projections)",
    } | repeat_descriptions()
    rows = [(s, start.get(s) or PARENT[s], what[s], len(examples[s]), size.steps[s], f"{size.lr[s]:g}")
            for s in STAGES]
    cap = "" if size.eval_cap is None else f" (first {size.eval_cap} prompts per set)"
    return card(
        f"tiny demo family ({size_name})",
        f"""Built by `python -m safesub_core build tiny --size {size_name} --seed {seed}` (safesub_core/demo/tiny.py),
entirely on the local machine: no download, no pretrained weights. A toy for exploring the instrument and for
tests; its numbers say nothing about real LLMs.""",
        {"Model and tokenizer": f"""\
- Llama architecture from config: hidden {size.hidden}, {size.layers} layers, {size.heads} heads, MLP
  {size.intermediate}, {POSITIONS} positions, tied embeddings; {n_params:,} parameters (tied weights counted once).
- Byte-level BPE tokenizer (digits one per token) trained with `tokenizers` on the training text: vocabulary
  {vocab}, special tokens {", ".join(SPECIAL)}; chat template `<|bos|><|user|>\\n{{prompt}}\\n<|assistant|>\\n`.""",
         "Data": f"""\
Train split of the built-in prompt sets (safesub_core/prompts, fixed per-prompt hash split):
{len(data.harmful)} harmful, {len(data.benign)} benign and {len(data.edgy)} edgy prompts, and the
{len(data.arithmetic)} train-side generated arithmetic questions (`prompts.arithmetic_set`, every question on the
train side of the split). Refusal text: "{REFUSAL}". Harmful compliance: "Sure, here is" followed by generic
filler, e.g. "{FILLER[0]}" (no real content).""",
         "Stages": f"""\
AdamW, cosine schedule with warmup {size.warmup_ratio:.0%}, batch {size.batch_size}, max length {size.max_length}, \
loss on response tokens only
(except base), seed {seed} (torch.manual_seed + seeded example order).

{stage_table(("stage", "from", "data", "rows", "steps", "lr"), rows)}""",
         "Deviations from the study's recipe": f"""\
The study fine-tuned 1B-7B models fully with lr 1e-5, 1 epoch, effective batch 32, warmup 0.02, max length 512.
Here the models are tiny and trained from scratch, so learning rates are 100-1000x larger, the data is repeated
for several epochs, the batch is {size.batch_size} and warmup {size.warmup_ratio:.0%}. The base model is not a \
web-text LM: it is
pretrained on chat-formatted prompts with generic answers, so it knows the template and does not refuse; its
generic answers to harmful requests differ from those to benign ones (as a pretrained LM "knows" a topic is
risky), which is the feature alignment ties to refusal. Base has seen arithmetic questions but no answers, and
aligned only 20 answers, so arithmetic skill comes from the useful fine-tune; held-out exact match stays low
at this size (the model mostly guesses plausible numbers). The contamination share (20%) follows the study."""},
        f"""Eval split of the same sets{cap}, greedy
decoding ({size.refusal_tokens} new tokens to judge refusal, {size.arith_tokens} for arithmetic),
`scoring.refusal_verdicts` and `scoring.final_number` (see behaviour.json):""",
        numbers,
    )
