"""Checkpoints: what kind of model sits at a path, and its tensors read one at a time.

A checkpoint is one of
  hf    a Hugging Face directory: config.json + *.safetensors (pickle *.bin only with allow_pickle=True);
  lora  a peft adapter directory (adapter_config.json), merged onto the family's start model on load:
        W = W_start + scale * B @ A with scale = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA);
  gguf  a .gguf file (or a directory holding exactly one), dequantized by transformers on load.
`Checkpoint.resolve` detects the kind, or raises one line naming the checkpoint; `Owner` is what a checkpoint needs
of its family (`family.Family` is one). A broken adapter_config.json or config.json is one line naming the
checkpoint and the file (`lora_config`).

`TensorReader` yields one float32 tensor (or a block of its rows) at a time (safetensors' safe_open), so the
subspace and overlap computations never hold whole models; a LoRA reader forms W_start + scale * B @ A from its
base's reader. A GGUF's tensors are read from its model, dequantized by transformers (`load_gguf`, which
`loading.load_model` uses too).

`Checkpoint.fingerprint(owner)` is the content hash of the tensors: weights (and their index), config.json,
adapter_config.json; a LoRA adapter with its family (`owner`) also its start model's (the tensors it is merged
onto). What weight-space results (subspaces, overlaps) are keyed by. Files are hashed by `hashing` (kept by their
stamp, in memory and on disk); the fingerprints of a loaded model and of a tokenizer are `fingerprints`'.

`module_type` and `block_index` group a tensor by its name (docs/method.md, "Diagnostics", Grouping).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch
from peft import LoraConfig
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from safesub_core import paths
from safesub_core.errors import SafesubError
from safesub_core.hashing import _SNAPSHOT, Progress, _memo, file_sha256, prehash
from safesub_core.linalg import row_blocks

# what AutoTokenizer reads from a folder: the tokenizer itself (fast or slow: vocabularies, merges, sentencepiece
# models), its special and added tokens, the chat templates, and config.json (where the tokenizer class may be named)
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "additional_chat_templates/*", "vocab*", "merges.txt", "*.model",
                   "*.tiktoken", "config.json")


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
        p = paths.expanded(path, f"checkpoint '{name}': path")
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
        stem = "adapter_model" if self.kind == "lora" else "*"
        return self.files((f"{stem}.safetensors",)) or self.files((f"{stem}.bin",))

    def files(self, patterns: tuple[str, ...]) -> list[Path]:
        """The checkpoint's files matching any of `patterns` (a name pattern, or 'folder/pattern' one folder down),
        sorted by their path in the checkpoint's folder (each folder listed once per `snapshot`)."""
        found = []
        for pat in patterns:
            sub, _, name = pat.rpartition("/")
            folder = self.path / sub if sub else self.path
            found += [folder / n for n in _file_names(folder) if fnmatch.fnmatchcase(n, name)]
        return sorted(set(found), key=lambda f: f.relative_to(self.path).as_posix())

    def fingerprint(self, owner: Owner | None = None, progress: Progress | None = None) -> str:
        """Content hash of the tensors this checkpoint stands for (see the module docstring): its weights and config
        files; a LoRA adapter given its family also folds in the start model's fingerprint. Without an index or a
        start model the digest is the one earlier versions wrote, so their subspace and overlap entries stay valid.
        `progress(done_bytes, total_bytes, what)` follows the hashing of files whose hash is not known yet."""
        if progress is not None:
            files = [(self, f) for f in self._tensor_files()]
            if self.kind == "lora" and owner is not None and owner.start_checkpoint != self:
                files += [(owner.start_checkpoint, f) for f in owner.start_checkpoint._tensor_files()]
            prehash(files, progress)
        return _memo("tensors", self, owner, lambda: self._fingerprint(owner))

    def _tensor_files(self) -> list[Path]:
        """The files the tensor fingerprint reads, in its order: weights, their index, config.json and
        adapter_config.json."""
        named = {f.name: f for f in self.files(("*.safetensors.index.json", "config.json", "adapter_config.json"))}
        configs = [named[n] for n in ("config.json", "adapter_config.json") if n in named]
        index = [f for n, f in sorted(named.items()) if n.endswith(".index.json")]
        return self.weight_files() + index + configs

    def _fingerprint(self, owner: Owner | None) -> str:
        h = hashlib.sha256(self.kind.encode())
        for f in self._tensor_files():
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
        if self.kind == "lora" and owner is not None and owner.start_checkpoint != self:
            h.update(b"start:" + owner.start_checkpoint.fingerprint(owner).encode())
        return h.hexdigest()[:16]

    def tokenizer_files(self) -> list[Path]:
        """The files a tokenizer loaded from this checkpoint's folder is read from (a GGUF's own file included)."""
        files = self.files(TOKENIZER_FILES)
        return files + self.weight_files() if self.kind == "gguf" else files


