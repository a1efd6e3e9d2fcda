"""The prompt set: an immutable, validated tuple of prompts (with optional reference answers) and its fixed splits.

Contract:
- `PromptSet(name, prompts, references, kind, source)` is immutable. `prompts` is a non-empty tuple of
  non-blank strings; `references` is None or a tuple of the same length (reference answers for utility sets);
  `kind` is one of `KINDS` ('harmful' | 'benign' | 'edgy' | 'math'); `source` says where the prompts came from
  and under which licence. Bad input raises `SafesubError("prompt set '<name>': <problem>")`.
- `PromptSet.content_hash`: the first 16 hex digits of sha256 over the prompts and references (not the name),
  so two sets with the same content share cache entries.
- `PromptSet.split("train" | "eval")`: a FIXED split decided per prompt by its text alone (`split_of`):
  ``int(sha256(prompt)[:8], 16) % 100 < 50`` puts a prompt in "eval", the rest in "train". It does not depend on
  the order of the set or on which other prompts are present, so a family built on ``X:train`` is never scored on
  a prompt it was trained on when scored on ``X:eval`` (identical texts land in the same part). The name gets the
  suffix ``:train`` / ``:eval``.
- `PromptSet.head(n)`: the first n prompts (deterministic); the name gets the suffix ``[:n]``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from safesub_core.errors import SafesubError

KINDS = ("harmful", "benign", "edgy", "math")
SPLIT_PERCENT_EVAL = 50


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]
    references: tuple[str, ...] | None = None
    kind: str = "benign"
    source: str = ""

    def __post_init__(self):
        prompts = tuple(self.prompts) if self.prompts is not None else ()
        object.__setattr__(self, "prompts", prompts)
        if self.references is not None:
            object.__setattr__(self, "references", tuple(str(r) for r in self.references))
        label = f"prompt set {self.name!r}"
        if not prompts:
            raise SafesubError(f"{label}: is empty")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise SafesubError(f"{label}: prompt {i} is a {type(p).__name__}, not text")
            if not p.strip():
                raise SafesubError(f"{label}: prompt {i} is blank")
        if self.references is not None and len(self.references) != len(prompts):
            raise SafesubError(
                f"{label}: has {len(prompts)} prompts but {len(self.references)} references"
            )
        if self.kind not in KINDS:
            raise SafesubError(f"{label}: unknown kind {self.kind!r} (expected one of {', '.join(KINDS)})")

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    @property
    def content_hash(self) -> str:
        """Short sha256 hex of the prompts and references (the name and source do not count)."""
        payload = json.dumps([list(self.prompts), None if self.references is None else list(self.references)],
                             ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def split(self, part: str) -> "PromptSet":
        """The fixed 'train' or 'eval' part (per-prompt hash of its text; see the module docstring)."""
        if part not in ("train", "eval"):
            raise SafesubError(f"prompt set {self.name!r}: unknown split {part!r} (expected 'train' or 'eval')")
        keep = [i for i, p in enumerate(self.prompts) if (split_of(p) == part)]
        return PromptSet(
            name=f"{self.name}:{part}",
            prompts=tuple(self.prompts[i] for i in keep),
            references=None if self.references is None else tuple(self.references[i] for i in keep),
            kind=self.kind,
            source=self.source,
        )

    def head(self, n: int) -> "PromptSet":
        """The first `n` prompts (all of them when the set is shorter)."""
        if int(n) < 1:
            raise SafesubError(f"prompt set {self.name!r}: head needs n >= 1, got {n}")
        n = int(n)
        if n >= len(self.prompts):
            return self
        return PromptSet(
            name=f"{self.name}[:{n}]",
            prompts=self.prompts[:n],
            references=None if self.references is None else self.references[:n],
            kind=self.kind,
            source=self.source,
        )


def split_of(prompt: str) -> str:
    """'eval' or 'train' for one prompt text: sha256(text) as an integer, mod 100, below 50 is 'eval'."""
    h = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16)
    return "eval" if h % 100 < SPLIT_PERCENT_EVAL else "train"
