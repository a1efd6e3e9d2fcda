"""Every setting safesub reads from the environment, its default and its parser: the one place SAFESUB_* is read.

| variable                | function            | default                                     |
|-------------------------|---------------------|---------------------------------------------|
| SAFESUB_CACHE           | `cache_root()`      | <repo>/cache (installed: ~/.cache/safesub): cache, demo families |
| SAFESUB_CACHE_MAX_BYTES | `cache_max_bytes()` | 20 GiB: the disk cache's size cap, in bytes |
| SAFESUB_ROOTS           | `roots()`           | the cache and home folders: where typed paths may point |
| SAFESUB_FAMILY          | `default_family()`  | "tiny": the family the app opens first      |
| SAFESUB_SMOL_SIZE       | `smol_size()`       | "full": the size of the built-in smol family |
| SAFESUB_DEVICE          | `device()`          | None, auto: the first GPU, else the CPU     |
| SAFESUB_DTYPE           | `dtype()`           | None, auto: bfloat16 on a GPU, else float32 |
| SAFESUB_LIVE_PROMPTS    | `live_prompts()`    | None, auto: prompts per set of the live read-outs |
| SAFESUB_RESIDENT_BYTES  | `resident_bytes()`  | None, the caller's: bytes of subspace bases kept in memory |
| SAFESUB_MODEL_BYTES     | `model_bytes()`     | None, auto: bytes of checkpoints a session keeps loaded |
| SAFESUB_JUDGE_URL       | `judge_url()`       | None: the judge endpoint (OpenAI-compatible) |
| SAFESUB_JUDGE_KEY       | `judge_key()`       | None: the judge endpoint's API key          |
| OMP_NUM_THREADS         | `threads()`         | 1: torch's CPU threads in the app            |
| HF_HUB_CACHE, HF_HOME   | `hub_cache()`       | ~/.cache/huggingface/hub: where hub names (org/name) are looked up |

Each function reads the environment when called (so a test's monkeypatch.setenv is seen). An empty value counts
as unset. A value that cannot be parsed is a one-line SafesubError naming the variable. The Hugging Face
variables are read as huggingface_hub reads them (`hub_cache()`), never set. `go_offline()` makes the process
offline for the Hugging Face hub (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, unless set) and quiets the tokenizers'
fork warning; the CLI's main and app.py call it, importing safesub_core does not.
"""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants as hf_constants

from safesub_core.errors import SafesubError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_MAX_BYTES = 20 * 1024**3
DEFAULT_FAMILY = "tiny"
DEFAULT_SMOL_SIZE = "full"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _raw(name: str) -> str | None:
    """The variable's value with surrounding blanks stripped, or None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def _bytes(name: str) -> int | None:
    raw = _raw(name)
    if raw is None:
        return None
    try:
        return int(float(raw))
    except ValueError:
        raise SafesubError(f"{name}={raw!r}: is not a number of bytes") from None


def go_offline() -> None:
    """No Hugging Face hub access for this process (unless the variables are already set): every model and
    tokenizer is read from local files only."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def cache_root() -> Path:
    """The cache folder: SAFESUB_CACHE, else ``<repo root>/cache`` in a checkout (an editable install), else
    ``~/.cache/safesub`` (a package installed into site-packages keeps no cache there)."""
    raw = _raw("SAFESUB_CACHE")
    if raw:
        return Path(raw).expanduser()
    return REPO / "cache" if (REPO / "pyproject.toml").is_file() else Path.home() / ".cache" / "safesub"


def cache_max_bytes() -> int:
    """The disk cache's size cap: SAFESUB_CACHE_MAX_BYTES (a number of bytes, '1e9' allowed), else 20 GiB."""
    value = _bytes("SAFESUB_CACHE_MAX_BYTES")
    return DEFAULT_CACHE_MAX_BYTES if value is None else value


