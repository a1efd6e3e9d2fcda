"""Where a model's modules live: one device, or a device map across the GPUs and the CPU of a host (accelerate).

A `Placement` is a device map and, optionally, max_memory:
- device_map: "auto", "balanced", "balanced_low_0" or "sequential" (accelerate decides from max_memory, else from
  each device's free memory), a mapping module name -> device ("cuda:0", 0, "cpu"), or a JSON file holding one.
  "disk" is refused: safesub writes projections into the weights in place, and an offloaded weight has no place.
- max_memory: device -> size, e.g. {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}; in text "0=70GiB,1=70GiB,cpu=200GiB".
`Placement.resolve(checkpoint_path, dtype)` gives the explicit map (for a named strategy, accelerate's
`infer_auto_device_map` on an empty model; a map that would need the disk means max_memory is too small: one line
with both sizes). `Placement.dispatch(model, map)` puts a model loaded on the CPU onto its devices with accelerate's
hooks moving activations between them (`accelerate.dispatch_model`, main device the CPU when the map names it, so
CPU modules RUN on the CPU with their weights in place instead of being offloaded; hooks forced on, so a map onto one
device runs through the same hooks as a real split). A map that names no CPU module is loaded by transformers
straight onto the GPUs (`from_pretrained(device_map=...)`); one that names the CPU is loaded on the CPU first (the
host then needs the model's size in RAM) and dispatched.

Every weight of a placed model is a real tensor on its own device, so projections, rank moves, the exact float32 side
path, scores, generation and activations work unchanged: each tensor's update is made on that tensor's device, and
inputs go to the input embedding's device (the first parameter's device; the hooks move them on).

Bad input: a GPU this machine lacks, an unknown device, "disk", a module the model does not have or a map that
leaves modules out, max_memory that does not parse or is too small: a one-line SafesubError before any weight is
read.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from safesub_core import paths
from safesub_core.errors import SafesubError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device(value, where: str) -> str:
    """A map's device as "cuda:i" or "cpu"; one line for anything else or a GPU this machine lacks."""
    text = str(value).strip().lower()
    if text.isdigit():
        text = f"cuda:{text}"
    if text == "cuda":
        text = "cuda:0"
    if text == "disk":
        raise SafesubError(f"{where}: 'disk' offload is not supported (projections are written into the weights in "
                           "place; give max_memory room on the GPUs and the CPU instead)")
    if text == "cpu":
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        n = torch.cuda.device_count()
        if int(text[5:]) >= n:
            raise SafesubError(f"{where}: names {text}, but this machine has {n} GPU{'s' if n != 1 else ''}"
                               + (f" (cuda:0..cuda:{n - 1})" if n else ""))
        return text
    raise SafesubError(f"{where}: unknown device {value!r} (expected a GPU index, cuda:i or cpu)")


