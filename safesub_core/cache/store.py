"""The disk cache store: a content-addressed folder of results (SVD bases, projections, overlaps, activations,
scores).

Contract:
- Keys. `DiskCache.key(namespace, parts)` is the sha256 of the canonical JSON (sorted keys, no spaces) of
  ``{"namespace": namespace, "parts": parts}`` (`codec.canonical`: anything but str, int, float, bool, None,
  lists, tuples and str-keyed dicts raises `TypeError`; ``1``, ``1.0`` and ``True`` are different keys).
- Values. A dict of tensors, a pandas DataFrame, or a JSON dict or list (`codec`: each stored without pickle).
  `get_or_compute` and `put` return the value *as stored*, exactly what a later hit returns (CPU tensors, JSON
  tuples as lists), so hit and miss never differ.
- Layout. ``<root>/<namespace>/<key[:2]>/<key>.<ext>`` (``.safetensors``, ``.frame.json`` or ``.value.json``) with
  a sidecar ``<key>.json``: format, namespace, key, parts, type, payload name, size, sha256 of the payload, created
  (UTC ISO time). Lock files live under ``<root>/.locks/`` and are kept (deleting a lock file that another process
  waits on breaks mutual exclusion); they are empty.
- Atomicity. Every file is written to a temporary name in its own folder, fsynced, then `os.replace`d: payload
  first, sidecar last, so the sidecar's presence commits the entry. A failure (an exception in ``compute``, or an
  OSError such as ENOSPC) leaves no file of the entry behind. OSErrors while writing are raised as
  `SafesubError` naming the cache folder and the problem; so is a `safetensors.SafetensorError` (its Rust writer
  reports a full disk or another I/O failure as one, not as an OSError), read as the OSError its text names
  ("code: 28" or "No space left on device" is ENOSPC).
- Read-only caches. Reads (`get`, hits of `get_or_compute`) work on a read-only cache; the first write (`put`, or
  a miss of `get_or_compute`, checked *before* ``compute`` runs) raises `SafesubError`
  ``"cache folder <root>: is read-only (set SAFESUB_CACHE to a writable folder)"``. There is no silent
  compute-without-storing: point SAFESUB_CACHE at a writable folder instead.
- Locking. A `filelock.FileLock` per key serialises writers across processes and threads: two callers missing
  the same key compute it once; the second waits, then reads. Hits read without the lock.
- Checksums. Every read verifies the payload's sha256 against the sidecar. A mismatch, a missing or unreadable
  payload or a broken sidecar logs a warning, deletes the entry (under its lock) and counts as a miss.
- Size cap. After each write, if the cache holds more than ``max_bytes`` (payload + sidecar bytes; default
  `settings.cache_max_bytes()`: SAFESUB_CACHE_MAX_BYTES or 20 GiB) the least recently used entries are deleted
  until it fits. A read touches the sidecar's mtime (`os.utime`), which is the "last used" time. The entry just
  written is never evicted, nor an entry whose lock another caller holds.
- `clear` is meant for a cache no other process is writing to at that moment.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pandas as pd
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import save_file

from safesub_core import settings
from safesub_core.cache.codec import (EXTENSIONS, as_tensors, canonical, decode, decode_frame, encode_frame,
                                      encode_json, json_bytes, kind_of)
from safesub_core.errors import SafesubError
from safesub_core.settings import cache_root

log = logging.getLogger(__name__)

V = TypeVar("V")
FORMAT = 1
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENTRY_FILE = re.compile(r"^([0-9a-f]{64})(\..+)$")
_OS_CODE = re.compile(r"\bcode:\s*(\d+)")  # safetensors' text of an I/O error: IoError(Os { code: 28, ... })
_MISSING = object()  # no committed entry
_BAD = object()  # a committed entry that fails its checksum or cannot be read

__all__ = ["DiskCache", "cache_root"]

# ---------------------------------------------------------------------------------------------------- files
# Writers take a temporary path and write the payload there; tests monkeypatch them to simulate a full disk.


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _write_tensors(path: Path, tensors: dict) -> None:
    save_file(tensors, str(path))


def _sha256(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed write: `err` itself, or the one a SafetensorError names in its text; else None."""
    if isinstance(err, OSError):
        return err
    if not isinstance(err, SafetensorError):
        return None
    text = " ".join(str(err).split())
    code = _OS_CODE.search(text)
    if code:
        return OSError(int(code.group(1)), text)
    return OSError(errno.ENOSPC, text) if "no space left" in text.lower() else OSError(text)


