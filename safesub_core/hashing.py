"""File hashing: a file's SHA-256, kept by its stamp in memory and on disk, and worked out once per snapshot.

A file's SHA-256 is kept, in this process and on disk (HASH_INDEX under `settings.cache_root()`, one JSON file
shared by every process on that cache), by the file's real path, size, mtime, ctime and inode, and computed again
only when one of them changes: a restart hashes no unchanged weight file. A file changed within RACY_NS is hashed
afresh every time and never stored (its timestamp may not yet tell a second change apart, as in git's "racy"
files). The index is written atomically (a temporary file, then `os.replace`) under a file lock, merged with what
other processes stored; a missing, corrupt or foreign index reads as empty and is rebuilt by the next write; a
read-only or full cache only stops hashes being stored (one warning), never a fingerprint. `hash_counts()` counts
the files and bytes this process hashed; `clear_hash_memo()` forgets what it remembers in memory (as a restart
does). Hashing that must happen can be followed: `prehash(files, progress)` (what `Checkpoint.fingerprint(owner,
progress=...)` and `fingerprints.fingerprint_all(family, progress)` call) calls `progress(done_bytes, total_bytes,
what)` (what: "<checkpoint>: <file>") from (0, total) to (total, total), at most every PROGRESS_S seconds in
between, and not at all when every file's hash is known. Within `snapshot()` each fingerprint is worked out once
(`_memo`; a cache key asks for the start model's several times) and each checkpoint folder listed once.

The place both `checkpoints` (whose `Checkpoint.fingerprint` hashes files) and `fingerprints` import: this module
imports neither at run time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from filelock import FileLock

from safesub_core import settings
from safesub_core.errors import SafesubError

if TYPE_CHECKING:  # checkpoints imports this module
    from safesub_core.checkpoints import Checkpoint, Owner

log = logging.getLogger(__name__)

RACY_NS = 2_000_000_000  # a file changed this recently (ns) is hashed afresh on every fingerprint
HASH_INDEX = Path(".fingerprints") / "files.json"  # under the cache folder; a dot folder, so DiskCache leaves it be
HASH_INDEX_FORMAT = "safesub file sha256 index v1"
HASH_INDEX_PRUNE = 4096  # past this many entries, a write drops those whose file is gone
PROGRESS_S = 0.2  # the least time between two progress calls while hashing
Progress = Callable[[int, int, str], None]  # progress(done_bytes, total_bytes, what)
_SNAPSHOT: ContextVar[dict | None] = ContextVar("fingerprint_snapshot", default=None)


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
