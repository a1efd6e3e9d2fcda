"""Set specs: the one grammar that names an evaluation set (family files, CLI flags, URL parameters, the Family page).

Contract (docs/method.md, "Evaluation sets"):
- A spec is ``SOURCE[,key=value]...``. SOURCE is a named set (`named.available_sets()`, optionally ``NAME:train``
  / ``NAME:eval``) or a file path (TXT, CSV, JSON, JSONL, YAML seeds; `files.load_file`); it is a file when it ends
  with a prompt-file extension, holds a path separator or exists. Keys: ``prompt=FIELD`` and ``reference=FIELD``
  (the field or column of a file's prompts and reference answers), ``split=train|eval|all`` (the fixed split,
  `PromptSet.split`; a named set or a file without one is taken whole), ``n=INT`` (the first n prompts, after the
  split) and ``convention=flexible|strict`` (the exact-match convention, utility role only; `scoring.text`). A
  comma inside a file name is kept when no key precedes it; a part that looks like ``word=value`` is a key.
- In a family file a spec may also be a mapping {set | path, prompt, reference, split, n, convention}.
- `SetSpec.parse(text_or_mapping, where)` checks the syntax only; `SetSpec.load(role, base_dir, confined, where)`
  reads the set (`check_spec(text, role)`: the same for a typed or linked spec, confined): a relative path is
  relative to `base_dir`; with `confined`, a path must resolve inside the allowed roots (`paths.confine`) or be a
  file this server stored from an upload (`uploads_dir()`, `save_upload`; `upload_spec` joins its path and the keys
  typed beside it).
- A role (ROLES: harmful, utility, benign, edgy) gives a file its kind (ROLE_KINDS); a utility set must carry
  reference answers. Every problem (unknown key or set, bad value, missing field, a utility set without references,
  an empty set, a file that is not UTF-8) is ONE SafesubError line opening with `where` and naming the set or file.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from safesub_core import settings
from safesub_core.errors import SafesubError
from safesub_core.paths import confine, expanded, real_path
from safesub_core.prompts.builtin import BUILTIN_DESCRIPTIONS
from safesub_core.prompts.files import EXTENSIONS, load_file
from safesub_core.prompts.named import _PACKAGED, load_set
from safesub_core.prompts.sets import PromptSet

ROLES = ("harmful", "utility", "benign", "edgy")
ROLE_KINDS = {"harmful": "harmful", "utility": "math", "benign": "benign", "edgy": "edgy"}
KEYS = ("prompt", "reference", "split", "n", "convention")
MAPPING_KEYS = ("set", "path") + KEYS
SPLITS = ("train", "eval", "all")
CONVENTIONS = ("flexible", "strict")  # scoring.text.CONVENTIONS (kept here too: prompts never import scoring)
UPLOADS = "uploads"  # the cache root's folder of sets uploaded to the app (content-addressed)
_KEY_PART = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=(.*)$", re.S)


def _named(source: str) -> bool:
    return source.partition(":")[0].strip().lower() in (*BUILTIN_DESCRIPTIONS, *_PACKAGED)


def _is_file(source: str, base_dir: Path | None) -> bool:
    """A file when it ends with a prompt-file extension, holds a path separator or exists; else a named set."""
    if Path(source).suffix.lower() in EXTENSIONS or "/" in source or os.sep in source or source.startswith("~"):
        return True
    if _named(source):
        return False
    try:
        return (Path(base_dir or ".") / source).expanduser().exists()
    except (OSError, RuntimeError, ValueError):
        return False


def _unknown_key(key: str, known: tuple[str, ...], where: str) -> SafesubError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(known)}"
    return SafesubError(f"{where}: unknown key {key!r} ({hint})")


@dataclass(frozen=True)
class SetSpec:
    """One parsed spec (see the module docstring); `text()` writes it back in the string grammar."""

    source: str
    prompt: str | None = None
    reference: str | None = None
    split: str | None = None
    n: int | None = None
    convention: str | None = None
    is_path: bool | None = None  # True/False when a mapping said path/set; None: decided by `_is_file`

    @classmethod
    def parse(cls, spec: Any, where: str = "set spec") -> "SetSpec":
        """A SetSpec from its string form or a family file's mapping; syntax checked, nothing read."""
        if isinstance(spec, SetSpec):
            return spec
        if isinstance(spec, Mapping):
            return cls._from_mapping(spec, where)
        if not isinstance(spec, str):
            raise SafesubError(f"{where}: a set spec is text (NAME or PATH[,key=value]...), not {type(spec).__name__}")
        if "\x00" in spec:
            raise SafesubError(f"{where}: the set spec contains a NUL character")
        parts = spec.split(",")
        source, values = parts[0], {}
        for part in parts[1:]:
            m = _KEY_PART.match(part)
            if m is None:
                if values:
                    raise SafesubError(f"{where}: {part.strip()!r} in {spec!r} is not key=value "
                                       f"(keys: {', '.join(KEYS)})")
                source += "," + part  # a comma inside a file name
                continue
            key, value = m.group(1).strip().lower(), m.group(2).strip()
            if key not in KEYS:
                raise _unknown_key(key, KEYS, where)
            if key in values:
                raise SafesubError(f"{where}: key {key!r} is given twice in {spec!r}")
            values[key] = value
        return cls._checked(source.strip(), values, where, None)

    @classmethod
    def _from_mapping(cls, doc: Mapping, where: str) -> "SetSpec":
        for key in doc:
            if str(key) not in MAPPING_KEYS:
                raise _unknown_key(str(key), MAPPING_KEYS, where)
        given = [k for k in ("set", "path") if doc.get(k) is not None]
        if len(given) != 1:
            raise SafesubError(f"{where}: give exactly one of 'set' (a named set) or 'path' (a prompt file)")
        source = doc[given[0]]
        if not isinstance(source, str):
            raise SafesubError(f"{where}: {given[0]} must be text, not {type(source).__name__}")
        values = {}
        for k in KEYS:
            v = doc.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise SafesubError(f"{where}: {k} must be text, not {type(v).__name__}")
            values[k] = str(v).strip()
        return cls._checked(source.strip(), values, where, given[0] == "path")

    @classmethod
    def _checked(cls, source: str, values: dict, where: str, is_path: bool | None) -> "SetSpec":
        if not source:
            raise SafesubError(f"{where}: no set named (give a named set or a file path)")
        for k in ("prompt", "reference"):
            if k in values and not values[k]:
                raise SafesubError(f"{where}: {k}= names no field")
        split = values.get("split")
        if split is not None and split not in SPLITS:
            raise SafesubError(f"{where}: split must be one of {', '.join(SPLITS)}, not {split!r}")
        n = values.get("n")
        if n is not None:
            try:
                n = int(n)
            except ValueError:
                raise SafesubError(f"{where}: n must be a whole number, not {n!r}") from None
            if n < 1:
                raise SafesubError(f"{where}: n must be at least 1, not {n}")
        conv = values.get("convention")
        if conv is not None and conv not in CONVENTIONS:
            raise SafesubError(f"{where}: convention must be one of {', '.join(CONVENTIONS)}, not {conv!r}")
        return cls(source, values.get("prompt"), values.get("reference"), split, n, conv, is_path)

    def text(self) -> str:
        """The spec in the string grammar (what a link, a CLI flag or the Family page's text box holds)."""
        keys = [f"{k}={getattr(self, k)}" for k in KEYS if getattr(self, k) is not None]
        return ",".join([self.source, *keys])

    def file(self, base_dir: Path | None = None) -> bool:
        """Whether the source is a file path (else a named set)."""
        return self.is_path if self.is_path is not None else _is_file(self.source, base_dir)

    def with_convention(self, convention: str | None) -> "SetSpec":
        return self if convention is None else replace(self, convention=convention)

    def load(self, role: str, base_dir: str | os.PathLike | None = None, confined: bool = False,
             where: str | None = None) -> PromptSet:
        """The prompt set this spec names, for `role` (see the module docstring); one SafesubError line."""
        if role not in ROLES:
            raise SafesubError(f"evaluation set role {role!r}: unknown (roles: {', '.join(ROLES)})")
        where = where or f"{role} set"
        if self.convention is not None and role != "utility":
            raise SafesubError(f"{where}: convention= applies to the utility set only")
        try:
            ps = self._read(role, base_dir, confined)
            if self.split not in (None, "all"):
                ps = ps.split(self.split)
            if self.n is not None:
                ps = ps.head(self.n)
        except SafesubError as err:
            raise SafesubError(f"{where}: {err}") from None
        if role == "utility" and ps.references is None:
            if self.file(_base(base_dir)):
                raise SafesubError(f"{where}: {ps.source.removeprefix('file ')} has no reference answers (name "
                                   "its reference field: reference=FIELD)")
            raise SafesubError(f"{where}: prompt set {ps.name!r} has no reference answers (choose a set with "
                               "answers, e.g. arithmetic:eval or gsm8k)")
        return ps

    def _read(self, role: str, base_dir, confined: bool) -> PromptSet:
        base = _base(base_dir)
        if not self.file(base):
            if self.prompt is not None or self.reference is not None:
                raise SafesubError(f"prompt set {self.source!r}: prompt= and reference= name the fields of a file; "
                                   "a named set has its own")
            part = self.source.partition(":")[2]
            if part and self.split is not None:
                raise SafesubError(f"prompt set {self.source!r}: give the split once (':{part}' or split=)")
            return load_set(self.source)
        path = resolve_path(self.source, base, confined)
        return load_file(path, field=self.prompt, reference=self.reference, kind=ROLE_KINDS[role],
                         name=path.stem)