def _file_names(folder: Path) -> tuple[str, ...]:
    """Names of the regular files (or links to them) in `folder`; none when it is not a folder."""
    def compute() -> tuple[str, ...]:
        try:
            with os.scandir(folder) as entries:
                return tuple(e.name for e in entries if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return ()

    memo = _SNAPSHOT.get()
    if memo is None:
        return compute()
    key = ("listing", str(folder))
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def load_gguf(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model of a GGUF checkpoint, dequantized by transformers (needs the gguf package); local files only, no
    remote code. A GGUF's tensors are read from this model (`TensorReader`), and `loading.load_model` loads it."""
    try:
        return AutoModelForCausalLM.from_pretrained(str(ckpt.path), gguf_file=ckpt.gguf_file, dtype=dtype,
                                                    trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise SafesubError(f"checkpoint '{ckpt.name}': cannot be loaded ({_first_line(err)})") from None


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
            model = load_gguf(ckpt)
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
        cfg = lora_config(self.ckpt)
        if getattr(cfg, "use_dora", False):
            raise SafesubError(f"adapter '{self.ckpt.name}': DoRA adapters are not supported (merge it first)")
        files = self.ckpt.weight_files()
        if not files or files[0].suffix != ".safetensors":
            raise SafesubError(f"adapter '{self.ckpt.name}': no adapter_model.safetensors in {self.ckpt.path}")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        try:
            with safe_open(files[0], framework="pt") as fh:
                keys = list(fh.keys())
                for k in keys:
                    m = _LORA_KEY.match(k)
                    if m:
                        pairs.setdefault(m.group(1), {})[m.group(2)] = fh.get_tensor(k).float()
        except Exception as err:  # safetensors raises several error types for damaged files
            raise SafesubError(
                f"adapter '{self.ckpt.name}': weights file {files[0].name} is truncated or corrupted ({err})"
            ) from None
        odd = next((k for k in keys if not _LORA_KEY.match(k)), None)
        if odd is not None:
            raise SafesubError(f"adapter '{self.ckpt.name}': unsupported adapter tensor {odd}")
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                has, lacks = ("A", "B") if "A" in ab else ("B", "A")
                raise SafesubError(f"adapter '{self.ckpt.name}': {module} has lora_{has} but no lora_{lacks} in "
                                   f"{files[0].name} (an incomplete adapter)")
            A, B = ab["A"], ab["B"]
            if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
                raise SafesubError(f"adapter '{self.ckpt.name}': {module} has lora_A of shape {tuple(A.shape)} and "
                                   f"lora_B of shape {tuple(B.shape)}, which do not multiply (B @ A)")
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


def _read_json(ckpt: Checkpoint, name: str, what: str) -> dict:
    """The JSON object in the checkpoint's file `name`, or a one-line SafesubError naming `what` (checkpoint or
    adapter), the checkpoint and the file."""
    f = ckpt.path / name
    try:
        value = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SafesubError(f"{what} '{ckpt.name}': {name} is not valid JSON ({err.msg} at line {err.lineno} column "
                           f"{err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SafesubError(f"{what} '{ckpt.name}': {name} is unreadable ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise SafesubError(f"{what} '{ckpt.name}': {name} must hold a JSON object, not {type(value).__name__}")
    return value


def lora_config(ckpt: Checkpoint) -> LoraConfig:
    """The adapter's LoraConfig, or a one-line SafesubError when adapter_config.json is not JSON or not a LoRA
    adapter's config."""
    cfg = _read_json(ckpt, "adapter_config.json", "adapter")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SafesubError(f"adapter '{ckpt.name}': adapter_config.json is a {cfg['peft_type']} adapter, not LoRA")
    try:
        return LoraConfig.from_pretrained(str(ckpt.path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise SafesubError(f"adapter '{ckpt.name}': adapter_config.json is not a LoRA config ({_first_line(err)})"
                           ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


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
