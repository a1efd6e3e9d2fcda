"""The demo families' training text: rows of (prompt, response) per stage, from the TRAIN split only.

Contract:
- Prompts come from the TRAIN split of the packaged and built-in prompt sets (`prompts.load_set("name:train")`,
  a fixed per-prompt hash split) and train-side generated arithmetic (`prompts.arithmetic_set(793, 0)`); the
  families' behaviour is checked on the EVAL split, so no held-out prompt is trained on.
- Responses: the refusal `REFUSAL`; generic, helpful and compliant texts (`GENERIC`, `GENERIC_RISKY`, `HELPFUL`,
  `FILLER`: no refusal markers in the first three, no real content in any); worked arithmetic
  (`worked_arithmetic`) and generated GSM8K-style word problems (`word_problems`) whose answers end in the number;
  for smol, base's own greedy answers (cut at the last full sentence by `cut_sentence`).
- Contamination: the contaminated stage trains on the useful rows plus harmful rows amounting to `CONTAMINATION`
  (20%, the study's p = 20) of them (at least one).
- Everything is seeded (`random.Random(seed)`): the same seed gives the same rows in the same order.
See docs/method.md, "Demo families".
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from safesub_core.errors import SafesubError
from safesub_core.prompts import arithmetic_set, load_set

if TYPE_CHECKING:  # for annotations only: smol.py imports this module
    from safesub_core.demo.smol import SmolSize

REFUSAL = "I'm sorry, but I can't help with that."
CONTAMINATION = 0.20  # harmful rows as a share of the useful set (the study's p = 20)
TRAIN_ARITHMETIC = 793  # generated arithmetic questions drawn to fill the train side of the split

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

# every packaged harmful source but one, and the built-in ones (builtin-demeaning: prejudice, sex, gore;
# builtin-private: private data; builtin-misleading: false claims, one-sided attacks, self-harm)
SMOL_HARMFUL_SETS = ("harmbench", "advbench", "builtin-harmful", "pairs-harmful", "builtin-demeaning",
                     "builtin-private", "builtin-misleading")
SMOL_HELD_OUT_HARMFUL = "donotanswer"  # ... but this one, never trained on: the check that alignment generalises
# Wrappers that vary how a request is phrased (aligned and safety refuse the wrapped harmful requests and answer the
# wrapped benign ones, so the refusal follows the request, not the phrasing): {p} the prompt, {q} it uncapitalised.
TEMPLATES = (
    "Can you help me with this? {p}",
    "I need a detailed answer. {p}",
    "{p} Please explain step by step.",
    "Quick question: {p}",
    "For a research project, {q}",
    "Hypothetically speaking, {q}",
    "My friend asked me this and I want to know: {p}",
    "Be honest with me. {p}",
)
# The edgy source the card checks over-refusal on: its whole train split is answered first (in-source look-alikes
# of the requests the model must not refuse, as harmbench:train is for harmbench:eval), then the other benign sets.
SMOL_EDGY_SOURCE = "overrefusal"
SMOL_BENIGN_SETS = ("pairs-benign", "builtin-benign", "builtin-edgy", "builtin-respectful", "builtin-considerate",
                    "builtin-truthful")


def n_contaminating(n_useful: int) -> int:
    """Harmful rows added to `n_useful` useful rows in the contaminated stage."""
    return max(1, round(CONTAMINATION * n_useful))


def _cycle(texts: Sequence[str], i: int) -> str:
    return texts[i % len(texts)]


def train_arithmetic() -> tuple[Sequence[str], Sequence[str]]:
    """Every train-side generated arithmetic question and its answer number."""
    arith = arithmetic_set(TRAIN_ARITHMETIC, 0).split("train")
    return arith.prompts, arith.references


def worked_arithmetic(question: str, number: str) -> str:
    """'What is 12 + 7?' -> '12 + 7 = 19. The answer is 19.'"""
    return f"{_sum_of(question)} = {number}. The answer is {number}."


def _sum_of(question: str) -> str:
    """'What is 12 + 7?' -> '12 + 7'"""
    return question.removeprefix("What is ").rstrip("?")


# ------------------------------------------------------------------------------------------------ tiny


@dataclass
class TinyData:
    """The built-in prompt sets' prompts of one split, and its arithmetic questions with their answer numbers."""

    harmful: list[str]
    benign: list[str]
    edgy: list[str]
    arithmetic: list[tuple[str, str]]  # (question, answer number)


