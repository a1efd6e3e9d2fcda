"""Checkpoints: what kind of model sits at a path, its fingerprint, its tensors read one at a time, and loading it.

A checkpoint is one of
  hf    a Hugging Face directory: config.json + *.safetensors (pickle *.bin only with allow_pickle=True);
  lora  a peft adapter directory (adapter_config.json), merged onto the family's start model on load:
        W = W_start + scale * B @ A with scale = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA);
  gguf  a .gguf file (or a directory holding exactly one), dequantized by transformers on load.

`TensorReader` yields one float32 tensor (or a block of its rows) at a time (safetensors' safe_open), so the
subspace and overlap computations never hold whole models. Models and tokenizers are read from local files only
(local_files_only=True) and remote code is never run. `load_model` refuses, before loading, an architecture
transformers does not know, a config.json whose shapes the weights do not have, and a model that does not fit in
the device's free memory; a broken adapter or tokenizer is one line naming the checkpoint and the file.

Fingerprints: content hashes of the files that decide what a loaded checkpoint computes, so a changed file never
serves a stale cached result. Each covers the files a loader reads, and nothing else (a README, a touch):
  `Checkpoint.fingerprint(owner)`  the tensors: weights (and their index), config.json, adapter_config.json; a LoRA
                                   adapter with its family (`owner`) also its start model's (the tensors it is
                                   merged onto). What weight-space results (subspaces, overlaps) are keyed by.
  `model_fingerprint(ckpt, owner)` what `load_model` returns: the tensors plus generation_config.json (greedy
                                   decoding reads it), and a LoRA adapter's start model's.
  `tokenizer_fingerprint(ckpt, owner)`  the files `load_tokenizer` reads (TOKENIZER_FILES: tokenizer, special
                                   tokens, chat templates in chat_template.jinja/.json or tokenizer_config.json,
                                   config.json), from the folder `tokenizer_source` picks, as `load_tokenizer` does.
A file's SHA-256 is kept, in this process and on disk (HASH_INDEX under `settings.cache_root()`, one JSON file
shared by every process on that cache), by the file's real path, size, mtime, ctime and inode, and computed again
only when one of them changes: a restart hashes no unchanged weight file. A file changed within RACY_NS is hashed
afresh every time and never stored (its timestamp may not yet tell a second change apart, as in git's "racy"
files). The index is written atomically (a temporary file, then `os.replace`) under a file lock, merged with what
other processes stored; a missing, corrupt or foreign index reads as empty and is rebuilt by the next write; a
read-only or full cache only stops hashes being stored (one warning), never a fingerprint. `hash_counts()` counts
the files and bytes this process hashed; `clear_hash_memo()` forgets what it remembers in memory (as a restart
does). Hashing that must happen can be followed: `Checkpoint.fingerprint(owner, progress=...)` and
`fingerprint_all(family, progress)` call `progress(done_bytes, total_bytes, what)` (what: "<checkpoint>: <file>")
from (0, total) to (total, total), at most every PROGRESS_S seconds in between, and not at all when every file's
hash is known. Within `snapshot()` each fingerprint is worked out once (a cache key asks for the start model's
several times).

Hub names: a checkpoint may be named as a Hugging Face hub model, `org/name` or `org/name@revision` (a branch,
tag or commit). `hub_name(text)` says whether text reads as one; `hub_snapshot(role, text)` finds its snapshot
folder in the local hub cache only (`settings.hub_cache()`: HF_HUB_CACHE, HF_HOME, ...; huggingface_hub's
snapshot_download with local_files_only=True, never the network); a model not there (or only partly, an
interrupted download) is one line naming the model and the cache folder searched. Callers try a path on disk first
(`family.Family.from_paths`): a path that exists always wins over a hub name. A hub snapshot is not confined to
the allowed roots (the user named a model, not a path), but it and every file in it must resolve inside the hub
cache: a link out of it is refused.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol

import torch
from filelock import FileLock
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from safesub_core import settings
from safesub_core.errors import SafesubError
from safesub_core.linalg import row_blocks

if TYPE_CHECKING:  # family imports this module
    from safesub_core.family import Family

log = logging.getLogger(__name__)

GENERATION_FILES = ("generation_config.json",)
# what AutoTokenizer reads from a folder: the tokenizer itself (fast or slow: vocabularies, merges, sentencepiece
# models), its special and added tokens, the chat templates, and config.json (where the tokenizer class may be named)
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "additional_chat_templates/*", "vocab*", "merges.txt", "*.model",
                   "*.tiktoken", "config.json")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "chat_template.json")  # checked for being JSON before a tokenizer is loaded
RACY_NS = 2_000_000_000  # a file changed this recently (ns) is hashed afresh on every fingerprint
HASH_INDEX = Path(".fingerprints") / "files.json"  # under the cache folder; a dot folder, so DiskCache leaves it be
HASH_INDEX_FORMAT = "safesub file sha256 index v1"
HASH_INDEX_PRUNE = 4096  # past this many entries, a write drops those whose file is gone
PROGRESS_S = 0.2  # the least time between two progress calls while hashing
Progress = Callable[[int, int, str], None]  # progress(done_bytes, total_bytes, what)
_SNAPSHOT: ContextVar[dict | None] = ContextVar("fingerprint_snapshot", default=None)


class Owner(Protocol):
    """What a checkpoint needs of its family (`family.Family` is one): the model a LoRA adapter merges onto, and
    where a tokenizer is looked for when the checkpoint's folder has none."""

    @property
    def start_checkpoint(self) -> "Checkpoint": ...

    base: "Checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    """One model in a family: a role name, a path, and its kind ('hf', 'lora' or 'gguf')."""

    name: str
    path: Path
    kind: str
    gguf_file: str | None = None
    allow_pickle: bool = False

    @classmethod
    def resolve(cls, name: str, path: str | os.PathLike, allow_pickle: bool = False) -> "Checkpoint":
        """Detect the kind of checkpoint at `path`, or raise a one-line SafesubError naming it."""
        p = Path(path).expanduser()
        if not p.exists():
            raise SafesubError(f"checkpoint '{name}': path {p} does not exist")
        p = p.resolve()
        if p.is_file():
            if p.suffix == ".gguf":
                return cls(name, p.parent, "gguf", p.name, allow_pickle)
            raise SafesubError(f"checkpoint '{name}': {p} is a file but not a .gguf; give a model directory")
        if (p / "adapter_config.json").exists():
            return cls(name, p, "lora", None, allow_pickle)
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists():
            if len(ggufs) == 1:
                return cls(name, p, "gguf", ggufs[0].name, allow_pickle)
            raise SafesubError(f"checkpoint '{name}': directory {p} has no config.json (not a Hugging Face model)")
        if not list(p.glob("*.safetensors")):
            if list(p.glob("*.bin")) and not allow_pickle:
                raise SafesubError(
                    f"checkpoint '{name}': {p} holds only pickle .bin weights; convert to safetensors or allow pickle"
                )
            if not list(p.glob("*.bin")):
                raise SafesubError(f"checkpoint '{name}': directory {p} has no weights (*.safetensors)")
        return cls(name, p, "hf", None, allow_pickle)

    def weight_files(self) -> list[Path]:
        if self.kind == "gguf":
            return [self.path / self.gguf_file]
        stem = "adapter_model" if self.kind == "lora" else "*"
        return self.files((f"{stem}.safetensors",)) or self.files((f"{stem}.bin",))

    def files(self, patterns: tuple[str, ...]) -> list[Path]:
        """The checkpoint's files matching any of `patterns` (a name pattern, or 'folder/pattern' one folder down),
        sorted by their path in the checkpoint's folder (each folder listed once per `snapshot`)."""
        found = []
        for pat in patterns:
            sub, _, name = pat.rpartition("/")
            folder = self.path / sub if sub else self.path
            found += [folder / n for n in _file_names(folder) if fnmatch.fnmatchcase(n, name)]
        return sorted(set(found), key=lambda f: f.relative_to(self.path).as_posix())

    def fingerprint(self, owner: Owner | None = None, progress: Progress | None = None) -> str:
        """Content hash of the tensors this checkpoint stands for (see the module docstring): its weights and config
        files; a LoRA adapter given its family also folds in the start model's fingerprint. Without an index or a
        start model the digest is the one earlier versions wrote, so their subspace and overlap entries stay valid.
        `progress(done_bytes, total_bytes, what)` follows the hashing of files whose hash is not known yet."""
        if progress is not None:
            files = [(self, f) for f in self._tensor_files()]
            if self.kind == "lora" and owner is not None and owner.start_checkpoint != self:
                files += [(owner.start_checkpoint, f) for f in owner.start_checkpoint._tensor_files()]
            prehash(files, progress)
        return _memo("tensors", self, owner, lambda: self._fingerprint(owner))

    def _tensor_files(self) -> list[Path]:
        """The files the tensor fingerprint reads, in its order: weights, their index, config.json and
        adapter_config.json."""
        named = {f.name: f for f in self.files(("*.safetensors.index.json", "config.json", "adapter_config.json"))}
        configs = [named[n] for n in ("config.json", "adapter_config.json") if n in named]
        index = [f for n, f in sorted(named.items()) if n.endswith(".index.json")]
        return self.weight_files() + index + configs

    def _fingerprint(self, owner: Owner | None) -> str:
        h = hashlib.sha256(self.kind.encode())
        for f in self._tensor_files():
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
        if self.kind == "lora" and owner is not None and owner.start_checkpoint != self:
            h.update(b"start:" + owner.start_checkpoint.fingerprint(owner).encode())
        return h.hexdigest()[:16]

    def tokenizer_files(self) -> list[Path]:
        """The files a tokenizer loaded from this checkpoint's folder is read from (a GGUF's own file included)."""
        files = self.files(TOKENIZER_FILES)
        return files + self.weight_files() if self.kind == "gguf" else files


