"""Fingerprints: content hashes of the files that decide what a loaded checkpoint computes.

A changed file never serves a stale cached result. Each covers the files a loader reads, and nothing else (a
README, a touch):
  `Checkpoint.fingerprint(owner)`  the tensors: weights (and their index), config.json, adapter_config.json; a LoRA
                                   adapter with its family (`owner`) also its start model's (the tensors it is
                                   merged onto). What weight-space results (subspaces, overlaps) are keyed by.
                                   (A method of `checkpoints.Checkpoint`, hashing through `hashing`.)
  `model_fingerprint(ckpt, owner)` what `load_model` returns: the tensors plus generation_config.json (greedy
                                   decoding reads it), and a LoRA adapter's start model's.
  `tokenizer_fingerprint(ckpt, owner)`  the files `load_tokenizer` reads (checkpoints.TOKENIZER_FILES: tokenizer,
                                   special tokens, chat templates in chat_template.jinja/.json or
                                   tokenizer_config.json, config.json), from the folder `tokenizer_source` picks,
                                   as `load_tokenizer` does.
`fingerprint_all(family, progress)` hashes every file those read first (where its hash is not known), following it
with `progress(done_bytes, total_bytes, what)`, and returns each checkpoint's tensor fingerprint. Files' hashes are
kept by `hashing` (in memory and on disk); within `hashing.snapshot()` each fingerprint is worked out once.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from safesub_core.checkpoints import Checkpoint, Owner
from safesub_core.hashing import Progress, _memo, file_sha256, prehash, snapshot

if TYPE_CHECKING:  # family imports checkpoints
    from safesub_core.family import Family

GENERATION_FILES = ("generation_config.json",)


def _digest(root: Path, files: list[Path], parts: list[str]) -> str:
    """16 hex digits of the files' names (relative to `root`) and contents, after `parts`."""
    h = hashlib.sha256(json.dumps(parts).encode())
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(file_sha256(f).encode())
    return h.hexdigest()[:16]


def fingerprint_all(family: "Family", progress: Progress | None = None) -> dict[str, str]:
    """Each checkpoint's tensor fingerprint, by role, with every file its fingerprints read (tensors, generation
    config, tokenizer) hashed first where its hash is not known, `progress(done_bytes, total_bytes, what)`
    following that hashing (a family.Family; what a server or CLI start calls before opening a session)."""
    checkpoints = family.checkpoints()
    files = []
    for ckpt in checkpoints.values():
        src = tokenizer_source(ckpt, family)
        files += [(ckpt, f) for f in ckpt._tensor_files() + ckpt.files(GENERATION_FILES)]
        files += [(src, f) for f in (src.tokenizer_files() if src is not None else [])]
    prehash(files, progress)
    with snapshot():
        return {role: ckpt.fingerprint(family) for role, ckpt in checkpoints.items()}


def model_fingerprint(ckpt: Checkpoint, owner: Owner | None = None) -> str:
    """Content hash of what `load_model(ckpt, owner)` returns (see the module docstring): the tensors, the
    generation config, and for a LoRA adapter its start model's (whose generation config the merged model keeps)."""
    def compute() -> str:
        parts = [ckpt.fingerprint(owner)]
        if ckpt.kind == "lora" and owner is not None and owner.start_checkpoint != ckpt:
            parts.append(model_fingerprint(owner.start_checkpoint, owner))
        return _digest(ckpt.path, ckpt.files(GENERATION_FILES), parts)

    return _memo("model", ckpt, owner, compute)


def tokenizer_source(ckpt: Checkpoint, owner: Owner | None = None) -> Checkpoint | None:
    """The checkpoint whose folder `load_tokenizer(ckpt, owner)` reads: the checkpoint's own, else the start
    model's, else the base's (a GGUF file holds its tokenizer); None where none has tokenizer files."""
    candidates = [ckpt] + ([owner.start_checkpoint, owner.base] if owner else [])
    for c in candidates:
        if c.kind == "gguf" or any((c.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                     "tokenizer.model")):
            return c
    return None


def tokenizer_fingerprint(ckpt: Checkpoint, owner: Owner | None = None) -> str:
    """Content hash of the files `load_tokenizer(ckpt, owner)` reads (the folder `tokenizer_source` picks)."""
    def compute() -> str:
        src = tokenizer_source(ckpt, owner)
        return "none" if src is None else _digest(src.path, src.tokenizer_files(), ["tokenizer", src.kind])

    return _memo("tokenizer", ckpt, owner, compute)
