"""Checkpoints: what kind of model sits at a path, its fingerprint, its tensors read one at a time, and loading it.

A checkpoint is one of
  hf    a Hugging Face directory: config.json + *.safetensors (pickle *.bin only with allow_pickle=True);
  lora  a peft adapter directory (adapter_config.json), merged onto the family's start model on load:
        W = W_start + scale * B @ A with scale = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA);
  gguf  a .gguf file (or a directory holding exactly one), dequantized by transformers on load.

`TensorReader` yields one float32 tensor (or a block of its rows) at a time (safetensors' safe_open), so the
subspace and overlap computations never hold whole models; `Checkpoint.fingerprint` hashes a checkpoint's files so
a changed file never serves a stale cached result. Models and tokenizers are read from local files only
(local_files_only=True) and remote code is never run. `load_model` refuses, before loading, an architecture
transformers does not know and a model that does not fit in the device's free memory.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Protocol

import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

from safesub_core.errors import SafesubError
from safesub_core.linalg import row_blocks


class Owner(Protocol):
    """What a checkpoint needs of its family (`family.Family` is one): the model a LoRA adapter merges onto, and
    where a tokenizer is looked for when the checkpoint's folder has none."""

    @property
    def start_checkpoint(self) -> "Checkpoint": ...

    base: "Checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    """One model in a family: a role name, a path, and its kind ('hf', 'lora' or 'gguf')."""

    name: str
    path: Path
    kind: str
    gguf_file: str | None = None
    allow_pickle: bool = False

    @classmethod
    def resolve(cls, name: str, path: str | os.PathLike, allow_pickle: bool = False) -> "Checkpoint":
        """Detect the kind of checkpoint at `path`, or raise a one-line SafesubError naming it."""
        p = Path(path).expanduser()
        if not p.exists():
            raise SafesubError(f"checkpoint '{name}': path {p} does not exist")
        p = p.resolve()
        if p.is_file():
            if p.suffix == ".gguf":
                return cls(name, p.parent, "gguf", p.name, allow_pickle)
            raise SafesubError(f"checkpoint '{name}': {p} is a file but not a .gguf; give a model directory")
        if (p / "adapter_config.json").exists():
            return cls(name, p, "lora", None, allow_pickle)
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists():
            if len(ggufs) == 1:
                return cls(name, p, "gguf", ggufs[0].name, allow_pickle)
            raise SafesubError(f"checkpoint '{name}': directory {p} has no config.json (not a Hugging Face model)")
        if not list(p.glob("*.safetensors")):
            if list(p.glob("*.bin")) and not allow_pickle:
                raise SafesubError(
                    f"checkpoint '{name}': {p} holds only pickle .bin weights; convert to safetensors or allow pickle"
                )
            if not list(p.glob("*.bin")):
                raise SafesubError(f"checkpoint '{name}': directory {p} has no weights (*.safetensors)")
        return cls(name, p, "hf", None, allow_pickle)

    def weight_files(self) -> list[Path]:
        if self.kind == "gguf":
            return [self.path / self.gguf_file]
        if self.kind == "lora":
            return sorted(self.path.glob("adapter_model.safetensors")) or sorted(self.path.glob("adapter_model.bin"))
        return sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))

    def fingerprint(self) -> str:
        """Content hash of the weights and config files (memoised by path, size and mtime)."""
        configs = [self.path / f for f in ("config.json", "adapter_config.json") if (self.path / f).exists()]
        files = self.weight_files() + configs
        h = hashlib.sha256(self.kind.encode())
        for f in files:
            st = f.stat()
            h.update(f.name.encode())
            h.update(_file_sha256(str(f), st.st_size, st.st_mtime_ns).encode())
        return h.hexdigest()[:16]


@lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class TensorReader:
    """Read a checkpoint's float tensors one at a time, as float32 CPU tensors.

    Names are those of the HF state dict (e.g. 'model.layers.0.self_attn.q_proj.weight'); a tied lm_head is
    listed once (as the embedding). A LoRA reader needs the reader of its base (the family's start model).
    """

    def __init__(self, ckpt: Checkpoint, lora_base: "TensorReader | None" = None):
        self.ckpt = ckpt
        self._index: dict[str, tuple[Path, tuple[int, ...], str]] = {}  # name -> file, shape, dtype
        self._state: dict[str, torch.Tensor] | None = None
        self._lora: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
        self.base = lora_base
        if ckpt.kind == "hf":
            self._index_hf()
        elif ckpt.kind == "gguf":
            model = load_model(ckpt)[0]
            self._state = {k: v.detach().float() for k, v in model.state_dict().items()}
            self._tied = bool(getattr(model.config, "tie_word_embeddings", False))
        else:
            if lora_base is None:
                raise SafesubError(f"checkpoint '{ckpt.name}': a LoRA adapter needs its base model")
            self._index_lora()

    # -- hf
    def _index_hf(self):
        files = self.ckpt.weight_files()
        for f in files:
            if f.suffix == ".bin":
                if not self.ckpt.allow_pickle:
                    raise SafesubError(f"checkpoint '{self.ckpt.name}': pickle weights {f.name} refused")
                self._state = self._state or {}
                self._state.update(torch.load(f, map_location="cpu", weights_only=True))
                continue
            try:
                with safe_open(f, framework="pt") as fh:
                    for k in fh.keys():
                        sl = fh.get_slice(k)
                        self._index[k] = (f, tuple(sl.get_shape()), sl.get_dtype())
            except Exception as err:  # safetensors raises several error types for damaged files
                raise SafesubError(
                    f"checkpoint '{self.ckpt.name}': weights file {f.name} is truncated or corrupted ({err})"
                ) from None
        cfg = _read_config(self.ckpt)
        self._tied = bool(cfg.get("tie_word_embeddings", False))

    # -- lora
    def _index_lora(self):
        cfg = LoraConfig.from_pretrained(str(self.ckpt.path), local_files_only=True)
        if getattr(cfg, "use_dora", False):
            raise SafesubError(f"adapter '{self.ckpt.name}': DoRA adapters are not supported (merge it first)")
        files = self.ckpt.weight_files()
        if not files or files[0].suffix != ".safetensors":
            raise SafesubError(f"adapter '{self.ckpt.name}': no adapter_model.safetensors in {self.ckpt.path}")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(files[0], framework="pt") as fh:
            for k in fh.keys():
                m = _LORA_KEY.match(k)
                if not m:
                    raise SafesubError(f"adapter '{self.ckpt.name}': unsupported adapter tensor {k}")
                pairs.setdefault(m.group(1), {})[m.group(2)] = fh.get_tensor(k).float()
        base_names = set(self.base.names())
        for module, ab in pairs.items():
            target = module + ".weight"
            if target not in base_names:
                raise SafesubError(
                    f"adapter '{self.ckpt.name}': targets {module}, which does not exist in the base model"
                )
            A, B = ab["A"], ab["B"]
            r = A.shape[0]
            alpha = next((v for p, v in (cfg.alpha_pattern or {}).items() if re.search(p, module)), cfg.lora_alpha)
            scale = alpha / (r**0.5 if cfg.use_rslora else r)
            shape = self.base.shape(target)
            delta_shape = (B.shape[0], A.shape[1]) if not cfg.fan_in_fan_out else (A.shape[1], B.shape[0])
            if tuple(delta_shape) != tuple(shape):
                raise SafesubError(
                    f"adapter '{self.ckpt.name}': {module} is {delta_shape[0]}x{delta_shape[1]} but the base "
                    f"tensor is {shape[0]}x{shape[1]} (an adapter made for another base?)"
                )
            self._lora[target] = (A, B, scale, bool(cfg.fan_in_fan_out))

    # -- the interface
    def names(self) -> list[str]:
        if self.ckpt.kind == "lora":
            return self.base.names()
        keys = list(self._state) if self._state is not None and not self._index else list(self._index)
        if self._state is not None and self._index:
            keys += [k for k in self._state if k not in self._index]
        if self._tied and "lm_head.weight" in keys and any(k.endswith("embed_tokens.weight") for k in keys):
            keys.remove("lm_head.weight")
        return [k for k in keys if self._is_float(k)]

    def _is_float(self, name: str) -> bool:
        if name in self._index:
            return self._index[name][2].startswith(("F", "BF"))  # safetensors dtype codes: F32, BF16, ...
        return self._state[name].is_floating_point()

    def shape(self, name: str) -> tuple[int, ...]:
        if self.ckpt.kind == "lora":
            return self.base.shape(name)
        if name in self._index:
            return self._index[name][1]
        return tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` as float32 on CPU; NaN or infinite values raise a one-line SafesubError.

        A safetensors tensor is read linalg.READ_BLOCK elements (whole rows) at a time, each block through its own
        mapping of the file: reading holds the result and one block, never also the tensor's mapped file pages
        and a NaN mask of its size.
        """
        shape = self.shape(name)
        if self.ckpt.kind == "lora" or name not in self._index or len(shape) == 0:
            return self._read(name)
        out = torch.empty(shape)
        for rows in row_blocks(shape):
            out[rows] = self._read(name, rows)
        return out

    def difference(self, other: "TensorReader", name: str) -> torch.Tensor:
        """get(name) - other.get(name), formed a block of rows at a time: neither tensor is ever read whole."""
        shape = self.shape(name)
        if len(shape) == 0:
            return self.get(name) - other.get(name)
        out = torch.empty(shape)
        for rows in row_blocks(shape):
            out[rows] = self.get_rows(name, rows.start, rows.stop) - other.get_rows(name, rows.start, rows.stop)
        return out

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop (along the first dimension) of the tensor `name`, exactly as in `get(name)`; from a
        safetensors file only those rows are read."""
        return self._read(name, slice(start, stop))

    def get_elements(self, name: str, i: int, j: int) -> torch.Tensor:
        """Elements i:j of the flattened tensor `name`, reading only the rows that hold them."""
        row = math.prod(self.shape(name)[1:])  # elements per row along the first dimension (1 for a vector)
        r0, r1 = i // row, -(-j // row)
        return self.get_rows(name, r0, r1).reshape(-1)[i - r0 * row:j - r0 * row]

    def _read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor `name` (or only its `rows`) as float32 on CPU, checked for NaN and infinite values."""
        if self.ckpt.kind == "lora":
            w = self.base.get(name) if rows is None else self.base.get_rows(name, rows.start, rows.stop)
            if name in self._lora:
                A, B, scale, fifo = self._lora[name]
                delta = scale * (B @ A)
                delta = delta.T if fifo else delta
                w = w + (delta if rows is None else delta[rows])
        elif name in self._index:
            f = self._index[name][0]
            try:
                with safe_open(f, framework="pt") as fh:  # closed (unmapped) before the next block is read
                    w = (fh.get_tensor(name) if rows is None else fh.get_slice(name)[rows]).float()
            except Exception as err:
                raise SafesubError(f"checkpoint '{self.ckpt.name}': cannot read {name} from {f.name} ({err})") from None
        else:
            w = (self._state[name] if rows is None else self._state[name][rows]).float()
        if not torch.isfinite(w).all():
            raise SafesubError(f"checkpoint '{self.ckpt.name}': tensor {name} has NaN or infinite values")
        return w

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self.names():
            yield n, self.get(n)

    def check_compatible(self, other: "TensorReader") -> None:
        """Same tensor names and shapes as `other`, or a one-line error naming the first difference."""
        mine, theirs = set(self.names()), set(other.names())
        if mine - theirs:
            raise SafesubError(
                f"checkpoint '{other.ckpt.name}': is missing tensor {sorted(mine - theirs)[0]} "
                f"that '{self.ckpt.name}' has (different architecture?)"
            )
        if theirs - mine:
            raise SafesubError(
                f"checkpoint '{other.ckpt.name}': has tensor {sorted(theirs - mine)[0]} that '{self.ckpt.name}' lacks"
            )
        for n in sorted(mine):
            if tuple(self.shape(n)) != tuple(other.shape(n)):
                raise SafesubError(
                    f"checkpoint '{other.ckpt.name}': tensor {n} has shape {tuple(other.shape(n))}, "
                    f"but '{self.ckpt.name}' has {tuple(self.shape(n))} (resized vocabulary or another architecture?)"
                )


def _read_config(ckpt: Checkpoint) -> dict:
    try:
        return json.loads((ckpt.path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SafesubError(f"checkpoint '{ckpt.name}': config.json is unreadable ({type(err).__name__})") from None


# ------------------------------------------------------------------------------------------- model loading


def load_model(ckpt: Checkpoint, family: Owner | None = None, device: str = "cpu", dtype=torch.float32,
               tokenizer: bool = True):
    """(model, tokenizer) for a checkpoint, in eval mode; LoRA adapters are merged onto the family's start model.

    The tokenizer comes from the checkpoint's own folder, else from the start model's, else the base's.
    """
    if ckpt.kind == "hf":
        check_architecture(ckpt)
    check_fits(ckpt, family, device, dtype)
    kw = dict(dtype=dtype, trust_remote_code=False, local_files_only=True)
    try:
        if ckpt.kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), gguf_file=ckpt.gguf_file, **kw)
        elif ckpt.kind == "lora":
            if family is None:
                raise SafesubError(f"adapter '{ckpt.name}': loading an adapter needs its family (for the base)")
            base, _ = load_model(family.start_checkpoint, family, device, dtype, tokenizer=False)
            model = PeftModel.from_pretrained(base, str(ckpt.path), local_files_only=True).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(ckpt.path), use_safetensors=not ckpt.allow_pickle or None, **kw
            )
    except SafesubError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SafesubError(f"checkpoint '{ckpt.name}': cannot be loaded ({first[:200]})") from None
    model.to(device).eval()
    return model, (load_tokenizer(ckpt, family) if tokenizer else None)