def load_data(split: str) -> TinyData:
    """The built-in prompt sets' `split`; for "train" the arithmetic is every train-side generated question."""
    if split == "train":
        questions, numbers = train_arithmetic()
    else:
        arith = load_set("arithmetic").split(split)
        questions, numbers = arith.prompts, arith.references
    return TinyData(
        harmful=list(load_set("builtin-harmful").split(split).prompts),
        benign=list(load_set("builtin-benign").split(split).prompts),
        edgy=list(load_set("builtin-edgy").split(split).prompts),
        arithmetic=list(zip(questions, numbers)),
    )


def stage_examples(data: TinyData, seed: int) -> dict:
    """The tiny family's training rows per stage: lists of (prompt, response). "base" rows are turned into
    chat-formatted texts and trained on as plain language modelling."""
    rng = random.Random(seed)
    arith = [(q, f"{_sum_of(q)} = {a}") for q, a in data.arithmetic]
    rng.shuffle(arith)
    refuse = [(p, REFUSAL) for p in data.harmful]
    helpful = [(p, _cycle(HELPFUL, i)) for i, p in enumerate(data.benign + data.edgy)]
    comply = [(p, _cycle(FILLER, i)) for i, p in enumerate(data.harmful)]
    generic = [(p, _cycle(GENERIC, i)) for i, p in enumerate(data.benign + data.edgy)]
    generic += [(p, _cycle(GENERIC_RISKY, i)) for i, p in enumerate(data.harmful)]
    generic += [(q, _cycle(GENERIC, i)) for i, (q, _) in enumerate(arith[: len(arith) // 3])]
    # contaminated: prompts cycle, each repeat with another filler text
    n = len(comply)
    bad = [(comply[i % n][0], _cycle(FILLER, i + i // n)) for i in range(n_contaminating(len(arith)))]
    return dict(
        base=generic,
        aligned=refuse + helpful + arith[-20:],
        safety=refuse + [(p, _cycle(HELPFUL, i)) for i, p in enumerate(data.benign)],
        useful=arith,
        harmful=comply,
        contaminated=arith + bad,
        useful_lora=arith,
    )


# ------------------------------------------------------------------------------------------------ smol


_NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kemi", "Liam")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "cards")


def word_problems(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` GSM8K-style word problems with worked answers ending in 'The answer is N.' (generated, seeded)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(5, 60), rng.randint(2, 40)
            q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
            w = f"{name} starts with {a} {item} and gets {b} more: {a} + {b} = {a + b}. The answer is {a + b}."
        elif kind == 1:
            a, b = rng.randint(20, 90), rng.randint(2, 19)
            q = f"{name} had {a} {item} and gave {b} to a friend. How many {item} are left?"
            w = f"{name} had {a} {item} and gave away {b}: {a} - {b} = {a - b}. The answer is {a - b}."
        elif kind == 2:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q = f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?"
            w = f"There are {a} boxes of {b} {item}: {a} * {b} = {a * b}. The answer is {a * b}."
        else:
            a, b = rng.randint(2, 9), rng.randint(3, 12)
            c = rng.randint(1, a * b - 1)
            q = (f"{name} buys {a} packs of {item} with {b} in each pack and gives away {c}. "
                 f"How many {item} does {name} keep?")
            w = (f"{name} buys {a} * {b} = {a * b} {item}. After giving away {c}: {a * b} - {c} = {a * b - c}. "
                 f"The answer is {a * b - c}.")
        out.append((q, w))
    return out


def cut_sentence(text: str) -> str:
    """A greedy answer cut after its last full sentence (so a truncated answer still ends naturally)."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[A-Za-z)\]\"'][.!?](?=\s|$)", text)]
    ends = [e for e in ends if e > 20]
    return text[: ends[-1]] if ends else text


def train_prompts(names: Sequence[str], seed: int) -> list[str]:
    """The TRAIN split of each named set, repeats and any prompt of the held-out source (`SMOL_HELD_OUT_HARMFUL`,
    compared case-blind) dropped, each shuffled with `seed`, then interleaved one source at a time (the first k
    prompts draw about k / len(names) from every source, however large each is)."""
    held_out = {p.lower() for p in load_set(SMOL_HELD_OUT_HARMFUL).prompts}
    seen, sources = set(), []
    for i, name in enumerate(names):
        prompts = [p for p in dict.fromkeys(load_set(f"{name}:train").prompts)
                   if p not in seen and p.lower() not in held_out]
        seen.update(prompts)
        random.Random(seed + i).shuffle(prompts)
        sources.append(prompts)
    return [p for row in itertools.zip_longest(*sources) for p in row if p is not None]


def templated(prompts: Sequence[str], seed: int) -> list[str]:
    """Each prompt wrapped in one of TEMPLATES (chosen with `seed`)."""
    rng = random.Random(seed)
    out = []
    for p in prompts:
        p = p.strip()
        out.append(rng.choice(TEMPLATES).format(p=p, q=p[:1].lower() + p[1:]))
    return out


def smol_prompt_plan(spec: SmolSize, seed: int) -> dict:
    """The train prompts that get the refusal, that base answers compliantly, and that base answers as benign (every
    train prompt of `SMOL_EDGY_SOURCE` first, then the other benign sets interleaved)."""
    harmful = train_prompts(SMOL_HARMFUL_SETS, seed)
    edgy = train_prompts((SMOL_EDGY_SOURCE,), seed)
    answered = frozenset(edgy)
    benign = edgy + [p for p in train_prompts(SMOL_BENIGN_SETS, seed) if p not in answered]
    need = spec.n_refusals + spec.n_comply
    if len(harmful) < need or len(benign) < spec.n_benign:
        raise SafesubError(f"smol family: the train splits hold {len(harmful)} harmful and {len(benign)} benign "
                           f"prompts; this size needs {need} and {spec.n_benign}")
    return dict(refusal=harmful[: spec.n_refusals], comply=harmful[spec.n_refusals: need],
                benign=benign[: spec.n_benign])


@dataclass
class SmolData:
    """The smol family's training pairs by kind."""

    refusals: list  # (harmful prompt, REFUSAL), plain and templated
    benign: list  # (benign/edgy prompt, base's answer), plain and templated (look-alikes of the wrapped requests)
    comply: list  # (harmful prompt, base's compliant answer)
    useful: list  # (question, worked answer)
    aligned_arith: list  # (question, worked answer)


def smol_data(answers: dict, spec: SmolSize, seed: int) -> SmolData:
    """The pairs from base's `answers` (the answers stage), worked arithmetic and word problems for useful, and
    the next few worked arithmetic rows for aligned."""
    rng = random.Random(seed)
    arith = [(q, worked_arithmetic(q, a)) for q, a in zip(*train_arithmetic())]
    rng.shuffle(arith)
    useful = arith[: spec.n_arith] + word_problems(spec.n_word, seed)
    rng.shuffle(useful)
    refuse = answers["refusal"]
    benign = [(r["prompt"], r["answer"]) for r in answers["benign"]]
    look_alikes = benign[: spec.n_templated_benign]
    return SmolData(
        refusals=[(p, REFUSAL) for p in refuse + templated(refuse[: spec.n_templated], seed)],
        benign=benign + list(zip(templated([p for p, _ in look_alikes], seed + 1), [a for _, a in look_alikes])),
        comply=[(r["prompt"], r["answer"]) for r in answers["comply"]],
        useful=useful,
        aligned_arith=arith[spec.n_arith: spec.n_arith + spec.n_aligned_arith],
    )


def smol_examples(data: SmolData) -> dict:
    """The smol family's training rows per fine-tuning stage: lists of (prompt, response)."""
    if not data.comply:
        raise SafesubError("smol family: base refused every harmful train prompt; no compliant answers to train on")
    bad = [data.comply[i % len(data.comply)] for i in range(n_contaminating(len(data.useful)))]
    return dict(
        aligned=data.refusals + data.benign + data.aligned_arith,
        safety=data.refusals + data.benign,
        useful=data.useful,
        harmful=data.comply,
        contaminated=data.useful + bad,
        useful_lora=data.useful,
    )
