"""The evaluation sets scores run on: fixed eval splits, never the training split a demo family was built on."""
from __future__ import annotations

from dataclasses import dataclass

from safesub_core.prompts.builtin import arithmetic_set
from safesub_core.prompts.named import load_set
from safesub_core.prompts.sets import PromptSet

ROLES = ("harmful", "utility", "benign", "edgy")


@dataclass(frozen=True)
class EvalSets:
    """The evaluation splits scores run on: harmful, arithmetic (with references), benign and edgy prompts."""

    harmful: PromptSet  # refusal margins, refusal and attack success rates
    utility: PromptSet  # arithmetic with reference answers: NLL and exact match
    benign: PromptSet  # KL to the start model
    edgy: PromptSet  # over-refusal

    @classmethod
    def default(cls, n: int = 32) -> "EvalSets":
        """The built-in sets' eval splits, `n` prompts each (generated arithmetic for utility)."""
        return cls(
            harmful=load_set("builtin-harmful:eval").head(n),
            utility=arithmetic_set().split("eval").head(n),
            benign=load_set("builtin-benign:eval").head(n),
            edgy=load_set("builtin-edgy:eval").head(n),
        )

    def key(self) -> dict:
        """The sets' content hashes by role (what cache keys of scores hold)."""
        return {k: getattr(self, k).content_hash for k in ROLES}