def check_architecture(ckpt: Checkpoint) -> None:
    """Refuse, before loading, a config.json whose model type transformers does not know: it would need remote
    code (auto_map), which is never run, or a newer transformers."""
    cfg = _read_config(ckpt)
    model_type = cfg.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if cfg.get("auto_map"):
        raise SafesubError(
            f"checkpoint '{ckpt.name}': config.json needs remote code (auto_map, model type {model_type!r}), "
            "which safesub never runs"
        )
    raise SafesubError(
        f"checkpoint '{ckpt.name}': model type {model_type!r} in config.json is not supported by the installed "
        "transformers"
    )


def estimate_bytes(ckpt: Checkpoint, family: Owner | None = None, dtype=torch.float32) -> int:
    """Memory a loaded model needs: parameters x bytes per element (a GGUF: 8 x its file size, dequantized)."""
    if ckpt.kind == "gguf":
        return 8 * (ckpt.path / ckpt.gguf_file).stat().st_size
    if ckpt.kind == "lora":
        return estimate_bytes(family.start_checkpoint, family, dtype) if family else 0
    reader = TensorReader(ckpt)
    numel = sum(int(torch.Size(reader.shape(n)).numel()) for n in reader.names())
    return numel * torch.empty((), dtype=dtype).element_size()