@contextmanager
def snapshot() -> Iterator[None]:
    """Fingerprints asked for within it are worked out once each (files listed and stat'ed once): for a caller that
    needs several of the same checkpoints at one moment. Nested snapshots share the outer one; per thread."""
    token = _SNAPSHOT.set({}) if _SNAPSHOT.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _SNAPSHOT.reset(token)


def _memo(kind: str, ckpt: Checkpoint, owner: Owner | None, compute: Callable[[], str]) -> str:
    """compute(), remembered for the current `snapshot` (if any) by kind, checkpoint and the owner's roles."""
    memo = _SNAPSHOT.get()
    if memo is None:
        return compute()
    key = (kind, ckpt) + ((owner.start_checkpoint, owner.base) if owner is not None else ())
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def _file_names(folder: Path) -> tuple[str, ...]:
    """Names of the regular files (or links to them) in `folder`; none when it is not a folder."""
    def compute() -> tuple[str, ...]:
        try:
            with os.scandir(folder) as entries:
                return tuple(e.name for e in entries if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return ()

    memo = _SNAPSHOT.get()
    if memo is None:
        return compute()
    key = ("listing", str(folder))
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def _digest(root: Path, files: list[Path], parts: list[str]) -> str:
    """16 hex digits of the files' names (relative to `root`) and contents, after `parts`."""
    h = hashlib.sha256(json.dumps(parts).encode())
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(file_sha256(f).encode())
    return h.hexdigest()[:16]


def file_sha256(path: Path, meter: "_Meter | None" = None) -> str:
    """SHA-256 of a file's content, kept in memory and in the cache folder's index by its real path, size, mtime,
    ctime and inode (hashed afresh, and not stored, within RACY_NS of its last change); `meter` counts the bytes
    read when it must be hashed."""
    real = os.path.realpath(path)
    try:
        stamp = _stamp(real)
    except OSError as err:  # e.g. removed between the folder's listing and now
        raise SafesubError(f"file {path}: cannot be read ({err.strerror or type(err).__name__})") from None
    racy = time.time_ns() - stamp[1] < RACY_NS
    known = None if racy else _known_sha256(real, stamp)
    if known is not None:
        return known
    try:
        digest = _hash_file(real, meter)
        unchanged = _stamp(real) == stamp  # not rewritten while it was read
    except OSError as err:
        raise SafesubError(f"file {path}: cannot be read ({err.strerror or type(err).__name__})") from None
    if not racy and unchanged:
        _store_sha256(real, stamp, digest)
    return digest


Stamp = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode
_HASH_LOCK = threading.Lock()  # guards the in-process memo, the loaded indexes and the counters
_KNOWN: dict[str, tuple[Stamp, str]] = {}  # real path -> (stamp, sha256), this process's memo
_INDEXES: dict[str, tuple[tuple[int, int, int], dict[str, tuple[Stamp, str]]]] = {}  # index file -> (its stat, entries)
_COUNTS = {"files": 0, "bytes": 0}
_WARNED: set[str] = set()
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MEMO_MAX = 65536


def _stamp(real: str) -> Stamp:
    st = os.stat(real)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _hash_file(path: str, meter: "_Meter | None" = None) -> str:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
            n += len(chunk)
            if meter is not None:
                meter.add(len(chunk))
    with _HASH_LOCK:
        _COUNTS["files"] += 1
        _COUNTS["bytes"] += n
    return h.hexdigest()


def hash_counts() -> dict[str, int]:
    """How many files (and bytes) this process has hashed so far: {"files": n, "bytes": b}."""
    with _HASH_LOCK:
        return dict(_COUNTS)


def clear_hash_memo() -> None:
    """Forget the file hashes this process holds in memory (what a restart forgets); the index on disk stays."""
    with _HASH_LOCK:
        _KNOWN.clear()
        _INDEXES.clear()


def _index_file() -> Path:
    return settings.cache_root() / HASH_INDEX


def _known_sha256(real: str, stamp: Stamp) -> str | None:
    """The stored hash of the file at `real` if it was taken at this very stamp: from memory, else from the index."""
    with _HASH_LOCK:
        hit = _KNOWN.get(real)
    if hit is None or hit[0] != stamp:
        hit = _read_index(_index_file()).get(real)
        if hit is None or hit[0] != stamp:
            return None
        _remember(real, *hit)
    return hit[1]


def _remember(real: str, stamp: Stamp, digest: str) -> None:
    with _HASH_LOCK:
        _KNOWN.pop(real, None)
        _KNOWN[real] = (stamp, digest)
        if len(_KNOWN) > _MEMO_MAX:
            del _KNOWN[next(iter(_KNOWN))]


def _read_index(index: Path) -> dict[str, tuple[Stamp, str]]:
    """The index file's entries (real path -> (stamp, sha256)), re-read only when the file changed; an absent,
    unreadable, corrupt or foreign file reads as no entries (and a bad entry as absent)."""
    try:
        st = index.stat()
    except OSError:
        return {}
    sig = (st.st_size, st.st_mtime_ns, st.st_ino)
    with _HASH_LOCK:
        loaded = _INDEXES.get(str(index))
    if loaded is not None and loaded[0] == sig:
        return loaded[1]
    try:
        doc = json.loads(index.read_bytes())
    except (OSError, ValueError, RecursionError):
        doc = None
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == HASH_INDEX_FORMAT else None
    entries = {}
    for real, entry in (files.items() if isinstance(files, dict) else ()):
        if (isinstance(entry, list) and len(entry) == 5 and all(type(v) is int for v in entry[:4])
                and isinstance(entry[4], str) and _SHA256.match(entry[4])):
            entries[real] = (tuple(entry[:4]), entry[4])
    with _HASH_LOCK:
        _INDEXES[str(index)] = (sig, entries)
    return entries


def _store_sha256(real: str, stamp: Stamp, digest: str) -> None:
    """Remember a file's hash, and add it to the cache folder's index: under the index's lock, merged with the
    entries other processes wrote, atomically. A cache that cannot be written only warns (once per index)."""
    _remember(real, stamp, digest)
    index = _index_file()
    lock = settings.cache_root() / ".locks" / "fingerprints.lock"
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock), timeout=30):
            entries = dict(_read_index(index))
            entries[real] = (stamp, digest)
            if len(entries) > HASH_INDEX_PRUNE:
                entries = {p: e for p, e in entries.items() if os.path.exists(p)}
            doc = {"format": HASH_INDEX_FORMAT, "files": {p: [*e[0], e[1]] for p, e in sorted(entries.items())}}
            tmp = index.with_name(f".{index.name}.{uuid.uuid4().hex[:12]}.tmp")
            try:
                tmp.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
                os.replace(tmp, index)
            finally:
                tmp.unlink(missing_ok=True)
            st = index.stat()
            with _HASH_LOCK:
                _INDEXES[str(index)] = ((st.st_size, st.st_mtime_ns, st.st_ino), entries)
    except OSError as err:  # read-only or full cache, a lock not got in time (filelock.Timeout is an OSError)
        if str(index) not in _WARNED:
            _WARNED.add(str(index))
            log.warning("file hashes are not stored in %s (%s): they are computed again at the next start",
                        index, err.strerror or type(err).__name__)


