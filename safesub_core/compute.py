"""Where models run and how much a slider move scores: devices, precisions, live prompt counts, resident bytes.

Contract:
- `resolve_compute(device, dtype) -> (device, torch.dtype)`: 'auto' (or None) is the first CUDA device when there
  is one, else the CPU; bfloat16 on a GPU, float32 on the CPU. A device this machine lacks, or an unknown dtype, is
  a one-line SafesubError.
- `live_prompts(family, device, requested) -> int`: prompts per evaluation set for the live read-outs (what a
  slider move recomputes). The request when given, else SAFESUB_LIVE_PROMPTS (`settings.live_prompts`), else a
  size rule: `FULL_LIVE_PROMPTS` on a GPU or for a model of at most 20M parameters, `CPU_LIVE_PROMPTS` on a CPU up
  to 300M parameters, 4 beyond (what that costs per move: benchmarks/README.md).
- `resident_budget(device) -> int`: bytes of subspace bases a session keeps resident so a move never reads the
  disk cache: SAFESUB_RESIDENT_BYTES when set (`settings.resident_bytes`), on a GPU half of its free memory, else
  `subspace.DEFAULT_RESIDENT_BYTES`.
- `executable_batch(fn, start, device) -> (result, batch size)`: fn(batch_size) at `start`; on a GPU accelerate's
  `find_executable_batch_size` shrinks the size after each CUDA out-of-memory error (by its rule: to 90%) until
  it runs (a session keeps
  the size that ran for the next call of the same kind); on the CPU it runs once at `start`.
- `model_budget(device) -> int`: bytes of checkpoints (other than the start model and its working copy) a session
  keeps loaded, least recently used dropped first: SAFESUB_MODEL_BYTES when set (`settings.model_bytes`), on a GPU
  60% of its free memory, else half of the machine's memory.
"""
from __future__ import annotations

import math
import os
from typing import Callable, TypeVar

import torch

from safesub_core import settings
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.subspace import DEFAULT_RESIDENT_BYTES

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL_LIVE_PROMPTS = 32  # live sets this large mean read-outs are cheap here (a GPU or a small model)
CPU_LIVE_PROMPTS = 6  # live sets of a model of up to 300M parameters on a CPU
LIVE_CHOICES = ("auto", "4", "6", "8", "16", "32")  # what the Family page offers


def available_devices() -> list[str]:
    """Where models can run here: every CUDA device ('cuda:0', ...), then 'cpu'."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] + ["cpu"]


def resolve_compute(device: str | None = "auto", dtype: str | None = "auto") -> tuple[str, torch.dtype]:
    """(device, dtype) from names; see the module docstring."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        device = available_devices()[0]
    elif device == "cuda":
        device = "cuda:0"
    if device not in available_devices():
        have = ", ".join(available_devices())
        raise SafesubError(f"device {device!r}: not available on this machine (available: {have})")
    dtype = (dtype or "auto").strip().lower()
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise SafesubError(f"dtype {dtype!r}: must be one of auto, {', '.join(DTYPES)}")
    return device, DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32, and so on."""
    return str(dtype).removeprefix("torch.")


def requested_live_prompts(requested: int | str | None = None) -> int | None:
    """The live prompt count asked for: `requested`, else SAFESUB_LIVE_PROMPTS; None when neither asks (auto). A bad
    count is a one-line SafesubError naming where it came from."""
    n = settings.parse_count(requested, "live prompts")
    return n if n is not None else settings.live_prompts()


def live_prompts(family: Family, device: str = "cpu", requested: int | str | None = None) -> int:
    """Prompts per evaluation set for the live read-outs; see the module docstring."""
    n = requested_live_prompts(requested)
    if n is not None:
        return n
    if torch.device(device).type != "cpu":
        return FULL_LIVE_PROMPTS
    reader = family.reader(family.start)
    params = sum(math.prod(reader.shape(name)) for name in reader.names())
    return FULL_LIVE_PROMPTS if params <= 20_000_000 else CPU_LIVE_PROMPTS if params <= 300_000_000 else 4


def resident_budget(device: str = "cpu") -> int:
    """Bytes of subspace bases a session's engines keep resident; see the module docstring."""
    budget = settings.resident_bytes()
    if budget is not None:
        return budget
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0] // 2)
    return DEFAULT_RESIDENT_BYTES


def model_budget(device: str = "cpu") -> int:
    """Bytes of loaded checkpoints a session keeps beside its start model; see the module docstring."""
    budget = settings.model_bytes()
    if budget is not None:
        return budget
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0] * 0.6)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)


GPU_BATCH = 128  # where a GPU's batch search starts (generation, activations); shrunk on out-of-memory
# rows a batch on the CPU: greedy decoding 48 (96 smol prompts of 24 new tokens, one thread: 19.5 s against 23-26 s
# at 16; benchmarks/README.md), everything else 16
CPU_BATCH = {"generation": 48}
CPU_DEFAULT_BATCH = 16


def executable_batch(fn: Callable[[int], T], start: int, device: str = "cpu",
                     adaptive: bool | None = None) -> tuple[T, int]:
    """(fn(b), b) with b the largest size from `start` down (accelerate shrinks it to 90% a step) that runs without running out of GPU memory
    (`accelerate.utils.find_executable_batch_size`); `adaptive` defaults to whether `device` is a GPU."""
    if not (torch.device(device).type == "cuda" if adaptive is None else adaptive):
        return fn(start), start
    from accelerate.utils import find_executable_batch_size

    ran = {}

    @find_executable_batch_size(starting_batch_size=start)
    def attempt(batch_size):
        ran["size"] = batch_size
        return fn(batch_size)

    return attempt(), ran["size"]
