"""Where paths typed into the app may point: the allowed roots.

Contract: `allowed_roots()` is the list of folders in the environment variable SAFESUB_ROOTS (separated by
os.pathsep), or by default the cache root and the user's home (`settings.roots()`). `confine(path, what)` resolves
symbolic links and '..' first, then returns the real path when it lies inside one of the roots, and otherwise
raises a one-line SafesubError naming the path; so a link inside a root that points outside it is refused too.
"""
from __future__ import annotations

import os
from pathlib import Path

from safesub_core import settings
from safesub_core.errors import SafesubError


def allowed_roots() -> list[Path]:
    return [r.expanduser().resolve() for r in settings.roots()]


def confine(path: str | os.PathLike, what: str = "path") -> Path:
    """The resolved `path` if it lies inside an allowed root, else a one-line SafesubError."""
    real = Path(path).expanduser().resolve()
    roots = allowed_roots()
    if not any(real == r or real.is_relative_to(r) for r in roots):
        shown = ", ".join(str(r) for r in roots)
        raise SafesubError(
            f"{what} {path}: resolves to {real}, outside the allowed folders ({shown}); set SAFESUB_ROOTS to allow it"
        )
    return real