class _Meter:
    """Bytes hashed out of `total`, told to `progress(done, total, what)`: at the start of each file, at most every
    PROGRESS_S seconds within one, and at the end."""

    def __init__(self, progress: Progress, total: int):
        self.progress, self.total, self.done, self.what, self._told = progress, total, 0, "", 0.0

    def start(self, what: str) -> None:
        self.what = what
        self._tell()

    def add(self, n: int) -> None:
        self.done = min(self.done + n, self.total)
        if time.monotonic() - self._told >= PROGRESS_S:
            self._tell()

    def finish(self) -> None:
        self.done = self.total
        self._tell()

    def _tell(self) -> None:
        self._told = time.monotonic()
        self.progress(self.done, self.total, self.what)


def prehash(files: Iterable[tuple["Checkpoint", Path]], progress: Progress | None) -> int:
    """Hash (and store) each (checkpoint, file) whose hash is not known, telling `progress` the bytes done (what:
    "<checkpoint>: <file>"); returns the bytes hashed. Files are counted once (by real path); a file that cannot
    be read is left to the fingerprint that reads it (its one-line error)."""
    pending, seen = [], set()
    for ckpt, f in files:
        real = os.path.realpath(f)
        if real in seen:
            continue
        seen.add(real)
        try:
            stamp = _stamp(real)
        except OSError:
            continue
        if time.time_ns() - stamp[1] < RACY_NS or _known_sha256(real, stamp) is None:
            pending.append((f"{ckpt.name}: {f.relative_to(ckpt.path).as_posix()}", f, stamp[0]))
    if not pending:
        return 0
    meter = _Meter(progress or (lambda done, total, what: None), sum(size for _, _, size in pending))
    for what, f, _ in pending:
        meter.start(what)
        file_sha256(f, meter)
    meter.finish()
    return meter.total


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


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class TensorReader:
    """Read a checkpoint's float tensors one at a time, as float32 CPU tensors.

    Names are those of the HF state dict (e.g. 'model.layers.0.self_attn.q_proj.weight'); a tied lm_head is
    listed once (as the embedding). A LoRA reader needs the reader of its base (the family's start model).
    """

    def __init__(self, ckpt: Checkpoint, lora_base: "TensorReader | None" = None):
        self.ckpt = ckpt
        self._index: dict[str, tuple[Path, tuple[int, ...], str]] = {}  # name -> file, shape, dtype
        self._state: dict[str, torch.Tensor] | None = None
        self._lora: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
        self.base = lora_base
        if ckpt.kind == "hf":
            self._index_hf()
        elif ckpt.kind == "gguf":
            model = load_model(ckpt)[0]
            self._state = {k: v.detach().float() for k, v in model.state_dict().items()}
            self._tied = bool(getattr(model.config, "tie_word_embeddings", False))
        else:
            if lora_base is None:
                raise SafesubError(f"checkpoint '{ckpt.name}': a LoRA adapter needs its base model")
            self._index_lora()

    # -- hf
    def _index_hf(self):
        files = self.ckpt.weight_files()
        for f in files:
            if f.suffix == ".bin":
                if not self.ckpt.allow_pickle:
                    raise SafesubError(f"checkpoint '{self.ckpt.name}': pickle weights {f.name} refused")
                self._state = self._state or {}
                self._state.update(torch.load(f, map_location="cpu", weights_only=True))
                continue
            try:
                with safe_open(f, framework="pt") as fh:
                    for k in fh.keys():
                        sl = fh.get_slice(k)
                        self._index[k] = (f, tuple(sl.get_shape()), sl.get_dtype())
            except Exception as err:  # safetensors raises several error types for damaged files
                raise SafesubError(
                    f"checkpoint '{self.ckpt.name}': weights file {f.name} is truncated or corrupted ({err})"
                ) from None
        cfg = _read_config(self.ckpt)
        self._tied = bool(cfg.get("tie_word_embeddings", False))

    # -- lora
    def _index_lora(self):
        cfg = lora_config(self.ckpt)
        if getattr(cfg, "use_dora", False):
            raise SafesubError(f"adapter '{self.ckpt.name}': DoRA adapters are not supported (merge it first)")
        files = self.ckpt.weight_files()
        if not files or files[0].suffix != ".safetensors":
            raise SafesubError(f"adapter '{self.ckpt.name}': no adapter_model.safetensors in {self.ckpt.path}")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        try:
            with safe_open(files[0], framework="pt") as fh:
                keys = list(fh.keys())
                for k in keys:
                    m = _LORA_KEY.match(k)
                    if m:
                        pairs.setdefault(m.group(1), {})[m.group(2)] = fh.get_tensor(k).float()
        except Exception as err:  # safetensors raises several error types for damaged files
            raise SafesubError(
                f"adapter '{self.ckpt.name}': weights file {files[0].name} is truncated or corrupted ({err})"
            ) from None
        odd = next((k for k in keys if not _LORA_KEY.match(k)), None)
        if odd is not None:
            raise SafesubError(f"adapter '{self.ckpt.name}': unsupported adapter tensor {odd}")
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                has, lacks = ("A", "B") if "A" in ab else ("B", "A")
                raise SafesubError(f"adapter '{self.ckpt.name}': {module} has lora_{has} but no lora_{lacks} in "
                                   f"{files[0].name} (an incomplete adapter)")
            A, B = ab["A"], ab["B"]
            if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
                raise SafesubError(f"adapter '{self.ckpt.name}': {module} has lora_A of shape {tuple(A.shape)} and "
                                   f"lora_B of shape {tuple(B.shape)}, which do not multiply (B @ A)")
        base_names = set(self.base.names())
        for module, ab in pairs.items():
            target = module + ".weight"
            if target not in base_names:
                raise SafesubError(
                    f"adapter '{self.ckpt.name}': targets {module}, which does not exist in the base model"
                )
            A, B = ab["A"], ab["B"]
            r = A.shape[0]
            alpha = next((v for p, v in (cfg.alpha_pattern or {}).items() if re.search(p, module)), cfg.lora_alpha)
            scale = alpha / (r**0.5 if cfg.use_rslora else r)
            shape = self.base.shape(target)
            delta_shape = (B.shape[0], A.shape[1]) if not cfg.fan_in_fan_out else (A.shape[1], B.shape[0])
            if tuple(delta_shape) != tuple(shape):
                raise SafesubError(
                    f"adapter '{self.ckpt.name}': {module} is {delta_shape[0]}x{delta_shape[1]} but the base "
                    f"tensor is {shape[0]}x{shape[1]} (an adapter made for another base?)"
                )
            self._lora[target] = (A, B, scale, bool(cfg.fan_in_fan_out))

    # -- the interface
    def names(self) -> list[str]:
        if self.ckpt.kind == "lora":
            return self.base.names()
        keys = list(self._state) if self._state is not None and not self._index else list(self._index)
        if self._state is not None and self._index:
            keys += [k for k in self._state if k not in self._index]
        if self._tied and "lm_head.weight" in keys and any(k.endswith("embed_tokens.weight") for k in keys):
            keys.remove("lm_head.weight")
        return [k for k in keys if self._is_float(k)]

    def _is_float(self, name: str) -> bool:
        if name in self._index:
            return self._index[name][2].startswith(("F", "BF"))  # safetensors dtype codes: F32, BF16, ...
        return self._state[name].is_floating_point()

    def shape(self, name: str) -> tuple[int, ...]:
        if self.ckpt.kind == "lora":
            return self.base.shape(name)
        if name in self._index:
            return self._index[name][1]
        return tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` as float32 on CPU; NaN or infinite values raise a one-line SafesubError.

        A safetensors tensor is read linalg.READ_BLOCK elements (whole rows) at a time, each block through its own
        mapping of the file: reading holds the result and one block, never also the tensor's mapped file pages
        and a NaN mask of its size.
        """
        shape = self.shape(name)
        if self.ckpt.kind == "lora" or name not in self._index or len(shape) == 0:
            return self._read(name)
        out = torch.empty(shape)
        for rows in row_blocks(shape):
            out[rows] = self._read(name, rows)
        return out

    def difference(self, other: "TensorReader", name: str) -> torch.Tensor:
        """get(name) - other.get(name), formed a block of rows at a time: neither tensor is ever read whole."""
        shape = self.shape(name)
        if len(shape) == 0:
            return self.get(name) - other.get(name)
        out = torch.empty(shape)
        for rows in row_blocks(shape):
            out[rows] = self.get_rows(name, rows.start, rows.stop) - other.get_rows(name, rows.start, rows.stop)
        return out

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop (along the first dimension) of the tensor `name`, exactly as in `get(name)`; from a
        safetensors file only those rows are read."""
        return self._read(name, slice(start, stop))

    def get_elements(self, name: str, i: int, j: int) -> torch.Tensor:
        """Elements i:j of the flattened tensor `name`, reading only the rows that hold them."""
        row = math.prod(self.shape(name)[1:])  # elements per row along the first dimension (1 for a vector)
        r0, r1 = i // row, -(-j // row)
        return self.get_rows(name, r0, r1).reshape(-1)[i - r0 * row:j - r0 * row]

    def _read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor `name` (or only its `rows`) as float32 on CPU, checked for NaN and infinite values."""
        if self.ckpt.kind == "lora":
            w = self.base.get(name) if rows is None else self.base.get_rows(name, rows.start, rows.stop)
            if name in self._lora:
                A, B, scale, fifo = self._lora[name]
                delta = scale * (B @ A)
                delta = delta.T if fifo else delta
                w = w + (delta if rows is None else delta[rows])
        elif name in self._index:
            f = self._index[name][0]
            try:
                with safe_open(f, framework="pt") as fh:  # closed (unmapped) before the next block is read
                    w = (fh.get_tensor(name) if rows is None else fh.get_slice(name)[rows]).float()
            except Exception as err:
                raise SafesubError(f"checkpoint '{self.ckpt.name}': cannot read {name} from {f.name} ({err})") from None
        else:
            w = (self._state[name] if rows is None else self._state[name][rows]).float()
        if not torch.isfinite(w).all():
            raise SafesubError(f"checkpoint '{self.ckpt.name}': tensor {name} has NaN or infinite values")
        return w

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self.names():
            yield n, self.get(n)

    def check_compatible(self, other: "TensorReader") -> None:
        """Same tensor names and shapes as `other`, or a one-line error naming the first difference."""
        mine, theirs = set(self.names()), set(other.names())
        if mine - theirs:
            raise SafesubError(
                f"checkpoint '{other.ckpt.name}': is missing tensor {sorted(mine - theirs)[0]} "
                f"that '{self.ckpt.name}' has (different architecture?)"
            )
        if theirs - mine:
            raise SafesubError(
                f"checkpoint '{other.ckpt.name}': has tensor {sorted(theirs - mine)[0]} that '{self.ckpt.name}' lacks"
            )
        for n in sorted(mine):
            if tuple(self.shape(n)) != tuple(other.shape(n)):
                raise SafesubError(
                    f"checkpoint '{other.ckpt.name}': tensor {n} has shape {tuple(other.shape(n))}, "
                    f"but '{self.ckpt.name}' has {tuple(self.shape(n))} (resized vocabulary or another architecture?)"
                )


def _read_config(ckpt: Checkpoint) -> dict:
    try:
        return json.loads((ckpt.path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SafesubError(f"checkpoint '{ckpt.name}': config.json is unreadable ({type(err).__name__})") from None


def _read_json(ckpt: Checkpoint, name: str, what: str) -> dict:
    """The JSON object in the checkpoint's file `name`, or a one-line SafesubError naming `what` (checkpoint or
    adapter), the checkpoint and the file."""
    f = ckpt.path / name
    try:
        value = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SafesubError(f"{what} '{ckpt.name}': {name} is not valid JSON ({err.msg} at line {err.lineno} column "
                           f"{err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SafesubError(f"{what} '{ckpt.name}': {name} is unreadable ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise SafesubError(f"{what} '{ckpt.name}': {name} must hold a JSON object, not {type(value).__name__}")
    return value


def lora_config(ckpt: Checkpoint) -> LoraConfig:
    """The adapter's LoraConfig, or a one-line SafesubError when adapter_config.json is not JSON or not a LoRA
    adapter's config."""
    cfg = _read_json(ckpt, "adapter_config.json", "adapter")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SafesubError(f"adapter '{ckpt.name}': adapter_config.json is a {cfg['peft_type']} adapter, not LoRA")
    try:
        return LoraConfig.from_pretrained(str(ckpt.path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise SafesubError(f"adapter '{ckpt.name}': adapter_config.json is not a LoRA config ({_first_line(err)})"
                           ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


# ------------------------------------------------------------------------------------------- hub names

_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-][\w./-]*))?$")


def hub_name(text: str | os.PathLike) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `text` reads as a hub model name, `org/name` or `org/name@revision`; else
    None (a Path, an absolute or '~' or './' path, a name with more than one '/', an invalid repo id)."""
    if not isinstance(text, str):
        return None
    m = _HUB_NAME.match(text.strip())
    if m is None or ".." in (m.group("revision") or ""):
        return None
    try:
        validate_repo_id(m.group("repo"))
    except HFValidationError:
        return None
    return m.group("repo"), m.group("revision")


def hub_snapshot(role: str, text: str) -> Path:
    """The snapshot folder of the hub model `text` (`hub_name`) in the local Hugging Face cache, never the
    network; its files must all resolve inside the cache. Else one SafesubError line naming the checkpoint, the
    model and the cache folder searched."""
    parsed = hub_name(text)
    cache = settings.hub_cache().expanduser()
    what = f"checkpoint '{role}': hub model {text.strip()}"
    if parsed is None:
        raise SafesubError(f"{what}: is not a hub model name (org/name or org/name@revision)")
    repo, revision = parsed
    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError as err:
        partly = type(err).__name__ == "IncompleteSnapshotError"  # huggingface_hub >= 1.x: an interrupted download
        raise SafesubError(f"{what}: is {'only partly' if partly else 'not'} in the local Hugging Face cache {cache} "
                           f"(download it with `hf download {repo}`, or set HF_HUB_CACHE)") from None
    except (OSError, ValueError) as err:
        raise SafesubError(f"{what}: cannot be read from the local Hugging Face cache {cache} "
                           f"({_first_line(err)})") from None
    _check_inside(folder, cache.resolve(), what)
    return folder


def _check_inside(folder: Path, cache: Path, what: str) -> None:
    """Every file and folder under a hub snapshot (links followed to their targets) lies inside the hub cache."""
    for top, dirs, names in os.walk(folder):
        for name in [""] + dirs + names:
            p = Path(top, name)
            real = Path(os.path.realpath(p))
            if not real.is_relative_to(cache):
                raise SafesubError(f"{what}: {p.relative_to(folder).as_posix() or 'its snapshot folder'} links to "
                                   f"{real}, outside the Hugging Face cache {cache}")


# ------------------------------------------------------------------------------------------- model loading


def load_model(ckpt: Checkpoint, family: Owner | None = None, device: str = "cpu", dtype=torch.float32,
               tokenizer: bool = True):
    """(model, tokenizer) for a checkpoint, in eval mode; LoRA adapters are merged onto the family's start model.

    The tokenizer is `load_tokenizer`'s: from the checkpoint's own folder, else the start model's, else the base's.
    """
    if ckpt.kind == "hf":
        check_architecture(ckpt)
        check_shapes(ckpt)
    if ckpt.kind == "lora":
        if family is None:
            raise SafesubError(f"adapter '{ckpt.name}': loading an adapter needs its family (for the base)")
        if family.start_checkpoint.kind == "gguf":  # its reader would load the whole model
            lora_config(ckpt)
        else:
            TensorReader(ckpt, TensorReader(family.start_checkpoint))  # the adapter's config, pairs and shapes
    check_fits(ckpt, family, device, dtype)
    kw = dict(dtype=dtype, trust_remote_code=False, local_files_only=True)
    try:
        if ckpt.kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), gguf_file=ckpt.gguf_file, **kw)
        elif ckpt.kind == "lora":
            base, _ = load_model(family.start_checkpoint, family, device, dtype, tokenizer=False)
            model = PeftModel.from_pretrained(base, str(ckpt.path), local_files_only=True).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(ckpt.path), use_safetensors=not ckpt.allow_pickle or None, **kw
            )
    except SafesubError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise SafesubError(f"checkpoint '{ckpt.name}': cannot be loaded ({_first_line(err)})") from None
    model.to(device).eval()
    return model, (load_tokenizer(ckpt, family) if tokenizer else None)


def check_architecture(ckpt: Checkpoint) -> None:
    """Refuse, before loading, a config.json whose model type transformers does not know: it would need remote
    code (auto_map), which is never run, or a newer transformers."""
    cfg = _read_config(ckpt)
    model_type = cfg.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if cfg.get("auto_map"):
        raise SafesubError(
            f"checkpoint '{ckpt.name}': config.json needs remote code (auto_map, model type {model_type!r}), "
            "which safesub never runs"
        )
    raise SafesubError(
        f"checkpoint '{ckpt.name}': model type {model_type!r} in config.json is not supported by the installed "
        "transformers"
    )


def check_shapes(ckpt: Checkpoint) -> None:
    """Refuse, before loading, weights whose shapes config.json does not give (e.g. its hidden size is another
    checkpoint's): one line naming the first mismatching tensors and both shapes, where transformers would print a
    table and raise. The model is built on the meta device (no memory); pickle weights are not checked, nor a
    config the meta device cannot build (loading it then says what is wrong)."""
    if not list(ckpt.path.glob("*.safetensors")):
        return
    try:
        config = AutoConfig.from_pretrained(str(ckpt.path), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    except Exception:  # a check ahead of loading, not a gate: from_pretrained reports its own errors
        return
    reader = TensorReader(ckpt)
    bad = [(n, reader.shape(n), expected[n]) for n in sorted(reader._index)
           if n in expected and tuple(reader.shape(n)) != expected[n]]
    if bad:
        shown = "; ".join(f"{n} is {tuple(got)} in the weights, {want} by config.json" for n, got, want in bad[:2])
        more = f" (and {len(bad) - 2} more)" if len(bad) > 2 else ""
        raise SafesubError(f"checkpoint '{ckpt.name}': config.json does not match its weights (hidden size "
                           f"{getattr(config, 'hidden_size', '?')} there, another checkpoint's?): {shown}{more}")


def estimate_bytes(ckpt: Checkpoint, family: Owner | None = None, dtype=torch.float32) -> int:
    """Memory a loaded model needs: parameters x bytes per element (a GGUF: 8 x its file size, dequantized)."""
    if ckpt.kind == "gguf":
        return 8 * (ckpt.path / ckpt.gguf_file).stat().st_size
    if ckpt.kind == "lora":
        return estimate_bytes(family.start_checkpoint, family, dtype) if family else 0
    reader = TensorReader(ckpt)
    numel = sum(int(torch.Size(reader.shape(n)).numel()) for n in reader.names())
    return numel * torch.empty((), dtype=dtype).element_size()


def available_bytes(device: str = "cpu") -> int:
    """Free memory on the device: CUDA's mem_get_info, or MemAvailable from /proc/meminfo."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(ckpt: Checkpoint, family: Owner | None, device: str, dtype) -> None:
    """Refuse, before loading, a model that will not fit in the device's free memory."""
    need, free = estimate_bytes(ckpt, family, dtype), available_bytes(device)
    if need > free:
        raise SafesubError(
            f"checkpoint '{ckpt.name}': needs about {need / 2**30:.1f} GiB as {str(dtype).replace('torch.', '')} "
            f"but {device} has {free / 2**30:.1f} GiB free (try bfloat16, another device, or fewer resident models)"
        )


def load_tokenizer(ckpt: Checkpoint, family: Owner | None = None):
    """The tokenizer of `tokenizer_source(ckpt, family)`; a damaged tokenizer is a one-line SafesubError naming
    the checkpoint it comes from and the file."""
    c = tokenizer_source(ckpt, family)
    if c is None:
        raise SafesubError(f"checkpoint '{ckpt.name}': no tokenizer found beside it or in its family")
    for name in TOKENIZER_JSON:
        if (c.path / name).is_file():
            _read_json(c, name, "checkpoint")
    try:
        if c.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(c.path), gguf_file=c.gguf_file, local_files_only=True)
        return AutoTokenizer.from_pretrained(str(c.path), local_files_only=True)
    except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise SafesubError(f"checkpoint '{c.name}': its tokenizer cannot be loaded from {c.path.name} "
                           f"({_first_line(err)})") from None


def describe(ckpt: Checkpoint) -> dict:
    """Architecture, parameter count and dtype from the config and safetensors headers (nothing loaded)."""
    if ckpt.kind == "lora":
        cfg = _read_json(ckpt, "adapter_config.json", "adapter")
        return dict(name=ckpt.name, kind="lora", architecture=f"LoRA r={cfg.get('r')}", parameters=None,
                    dtype=None, fingerprint=ckpt.fingerprint())
    if ckpt.kind == "gguf":
        return dict(name=ckpt.name, kind="gguf", architecture=ckpt.gguf_file, parameters=None, dtype="gguf",
                    fingerprint=ckpt.fingerprint())
    reader = TensorReader(ckpt)
    cfg = _read_config(ckpt)
    params = sum(int(torch.Size(reader.shape(n)).numel()) for n in reader.names())
    return dict(
        name=ckpt.name,
        kind="hf",
        architecture=",".join(cfg.get("architectures", [cfg.get("model_type", "?")])),
        parameters=params,
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "?"),
        fingerprint=ckpt.fingerprint(),
    )


# ------------------------------------------------------------------------------------------- tensor names

_MODULES = (
    ("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"), ("gate_proj", "gate"), ("up_proj", "up"),
    ("down_proj", "down"), ("embed_tokens", "embed"), ("lm_head", "embed"), ("norm", "norm"),
)
_BLOCK = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def module_type(name: str) -> str:
    """q/k/v/o/gate/up/down/embed/norm for the usual decoder tensor names, else 'other'."""
    return next((short for key, short in _MODULES if key in name), "other")


def block_index(name: str) -> int | None:
    """The transformer block a tensor belongs to ('model.layers.7.mlp.up_proj.weight' -> 7), None outside."""
    m = _BLOCK.search("." + name)
    return int(m.group(1)) if m else None