def _size(value, where: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(value) if isinstance(value, str) else int(value)
    except (ValueError, TypeError):
        raise SafesubError(f"{where}: {value!r} is not a size (e.g. 70GiB, 512MB, or bytes)") from None
    if size <= 0:
        raise SafesubError(f"{where}: {value!r} must be a positive size")
    return size


def parse_max_memory(text: str | Mapping | None) -> dict | None:
    """{device: bytes} from "0=70GiB,cpu=200GiB" or a mapping (keys: GPU index, cuda:i or cpu); None for none
    (None, an empty mapping, or text with no pairs such as " ")."""
    if text is None:
        return None
    items = text.items() if isinstance(text, Mapping) else [
        part.split("=", 1) if "=" in part else (part, None) for part in str(text).split(",") if part.strip()]
    out = {}
    for key, value in items:
        if value is None:
            raise SafesubError(f"max_memory {text!r}: expected device=size pairs, e.g. 0=70GiB,cpu=200GiB")
        device = _device(str(key).strip(), "max_memory")
        out[int(device[5:]) if device.startswith("cuda:") else device] = _size(str(value).strip(), f"max_memory[{key}]")
    return out or None


def _is_file(text: str) -> bool:
    """Whether `text` names an existing file; False for what cannot be a path (an unknown ~user, a NUL, a name
    too long for the system)."""
    try:
        return paths.expanded(text, "device map file").is_file()
    except (SafesubError, OSError, ValueError):
        return False


def parse_device_map(spec) -> str | dict | None:
    """A strategy name, a {module: device} mapping (from a dict, a JSON text or a JSON file), or None."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, Mapping):
        return {str(k): _device(v, f"device map entry {k!r}") for k, v in spec.items()}
    text = str(spec).strip()
    if text in STRATEGIES:
        return text
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise SafesubError(f"device map: not valid JSON ({err.msg} at character {err.pos})") from None
    elif _is_file(text):
        try:
            doc = json.loads(paths.expanded(text, "device map file").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SafesubError(f"device map file {text}: not valid JSON ({err})") from None
        except OSError as err:
            raise SafesubError(f"device map file {text}: cannot be read ({err.strerror or err})") from None
    else:
        raise SafesubError(f"device map {text!r}: expected one of {', '.join(STRATEGIES)}, a JSON mapping of "
                           "module names to devices, or a JSON file of one")
    if not isinstance(doc, dict) or not doc:
        raise SafesubError("device map: expected a non-empty mapping of module names to devices")
    return parse_device_map(doc)


@dataclass(frozen=True)
class Placement:
    """A device map (strategy or explicit) and optional max_memory (module docstring)."""

    device_map: str | dict
    max_memory: dict | None = None

    @classmethod
    def parse(cls, device_map, max_memory=None) -> "Placement | None":
        """From the CLI's or the Family page's text (or Python values); None when no device map is given."""
        dm = parse_device_map(device_map)
        mm = parse_max_memory(max_memory)
        if dm is None:
            if mm is not None:
                raise SafesubError("max_memory: needs a device map (e.g. --device-map auto)")
            return None
        return cls(dm, mm)

    def key(self) -> list:
        """What a cache key holds of it (the map as given and max_memory)."""
        dm = self.device_map if isinstance(self.device_map, str) else sorted(self.device_map.items())
        mm = None if self.max_memory is None else sorted((str(k), v) for k, v in self.max_memory.items())
        return [dm, mm]

    @property
    def main_device(self) -> str:
        """Where inputs and outputs live: the CPU when the map names it (or for a strategy without GPUs), else the
        first GPU of the map."""
        if isinstance(self.device_map, str):
            return "cuda:0" if torch.cuda.is_available() else "cpu"
        devices = set(self.device_map.values())
        return "cpu" if "cpu" in devices else sorted(devices)[0]

    def resolve(self, path: str | Path, dtype) -> dict[str, str]:
        """The explicit {module: device} map for the checkpoint at `path` (module docstring)."""
        from accelerate import infer_auto_device_map, init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
        names = {n for n, _ in empty.named_modules()}
        if isinstance(self.device_map, dict):
            _check_covers(empty, self.device_map, names)
            return dict(self.device_map)
        from accelerate.utils import get_max_memory

        max_memory = self.max_memory or get_max_memory()  # default: what every GPU and the CPU have free
        got = infer_auto_device_map(empty, max_memory=max_memory, dtype=dtype,
                                    no_split_module_classes=getattr(empty, "_no_split_modules", None) or [])
        need = sum(p.numel() * p.element_size() for p in empty.parameters())
        if "disk" in set(map(str, got.values())):
            given = sum(max_memory.values())
            raise SafesubError(f"max_memory: {given / 2**30:.2f} GiB in all, but the model needs about "
                               f"{need / 2**30:.2f} GiB as {str(dtype).replace('torch.', '')} (raise max_memory or "
                               "add cpu=...; disk offload is not supported)")
        return {k: _device(v, f"device map entry {k!r}") for k, v in got.items()}

    def dispatch(self, model: torch.nn.Module, device_map: Mapping[str, str]) -> torch.nn.Module:
        """Put `model` (loaded on the CPU) onto the map's devices with accelerate's hooks (module docstring)."""
        from accelerate import dispatch_model

        log = logging.getLogger("accelerate.big_modeling")  # it warns of offloading whenever the map names the CPU,
        level = log.level  # but with the CPU as the main device nothing is offloaded (every weight stays in place)
        log.setLevel(logging.ERROR)
        try:
            return dispatch_model(model, device_map=dict(device_map), main_device=self.main_device, force_hooks=True)
        finally:
            log.setLevel(level)


def _check_covers(model: torch.nn.Module, device_map: Mapping[str, str], names: set[str]) -> None:
    """Every key a module of the model and every parameter under some key."""
    for key in device_map:
        if key != "" and key not in names:
            raise SafesubError(f"device map: module {key!r} is not in the model (e.g. model.layers.0, lm_head)")
    keys = sorted(device_map, key=len, reverse=True)
    for name, _ in model.named_parameters():
        if not any(k == "" or name == k or name.startswith(k + ".") for k in keys):
            raise SafesubError(f"device map: leaves out {name} (map every module, or use '': device for the rest)")