def check_spec(text: str, role: str) -> None:
    """Read the set a typed or linked spec names for `role`, confined (the app's links); SafesubError if bad."""
    SetSpec.parse(text, f"{role} set").load(role, None, confined=True)


def upload_spec(role: str, path: str, keys: str = "") -> str:
    """The spec of an uploaded file: its stored path, then the keys typed beside it ('prompt=q,reference=a')."""
    keys = keys.strip()
    if keys.startswith(str(path)):  # the text box still shows this upload's spec
        keys = keys[len(str(path)):]
    keys = keys.lstrip(",").strip()
    if keys and not _KEY_PART.match(keys.split(",")[0]):
        raise SafesubError(f"{role} set: beside an upload, the text box holds only keys (prompt=FIELD, "
                           f"reference=FIELD, split=..., n=...), not {keys!r}")
    text = f"{path},{keys}" if keys else str(path)
    SetSpec.parse(text, f"{role} set")
    return text


def _base(base_dir) -> Path | None:
    return None if base_dir is None else Path(base_dir)


def resolve_path(source: str, base: Path | None, confined: bool) -> Path:
    """A spec's file path: relative to `base`; confined to the allowed roots (or the uploads folder) if asked."""
    what = "prompt file"
    p = expanded(source, what)
    if not p.is_absolute() and base is not None:
        p = base / p
    if not confined:
        return p
    real = real_path(p, what)
    up = real_path(uploads_dir(), "uploads folder")
    if real.is_relative_to(up) and real.is_file():
        return real  # a file this server stored from an upload
    return confine(p, what)


def uploads_dir() -> Path:
    """Where the app stores uploaded prompt files: <cache root>/uploads (content-addressed names)."""
    return settings.cache_root() / UPLOADS


def save_upload(name: str, data: bytes, cap_bytes: int | None = None) -> Path:
    """Store an uploaded prompt file under `uploads_dir()` as <sha256[:16]><extension> (atomically) and return its
    path; the extension must be a prompt-file one and the data at most `cap_bytes` (one SafesubError line)."""
    ext = Path(name).suffix.lower()
    if ext not in EXTENSIONS:
        raise SafesubError(f"upload {name}: unknown prompt file type {ext or '(no extension)'!r} "
                           f"(expected {', '.join(EXTENSIONS)})")
    if cap_bytes is not None and len(data) > cap_bytes:
        raise SafesubError(f"upload {name}: {len(data) / 2**20:.1f} MB is over the upload cap of "
                           f"{cap_bytes / 2**20:.0f} MB")
    folder = uploads_dir()
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}{ext}"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise SafesubError(f"upload {name}: cannot be stored in {folder} ({err.strerror or err})") from None
    return path
