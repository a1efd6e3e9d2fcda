"""Hub names: a checkpoint named as a Hugging Face hub model, resolved from the local hub cache only.

A checkpoint may be named as a Hugging Face hub model, `org/name` or `org/name@revision` (a branch, tag or commit).
`hub_name(text)` says whether text reads as one; `hub_snapshot(role, text)` finds its snapshot folder in the local
hub cache only (`settings.hub_cache()`: HF_HUB_CACHE, HF_HOME, ...; huggingface_hub's snapshot_download with
local_files_only=True, never the network); a model not there (or only partly, an interrupted download) is one line
naming the model and the cache folder searched. Callers try a path on disk first (`family.Family.from_paths`): a
path that exists always wins over a hub name. A hub snapshot is not confined to the allowed roots (the user named a
model, not a path), but it and every file in it must resolve inside the hub cache: a link out of it is refused
(`_check_inside`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

from safesub_core import settings
from safesub_core.checkpoints import _first_line
from safesub_core.errors import SafesubError


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
