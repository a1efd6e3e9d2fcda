"""The notebook API: open a family, get a session, run a sweep, an overlap or an activation comparison, get DataFrames.

Contract (every call validates its inputs at the boundary and raises a one-line `SafesubError` for bad input):
- `open_family(spec) -> Family`: 'tiny' (built on first use), 'smol' (built with `safesub build smol`), a family
  file (YAML/JSON), or 'paths:' + JSON of checkpoint paths (`family.resolve_family`).
- `open_session(spec_or_family, device="auto", dtype="auto", n_prompts=None, chat=True, sets=None, batch=None)
  -> FamilySession`: the family's start model loaded on a device (`compute.resolve_compute`), scored on the
  family's evaluation sets (its file's `eval_sets`, else the built-in eval splits; the first `n_prompts` of each
  when given) unless `sets` (an `EvalSets`) is given, in live waves of `batch` prompts (default
  `compute.live_prompts`). Its methods return DataFrames or dicts:
  `point_scores`, `generation_scores`, `weight_overlap`, `activation_overlap`, `band_mean`, `activation_map`,
  `diagnostics`, `curves`, `inspect`, `export`.
- `sweep(family_or_session, ...) -> DataFrame`: one row per (variant, subspace, mode, rank fraction).
- `prompt_set(spec) -> PromptSet`: a named set ('harmbench', 'builtin-harmful:eval', ...) or a prompt file.
docs/notebook.md has a runnable example.
"""
from __future__ import annotations

import os

from safesub_core.cache import DiskCache
from safesub_core.compute import live_prompts, resolve_compute
from safesub_core.family import Family, resolve_family
from safesub_core.projection import ProjectionConfig
from safesub_core.prompts import EvalSets, PromptSet, resolve
from safesub_core.session import FamilySession
from safesub_core.sweeps import sweep

__all__ = ["open_family", "open_session", "prompt_set", "sweep", "Family", "FamilySession", "EvalSets",
           "ProjectionConfig", "PromptSet"]


def open_family(spec: str | os.PathLike, progress=None) -> Family:
    """A family by name ('tiny', 'smol'), family file or 'paths:' JSON; see the module docstring."""
    return resolve_family(str(spec), progress=progress)


def open_session(family: Family | str | os.PathLike, device: str = "auto", dtype: str = "auto",
                 n_prompts: int | None = None, chat: bool = True, sets: EvalSets | None = None,
                 cache: DiskCache | None = None, batch: int | None = None) -> FamilySession:
    """A working session on `family` (a Family or anything `open_family` takes); see the module docstring."""
    if not isinstance(family, Family):
        family = open_family(family)
    device, torch_dtype = resolve_compute(device, dtype)
    if sets is None:
        sets = EvalSets.for_family(family)
        sets = sets if n_prompts is None else sets.head(n_prompts)
    return FamilySession(family, device=device, dtype=torch_dtype, sets=sets, chat=chat, cache=cache,
                         batch=batch or live_prompts(family, device))


def prompt_set(spec: str) -> PromptSet:
    """A named prompt set, a split of one ('harmbench:eval') or a prompt file (`prompts.resolve`)."""
    return resolve(spec)