def _atomic_write(path: Path, writer: Callable[[Path], None]) -> tuple[str, int]:
    """Write via `writer` to a temporary file beside `path`, fsync, replace; returns (sha256, size)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        writer(tmp)
        digest, size = _sha256(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return digest, size


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------- cache


@dataclass
class _Entry:
    namespace: str
    key: str
    sidecar: Path
    files: list[Path]
    bytes: int
    last_used_ns: int


class DiskCache:
    """A content-addressed cache folder; see the module docstring for the contract."""

    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None):
        self.root = Path(root).expanduser() if root is not None else cache_root()
        self.max_bytes = int(max_bytes) if max_bytes is not None else settings.cache_max_bytes()
        if self.max_bytes <= 0:
            raise SafesubError(f"cache size cap {self.max_bytes}: must be a positive number of bytes")

    def __repr__(self) -> str:
        return f"DiskCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # -- keys and paths

    @staticmethod
    def key(namespace: str, parts: dict) -> str:
        """sha256 hex of the canonical JSON of namespace and parts; TypeError for parts JSON cannot hold exactly."""
        if not isinstance(namespace, str):
            raise TypeError(f"cache namespace {namespace!r} is not a str")
        doc = {"namespace": namespace, "parts": canonical(parts, "parts")}
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _folder(self, namespace: str, key: str) -> Path:
        if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
            raise SafesubError(f"cache namespace {namespace!r}: use letters, digits, '_', '-', '.' (not leading '.')")
        return self.root / namespace / key[:2]

    # -- public API

    def get(self, namespace: str, parts: dict) -> Any | None:
        """The stored value, or None when absent (a corrupt entry is deleted and reads as absent)."""
        key = self.key(namespace, parts)
        value = self._load_checked(namespace, key)
        return None if value is _MISSING else value

    def put(self, namespace: str, parts: dict, value: Any) -> Any:
        """Store `value` (replacing any entry for these parts); returns the value as stored."""
        key = self.key(namespace, parts)
        self._folder(namespace, key)
        self._check_writable()
        with self._locked(namespace, key):
            stored = self._store(namespace, key, parts, value)
        self._evict(keep=key)
        return stored

    def get_or_compute(self, namespace: str, parts: dict, compute: Callable[[], V]) -> V:
        """The stored value for these parts, or `compute()` stored and returned (computed once across callers)."""
        key = self.key(namespace, parts)
        value = self._load(namespace, key)
        if value is not _MISSING and value is not _BAD:
            log.debug("cache hit %s/%s", namespace, key)
            return value
        self._check_writable()  # before compute: a read-only cache fails fast instead of wasting the work
        with self._locked(namespace, key):
            value = self._load(namespace, key)
            if value is _BAD:
                self._drop_bad(namespace, key)
            elif value is not _MISSING:
                return value
            log.debug("cache miss %s/%s: computing", namespace, key)
            stored = self._store(namespace, key, parts, compute())
        self._evict(keep=key)
        return stored

    def info(self):
        """A DataFrame with one row per namespace: namespace, entries, bytes (payloads + sidecars)."""
        totals: dict[str, list[int]] = {}
        for e in self._entries():
            t = totals.setdefault(e.namespace, [0, 0])
            t[0] += 1
            t[1] += e.bytes
        rows = [(ns, n, b) for ns, (n, b) in sorted(totals.items())]
        df = pd.DataFrame(rows, columns=["namespace", "entries", "bytes"])
        return df.astype({"entries": "int64", "bytes": "int64"})

    def clear(self, namespace: str | None = None) -> int:
        """Delete all entries (of one namespace, or all); returns how many entries were removed.

        Also removes stray temporaries and payloads without a sidecar in those folders. Lock files stay.
        """
        if namespace is not None:
            self._folder(namespace, "00")
        removed = 0
        for ns_dir in self._namespace_dirs():
            if namespace is not None and ns_dir.name != namespace:
                continue
            for sub in [p for p in ns_dir.iterdir() if p.is_dir()]:
                names = sorted(os.listdir(sub), key=lambda n: not n.endswith(".json") or n.count(".") > 1)
                for name in names:  # sidecars first, so no entry is ever committed without its payload
                    m = _ENTRY_FILE.match(name)
                    if m and m.group(2) == ".json":
                        removed += 1
                    if m or name.endswith(".tmp"):
                        _unlink(sub / name)
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                ns_dir.rmdir()
        return removed

    # -- internals

    def _error(self, err: OSError) -> SafesubError:
        code = err.errno
        if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            problem = "no space left on the device (free some, lower SAFESUB_CACHE_MAX_BYTES or set SAFESUB_CACHE)"
        elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
            problem = "is read-only (set SAFESUB_CACHE to a writable folder)"
        elif code in (errno.ENOTDIR, errno.EEXIST):
            problem = "is not a folder (set SAFESUB_CACHE to a writable folder)"
        else:
            problem = f"cannot be written ({err.strerror or err})"
        return SafesubError(f"cache folder {self.root}: {problem}")

    def _check_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise SafesubError(f"cache folder {self.root}: is not a folder (set SAFESUB_CACHE to a writable folder)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._error(err) from err
        if not os.access(self.root, os.W_OK):
            raise SafesubError(f"cache folder {self.root}: is read-only (set SAFESUB_CACHE to a writable folder)")

    @contextlib.contextmanager
    def _locked(self, namespace: str, key: str, timeout: float = -1) -> Iterator[bool]:
        """Hold the key's file lock; with timeout 0 yields False instead of waiting when another holds it."""
        path = self.root / ".locks" / namespace / key[:2] / f"{key}.lock"
        lock = FileLock(str(path), timeout=timeout)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            got = True
        except Timeout:
            got = False
        except OSError as err:
            raise self._error(err) from err
        try:
            yield got
        finally:
            if got:
                lock.release()

    def _load(self, namespace: str, key: str) -> Any:
        """The value, `_MISSING` (no sidecar) or `_BAD` (sidecar or payload broken). Touches the sidecar on a hit."""
        folder = self._folder(namespace, key)
        sidecar = folder / f"{key}.json"
        try:
            meta = json.loads(sidecar.read_bytes())
            kind = meta["type"]
            payload = folder / f"{key}{EXTENSIONS[kind]}"
            digest, _ = _sha256(payload)
            if digest != meta["sha256"]:
                log.warning("cache entry %s/%s: payload checksum mismatch", namespace, key)
                return _BAD
            value = decode(kind, payload)
        except (FileNotFoundError, NotADirectoryError) as err:
            if err.filename == str(sidecar):
                return _MISSING
            log.warning("cache entry %s/%s: payload missing", namespace, key)
            return _BAD
        except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed
            log.warning("cache entry %s/%s: unreadable (%s)", namespace, key, err)
            return _BAD
        with contextlib.suppress(OSError):  # last-used time for LRU; a read-only cache just skips it
            now = time.time_ns()
            os.utime(sidecar, ns=(now, now))
        return value

    def _load_checked(self, namespace: str, key: str) -> Any:
        value = self._load(namespace, key)
        if value is not _BAD:
            return value
        with self._locked(namespace, key):
            value = self._load(namespace, key)  # a writer may have been halfway through replacing it
            if value is _BAD:
                self._drop_bad(namespace, key)
                return _MISSING
            return value

    def _drop_bad(self, namespace: str, key: str) -> None:
        log.warning("cache entry %s/%s: corrupt or unreadable, deleting and recomputing", namespace, key)
        self._remove_files(self._folder(namespace, key), key)

    @staticmethod
    def _remove_files(folder: Path, key: str) -> None:
        _unlink(folder / f"{key}.json")  # the sidecar first: the entry stops existing before its payload goes
        for ext in EXTENSIONS.values():
            _unlink(folder / f"{key}{ext}")

    def _store(self, namespace: str, key: str, parts: dict, value: Any) -> Any:
        """Write payload then sidecar (caller holds the key's lock); returns the value as a later read returns it."""
        kind = kind_of(value)
        if kind == "tensors":
            stored = as_tensors(value)
            writer = lambda p: _write_tensors(p, stored)  # noqa: E731
        elif kind == "dataframe":
            data = encode_frame(value)
            stored = decode_frame(data)
            writer = lambda p: _write_bytes(p, data)  # noqa: E731
        else:
            data = encode_json(value)
            stored = json.loads(data)
            writer = lambda p: _write_bytes(p, data)  # noqa: E731
        folder = self._folder(namespace, key)
        payload, sidecar = folder / f"{key}{EXTENSIONS[kind]}", folder / f"{key}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._remove_files(folder, key)  # replacing an entry: uncommit the old one first
            digest, size = _atomic_write(payload, writer)
            meta = {
                "format": FORMAT,
                "namespace": namespace,
                "key": key,
                "parts": canonical(parts, "parts"),
                "type": kind,
                "payload": payload.name,
                "size": size,
                "sha256": digest,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            _atomic_write(sidecar, lambda p: _write_bytes(p, json_bytes(meta)))
            now = time.time_ns()
            os.utime(sidecar, ns=(now, now))
            _fsync_dir(folder)
        except BaseException as err:
            self._remove_files(folder, key)
            os_err = _os_error(err)
            if os_err is not None:
                raise self._error(os_err) from err
            raise
        return stored

    def _namespace_dirs(self) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _entries(self) -> Iterator[_Entry]:
        """Committed entries (those with a sidecar), with their size and last-used time."""
        for ns_dir in self._namespace_dirs():
            for sub in ns_dir.iterdir():
                if not sub.is_dir():
                    continue
                groups: dict[str, list[os.DirEntry]] = {}
                with contextlib.suppress(OSError):
                    for de in os.scandir(sub):
                        m = _ENTRY_FILE.match(de.name)
                        if m:
                            groups.setdefault(m.group(1), []).append(de)
                for key, des in groups.items():
                    side = next((d for d in des if d.name == f"{key}.json"), None)
                    if side is None:
                        continue
                    try:
                        stats = {d.name: d.stat() for d in des}
                    except FileNotFoundError:
                        continue  # deleted while we looked
                    yield _Entry(ns_dir.name, key, Path(side.path), [Path(d.path) for d in des],
                                 sum(s.st_size for s in stats.values()), stats[side.name].st_mtime_ns)

    def _evict(self, keep: str) -> None:
        """Delete least-recently-used entries until the cache fits `max_bytes`, never the entry `keep`."""
        entries = list(self._entries())
        total = sum(e.bytes for e in entries)
        if total <= self.max_bytes:
            return
        for e in sorted(entries, key=lambda e: e.last_used_ns):
            if total <= self.max_bytes:
                break
            if e.key == keep:
                continue
            with self._locked(e.namespace, e.key, timeout=0) as got:
                if not got:
                    continue  # another caller is reading/writing it right now
                log.info("cache: evicting %s/%s (%d bytes, least recently used)", e.namespace, e.key, e.bytes)
                self._remove_files(e.sidecar.parent, e.key)
            total -= e.bytes
