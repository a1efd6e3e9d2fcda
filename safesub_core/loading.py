"""Loading: a checkpoint as a model (and tokenizer) in memory, after the checks that refuse it cheaply.

Models and tokenizers are read from local files only (local_files_only=True) and remote code is never run.
`load_model` merges a LoRA adapter onto the family's start model and refuses, before loading, an architecture
transformers does not know (`check_architecture`), a config.json whose shapes the weights do not have
(`check_shapes`), and a model that does not fit in the device's free memory (`check_fits`: `estimate_bytes`
against `available_bytes`; with a device map, `placement.Placement.resolve` checks max_memory instead); a broken adapter or tokenizer is one line naming the checkpoint and the file.
`load_tokenizer` reads the folder `fingerprints.tokenizer_source` picks (what `fingerprints.tokenizer_fingerprint`
hashes). `describe` reads architecture, parameter count and dtype from headers, loading nothing.
"""
from __future__ import annotations

import os

import torch
from peft import PeftModel
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from safesub_core.checkpoints import (Checkpoint, Owner, TensorReader, _first_line, _read_config, _read_json,
                                      load_gguf, lora_config)
from safesub_core.errors import SafesubError
from safesub_core.fingerprints import tokenizer_source
from safesub_core.placement import Placement

TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "chat_template.json")  # checked for being JSON before a tokenizer is loaded


def load_model(ckpt: Checkpoint, family: Owner | None = None, device: str = "cpu", dtype=torch.float32,
               tokenizer: bool = True, placement: Placement | None = None):
    """(model, tokenizer) for a checkpoint, in eval mode; LoRA adapters are merged onto the family's start model.

    The tokenizer is `load_tokenizer`'s: from the checkpoint's own folder, else the start model's, else the base's.
    With a `placement` (`placement.Placement`: a device map and max_memory) the model is spread over its devices
    instead of going to `device` (a GGUF file cannot be placed).
    """
    if ckpt.kind == "hf":
        check_architecture(ckpt)
        check_shapes(ckpt)
    if ckpt.kind == "lora":
        if family is None:
            raise SafesubError(f"adapter '{ckpt.name}': loading an adapter needs its family (for the base)")
        if family.start_checkpoint.kind == "gguf":  # its reader would load the whole model
            lora_config(ckpt)
        else:
            TensorReader(ckpt, TensorReader(family.start_checkpoint))  # the adapter's config, pairs and shapes
    if placement is not None and ckpt.kind == "gguf":
        raise SafesubError(f"checkpoint '{ckpt.name}': a GGUF file cannot be given a device map (load it whole)")
    device_map = None
    if placement is not None and ckpt.kind == "hf":
        device_map = placement.resolve(ckpt.path, dtype)  # bad maps and too little max_memory: before any weight
    elif placement is None:
        check_fits(ckpt, family, device, dtype)
    kw = dict(dtype=dtype, trust_remote_code=False, local_files_only=True)
    straight = device_map is not None and "cpu" not in set(device_map.values())  # GPUs only: loaded in place
    try:
        if ckpt.kind == "gguf":
            model = load_gguf(ckpt, dtype)
        elif ckpt.kind == "lora":
            base, _ = load_model(family.start_checkpoint, family, device, dtype, tokenizer=False, placement=placement)
            model = PeftModel.from_pretrained(base, str(ckpt.path), local_files_only=True).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(ckpt.path), use_safetensors=not ckpt.allow_pickle or None,
                **kw, **({"device_map": device_map} if straight else {})
            )
    except SafesubError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise SafesubError(f"checkpoint '{ckpt.name}': cannot be loaded ({_first_line(err)})") from None
    if device_map is not None and not straight:
        model = placement.dispatch(model, device_map)
    elif placement is None:
        model.to(device)
    model.eval()
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


def check_shapes(ckpt: Checkpoint) -> None:
    """Refuse, before loading, weights whose shapes config.json does not give (e.g. its hidden size is another
    checkpoint's): one line naming the first mismatching tensors and both shapes, where transformers would print a
    table and raise. The model is built on the meta device (no memory); pickle weights are not checked, nor a
    config the meta device cannot build (loading it then says what is wrong)."""
    if not list(ckpt.path.glob("*.safetensors")):
        return
    try:
        config = AutoConfig.from_pretrained(str(ckpt.path), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    except Exception:  # a check ahead of loading, not a gate: from_pretrained reports its own errors
        return
    reader = TensorReader(ckpt)
    bad = [(n, reader.shape(n), expected[n]) for n in sorted(reader._index)
           if n in expected and tuple(reader.shape(n)) != expected[n]]
    if bad:
        shown = "; ".join(f"{n} is {tuple(got)} in the weights, {want} by config.json" for n, got, want in bad[:2])
        more = f" (and {len(bad) - 2} more)" if len(bad) > 2 else ""
        raise SafesubError(f"checkpoint '{ckpt.name}': config.json does not match its weights (hidden size "
                           f"{getattr(config, 'hidden_size', '?')} there, another checkpoint's?): {shown}{more}")


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
    """The tokenizer of `tokenizer_source(ckpt, family)`; a damaged tokenizer is a one-line SafesubError naming
    the checkpoint it comes from and the file."""
    c = tokenizer_source(ckpt, family)
    if c is None:
        raise SafesubError(f"checkpoint '{ckpt.name}': no tokenizer found beside it or in its family")
    for name in TOKENIZER_JSON:
        if (c.path / name).is_file():
            _read_json(c, name, "checkpoint")
    try:
        if c.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(c.path), gguf_file=c.gguf_file, local_files_only=True)
        return AutoTokenizer.from_pretrained(str(c.path), local_files_only=True)
    except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise SafesubError(f"checkpoint '{c.name}': its tokenizer cannot be loaded from {c.path.name} "
                           f"({_first_line(err)})") from None


def describe(ckpt: Checkpoint) -> dict:
    """Architecture, parameter count and dtype from the config and safetensors headers (nothing loaded)."""
    if ckpt.kind == "lora":
        cfg = _read_json(ckpt, "adapter_config.json", "adapter")
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


