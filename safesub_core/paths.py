"""Where paths typed into the app may point: the allowed roots.

Contract: `allowed_roots()` is the list of folders in the environment variable SAFESUB_ROOTS (separated by
os.pathsep), or by default the cache root and the user's home (`settings.roots()`). `confine(path, what)` resolves
symbolic links and '..' first, then returns the real path when it lies inside one of the roots, and otherwise
raises a one-line SafesubError naming the path; so a link inside a root that points outside it is refused too.
A path that cannot be resolved at all (a NUL character, a symbolic-link loop, an unknown ``~user``, a name too
long for the system) is a one-line SafesubError too, never another exception. Every path a confined family names
(its family file, checkpoints, card and behaviour file) goes through `confine` (`family.Family.from_file`).
`read_utf8(path, what)` reads a user's text file (a family card, a prompt file) with the same one-line errors.
"""
from __future__ import annotations

import os
from pathlib import Path

from safesub_core import settings
from safesub_core.errors import SafesubError


def allowed_roots() -> list[Path]:
    return [r.expanduser().resolve() for r in settings.roots()]


def expanded(path: str | os.PathLike, what: str = "path") -> Path:
    """`path` with '~' expanded (links and '..' kept), or a one-line SafesubError when it cannot be."""
    if "\x00" in os.fspath(path):
        raise SafesubError(f"{what} {str(path)!r}: contains a NUL character")
    try:
        return Path(path).expanduser()
    except RuntimeError as err:  # an unknown ~user
        raise SafesubError(f"{what} {path}: cannot be resolved ({err})") from None


def real_path(path: str | os.PathLike, what: str = "path") -> Path:
    """`path` with '~' expanded and links and '..' resolved, or a one-line SafesubError when it cannot be."""
    p = expanded(path, what)
    try:
        return p.resolve()
    except (OSError, RuntimeError) as err:  # a link loop, a name too long
        raise SafesubError(f"{what} {path}: cannot be resolved ({err})") from None


def confine(path: str | os.PathLike, what: str = "path") -> Path:
    """The resolved `path` if it lies inside an allowed root, else a one-line SafesubError."""
    real = real_path(path, what)
    roots = allowed_roots()
    if not any(real == r or real.is_relative_to(r) for r in roots):
        shown = ", ".join(str(r) for r in roots)
        raise SafesubError(
            f"{what} {path}: resolves to {real}, outside the allowed folders ({shown}); set SAFESUB_ROOTS to allow it"
        )
    return real


def read_utf8(path: Path, what: str, encoding: str = "utf-8") -> str:
    """The text of the file at `path`, or one SafesubError line opening with `what` (unreadable, not UTF-8)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SafesubError(f"{what}: cannot be read ({err.strerror or err})") from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise SafesubError(f"{what}: is not UTF-8 text (bad byte at offset {err.start})") from None
