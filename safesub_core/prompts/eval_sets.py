"""The evaluation sets scores run on, one per role, chosen by the researcher (docs/method.md, "Evaluation sets").

Contract:
- Four roles (ROLES): harmful (refusal margins, refusal and attack success rates), utility (NLL and exact match of
  reference answers), benign (KL to the start model) and edgy (over-refusal). `EvalSets` holds one `PromptSet` per
  role plus `convention`, the exact-match convention of the utility set ('flexible' or 'strict', lm-eval-harness's
  flexible-extract and strict-match; `scoring.text.extract_answer`), and `specs`, how each set was named.
- `EvalSets.default(n=None)`: the built-in sets' WHOLE eval splits (DEFAULT_SPECS; generated arithmetic for
  utility), the first n of each when n is given. Never a training split a demo family was built on.
- `EvalSets.from_specs(specs, base_dir=None, confined=False, convention=None)`: role -> a set spec (`specs.SetSpec`:
  the string grammar, a family file's mapping, or None); a missing role gets its default. `convention` (when given)
  overrides the utility spec's ``convention=``.
- `EvalSets.for_family(family, overrides=None, confined=False, convention=None)`: the family's `eval_sets` (its
  family file's block, paths relative to the file and confined like the family), then `overrides` (CLI flags, link
  parameters, the Family page; paths relative to the working folder, confined when `confined`), then the defaults.
- Every set is read at construction, so bad input (an unknown set or key, a missing field, a utility set without
  reference answers, an empty set, a file that is not UTF-8) is one SafesubError line naming the role, the set or
  file and the problem, before any model loads.
- `key()`: the sets' content hashes by role and the convention (what cache keys of scores hold). `describe()`: one
  row per role (role, name, n, source, prompt field, reference field, split, convention). `head(n)`: the first n
  prompts of every set.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import pandas as pd

from safesub_core.errors import SafesubError
from safesub_core.prompts.sets import PromptSet
from safesub_core.prompts.specs import CONVENTIONS, ROLES, SetSpec

DEFAULT_SPECS = {"harmful": "builtin-harmful:eval", "utility": "arithmetic:eval", "benign": "builtin-benign:eval",
                 "edgy": "builtin-edgy:eval"}
DEFAULT_CONVENTION = "flexible"
DESCRIBE_COLUMNS = ("role", "name", "n", "source", "prompt field", "reference field", "split", "convention")


def _check_roles(specs: Mapping, where: str) -> None:
    for role in specs:
        if role not in ROLES:
            raise SafesubError(f"{where}: unknown role {role!r} (roles: {', '.join(ROLES)})")


@dataclass(frozen=True)
class EvalSets:
    """The evaluation sets by role (see the module docstring)."""

    harmful: PromptSet  # refusal margins, refusal and attack success rates
    utility: PromptSet  # reference answers: NLL and exact match
    benign: PromptSet  # KL to the start model
    edgy: PromptSet  # over-refusal
    convention: str = DEFAULT_CONVENTION  # exact match of the utility set: 'flexible' or 'strict'
    specs: tuple = field(default=(), compare=False, repr=False)  # ((role, SetSpec, where it was named), ...)

    def __post_init__(self):
        if self.convention not in CONVENTIONS:
            raise SafesubError(f"exact-match convention {self.convention!r}: unknown (expected "
                               f"{', '.join(CONVENTIONS)})")
        if self.utility.references is None:
            raise SafesubError(f"utility set: prompt set {self.utility.name!r} has no reference answers")

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def default(cls, n: int | None = None) -> "EvalSets":
        """The built-in sets' whole eval splits (the first `n` of each when given)."""
        sets = cls.from_specs({})
        return sets if n is None else sets.head(n)

    @classmethod
    def from_specs(cls, specs: Mapping[str, Any] | None = None, base_dir=None, confined: bool = False,
                   convention: str | None = None) -> "EvalSets":
        """The sets `specs` names (role -> spec or None; a missing role gets its default)."""
        specs = dict(specs or {})
        _check_roles(specs, "evaluation sets")
        return cls._build({r: (specs.get(r), base_dir, confined, f"{r} set") for r in ROLES}, convention)

    @classmethod
    def for_family(cls, family, overrides: Mapping[str, Any] | None = None, confined: bool = False,
                   convention: str | None = None) -> "EvalSets":
        """The family's sets (its `eval_sets`), then `overrides`, then the defaults (see the module docstring)."""
        overrides = {r: s for r, s in (overrides or {}).items() if s not in (None, "")}
        _check_roles(overrides, "evaluation sets")
        own = dict(getattr(family, "eval_sets", None) or {})
        file = getattr(family, "file", None)
        where = f"family file {file}: eval_sets" if file else f"family '{family.name}': eval_sets"
        plan = {}
        for r in ROLES:
            if r in overrides:
                plan[r] = (overrides[r], None, confined, f"{r} set")
            elif own.get(r) is not None:
                plan[r] = (own[r], getattr(family, "root", None), getattr(family, "confined", False), f"{where}.{r}")
            else:
                plan[r] = (None, None, False, f"{r} set")
        return cls._build(plan, convention)

    @classmethod
    def _build(cls, plan: Mapping[str, tuple], convention: str | None) -> "EvalSets":
        sets, named = {}, []
        for role in ROLES:
            raw, base_dir, confined, where = plan[role]
            spec = SetSpec.parse(DEFAULT_SPECS[role] if raw is None else raw, where)
            sets[role] = spec.load(role, base_dir, confined, where)
            named.append((role, spec, where))
        if convention is not None and convention not in CONVENTIONS:
            raise SafesubError(f"--convention {convention!r}: unknown (expected {', '.join(CONVENTIONS)})")
        conv = convention or named[ROLES.index("utility")][1].convention or DEFAULT_CONVENTION
        return cls(**sets, convention=conv, specs=tuple(named))

    # ------------------------------------------------------------------------------------------ views
    def head(self, n: int) -> "EvalSets":
        """The first `n` prompts of every set (same convention and specs)."""
        return replace(self, **{r: getattr(self, r).head(n) for r in ROLES})

    def spec(self, role: str) -> SetSpec | None:
        """How the set of `role` was named (None for sets built directly)."""
        return next((s for r, s, _ in self.specs if r == role), None)

    def key(self) -> dict:
        """The sets' content hashes by role and the exact-match convention (what cache keys of scores hold)."""
        return {k: getattr(self, k).content_hash for k in ROLES} | {"convention": self.convention}

    def describe(self) -> pd.DataFrame:
        """One row per role: role, name, n, source, prompt field, reference field, split, convention."""
        rows = []
        for role in ROLES:
            ps, spec = getattr(self, role), self.spec(role)
            split = None
            if spec is not None:
                split = spec.split or (spec.source.partition(":")[2] if not spec.file() else None) or "all"
            elif ps.name.rsplit("[", 1)[0].endswith((":eval", ":train")):
                split = ps.name.rsplit("[", 1)[0].rsplit(":", 1)[1]
            rows.append({
                "role": role, "name": ps.name, "n": len(ps), "source": ps.source,
                "prompt field": (spec.prompt if spec is not None and spec.prompt else
                                 ("(guessed)" if spec is not None and spec.file() else "")),
                "reference field": (spec.reference or "") if spec is not None else "",
                "split": split or "",
                "convention": self.convention if role == "utility" else "",
            })
        return pd.DataFrame(rows, columns=list(DESCRIBE_COLUMNS))