def roots() -> list[Path]:
    """The folders typed paths may point into, unresolved: SAFESUB_ROOTS (separated by os.pathsep), else the cache
    folder and the home folder."""
    raw = _raw("SAFESUB_ROOTS")
    if raw is None:
        return [cache_root(), Path.home()]
    return [Path(p.strip()) for p in raw.split(os.pathsep) if p.strip()]


def default_family() -> str:
    """The family the app opens when the link names none: SAFESUB_FAMILY (a family spec), else 'tiny'."""
    return _raw("SAFESUB_FAMILY") or DEFAULT_FAMILY


def server_family() -> str | None:
    """SAFESUB_FAMILY as set by whoever started the server (trusted, never confined), or None."""
    return _raw("SAFESUB_FAMILY")


def smol_size() -> str:
    """The built-in smol family's size: SAFESUB_SMOL_SIZE, else 'full' (the tests use 'test')."""
    return _raw("SAFESUB_SMOL_SIZE") or DEFAULT_SMOL_SIZE


def device() -> str | None:
    """SAFESUB_DEVICE ('cpu', 'cuda', 'cuda:1', 'auto'), or None (auto); checked by compute.resolve_compute."""
    return _raw("SAFESUB_DEVICE")


def dtype() -> str | None:
    """SAFESUB_DTYPE ('float32', 'bfloat16', 'float16', 'auto'), or None (auto); checked by
    compute.resolve_compute."""
    return _raw("SAFESUB_DTYPE")


def live_prompts() -> int | None:
    """SAFESUB_LIVE_PROMPTS: a whole number >= 1, or None when unset or 'auto'."""
    raw = _raw("SAFESUB_LIVE_PROMPTS")
    return parse_count(raw, "SAFESUB_LIVE_PROMPTS")


def parse_count(raw: int | str | None, what: str) -> int | None:
    """A count from text: a whole number >= 1, or None for 'auto' / empty; else a one-line SafesubError naming
    `what`."""
    text = str(raw).strip() if raw is not None else ""
    if not text or text.lower() == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise SafesubError(f"{what} {text!r}: must be a whole number (or auto)") from None
    if n < 1:
        raise SafesubError(f"{what} {n}: must be at least 1")
    return n


def resident_bytes() -> int | None:
    """SAFESUB_RESIDENT_BYTES: bytes of subspace bases an engine keeps in memory, or None (the caller's default:
    a session's budget, or an engine's quarter of a checkpoint)."""
    return _bytes("SAFESUB_RESIDENT_BYTES")


def model_bytes() -> int | None:
    """SAFESUB_MODEL_BYTES: bytes of loaded checkpoints a session keeps resident beside its start model (least
    recently used ones are dropped past it), or None (`compute.model_budget`)."""
    return _bytes("SAFESUB_MODEL_BYTES")


def judge_url() -> str | None:
    """SAFESUB_JUDGE_URL: the judge endpoint's base URL, or None."""
    return _raw("SAFESUB_JUDGE_URL")


def threads() -> int:
    """OMP_NUM_THREADS as a whole number >= 1 (the CPU threads the app gives torch), else 1."""
    return parse_count(_raw("OMP_NUM_THREADS"), "OMP_NUM_THREADS") or 1


def judge_key() -> str | None:
    """SAFESUB_JUDGE_KEY: the judge endpoint's API key, or None."""
    return _raw("SAFESUB_JUDGE_KEY")


def hub_cache() -> Path:
    """The local Hugging Face hub cache, found as huggingface_hub finds it but read when called (so a changed
    environment is seen): HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else huggingface_hub's own default (`constants.HF_HUB_CACHE`)."""
    for name, below in (("HF_HUB_CACHE", ()), ("HUGGINGFACE_HUB_CACHE", ()), ("HF_HOME", ("hub",)),
                        ("XDG_CACHE_HOME", ("huggingface", "hub"))):
        raw = _raw(name)
        if raw:
            return Path(os.path.expandvars(os.path.expanduser(raw)), *below)
    return Path(hf_constants.HF_HUB_CACHE)
