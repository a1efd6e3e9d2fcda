"""Shared benchmark setup: explicit thread count, the machine in words, and the tiny family."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def machine() -> str:
    return (f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
            f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} torch={torch.__version__} python={platform.python_version()}")


def tiny_family_path(size: str = "full") -> Path:
    """The built-in tiny family (built once if missing; the build is not part of any timing)."""
    from safesub_core import demo

    path = demo.family_file("tiny", size)
    if not path.exists():
        demo.build_tiny(size=size)
    return path