def available_bytes(device: str = "cpu") -> int:
    """Free memory on the device: CUDA's mem_get_info, or MemAvailable from /proc/meminfo."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(ckpt: Checkpoint, family: Owner | None, device: str, dtype) -> None:
    """Refuse, before loading, a model that will not fit in the device's free memory."""
    need, free = estimate_bytes(ckpt, family, dtype), available_bytes(device)
    if need > free:
        raise SafesubError(
            f"checkpoint '{ckpt.name}': needs about {need / 2**30:.1f} GiB as {str(dtype).replace('torch.', '')} "
            f"but {device} has {free / 2**30:.1f} GiB free (try bfloat16, another device, or fewer resident models)"
        )


def load_tokenizer(ckpt: Checkpoint, family: Owner | None = None):
    candidates = [ckpt] + ([family.start_checkpoint, family.base] if family else [])
    for c in candidates:
        has_files = any((c.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        if c.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(c.path), gguf_file=c.gguf_file, local_files_only=True)
        if has_files:
            return AutoTokenizer.from_pretrained(str(c.path), local_files_only=True)
    raise SafesubError(f"checkpoint '{ckpt.name}': no tokenizer found beside it or in its family")


def describe(ckpt: Checkpoint) -> dict:
    """Architecture, parameter count and dtype from the config and safetensors headers (nothing loaded)."""
    if ckpt.kind == "lora":
        cfg = json.loads((ckpt.path / "adapter_config.json").read_text())
        return dict(name=ckpt.name, kind="lora", architecture=f"LoRA r={cfg.get('r')}", parameters=None,
                    dtype=None, fingerprint=ckpt.fingerprint())
    if ckpt.kind == "gguf":
        return dict(name=ckpt.name, kind="gguf", architecture=ckpt.gguf_file, parameters=None, dtype="gguf",
                    fingerprint=ckpt.fingerprint())
    reader = TensorReader(ckpt)
    cfg = _read_config(ckpt)
    params = sum(int(torch.Size(reader.shape(n)).numel()) for n in reader.names())
    return dict(
        name=ckpt.name,
        kind="hf",
        architecture=",".join(cfg.get("architectures", [cfg.get("model_type", "?")])),
        parameters=params,
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "?"),
        fingerprint=ckpt.fingerprint(),
    )


# ------------------------------------------------------------------------------------------- tensor names

_MODULES = (
    ("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"), ("gate_proj", "gate"), ("up_proj", "up"),
    ("down_proj", "down"), ("embed_tokens", "embed"), ("lm_head", "embed"), ("norm", "norm"),
)
_BLOCK = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def module_type(name: str) -> str:
    """q/k/v/o/gate/up/down/embed/norm for the usual decoder tensor names, else 'other'."""
    return next((short for key, short in _MODULES if key in name), "other")


def block_index(name: str) -> int | None:
    """The transformer block a tensor belongs to ('model.layers.7.mlp.up_proj.weight' -> 7), None outside."""
    m = _BLOCK.search("." + name)
    return int(m.group(1)) if m else None
