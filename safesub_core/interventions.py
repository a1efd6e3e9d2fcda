"""The residual stream of a decoder and the refusal direction's three interventions on it (Arditi et al. 2024,
"Refusal in language models is mediated by a single direction"; docs/method.md, "Other safety-subspace hypotheses").

The residual stream. A decoder of L blocks has L + 1 stream points: point l < L is the input of decoder layer l
(point 0: the embeddings as the first block sees them) and point L the output of the last block, before the final
norm. (Hugging Face's hidden_states[l] is point l for l < L; its hidden_states[L] is after the final norm and is not
used here.) The blocks are `decoder_layers`; the stream's writers (`residual_writers`) are the modules whose outputs
are added to it: the input embeddings, and each block's attention output projection (o_proj) and MLP down projection
(down_proj). A direction r is a vector of the stream's size D (`hidden_size`); `unit_direction` gives r / ||r||.

- Interventions (context managers on a loaded model: forward hooks, removed on exit even on error):
    directional ablation   x <- x - s r r^T x   (r unit, s the strength, 1 = the paper's) at every position,
                           applied to every output that writes into the stream: the embeddings, and each block's
                           attention output projection (o_proj) and MLP down projection (down_proj), so the stream
                           holds no r component at any point (s = 1);
    activation addition    x <- x + alpha r at stream point l (every position; r as given, so with the raw
                           candidate and alpha = 1 a harmless prompt's stream moves by the harmful-minus-harmless mean).
  Entering and leaving either moves the weights' version counter (one small parameter written in place with
  itself), so a prefix key/value cache computed with or without the hooks (`prefix.prefix_cache`, keyed by the state
  of the weights) is never reused across the change.
- Weight orthogonalisation (`orthogonalized_weights`, `orthogonalize_weights`): W <- W - s r r^T W for every matrix
  writing into the stream (o_proj and down_proj; their bias b <- b - s r r^T b if any) and E <- E - s E r r^T for
  the embedding rows. The model computes what directional ablation's hooks compute, to float rounding. With tied
  embeddings the output head keeps the ORIGINAL embedding (the copy is untied; the hooks never touch the head
  either); orthogonalising the head too would also change the logits, by (E r)(r^T h) with h the final normed
  state, which RMSNorm's gain gives an r component. Supported: blocks that add o_proj and down_proj outputs to the
  stream directly (Llama, Mistral, Qwen2/3, Gemma 1, Phi-3); blocks with post-norms (Gemma 2/3) are refused, as
  their norm gains put r back.

Bad input (a direction of the wrong size, zero or not finite, a layer out of range, a non-finite strength or scale,
an unsupported architecture) raises a one-line SafesubError. Nothing here touches the disk.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch

from safesub_core.errors import SafesubError, finite_number


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder blocks, in order (`model.model.layers` for the Llama family)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        return layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name.endswith(("layers", ".h")):
            return module
    raise SafesubError(f"model {type(model).__name__}: has no decoder layers the refusal tools can find")


def residual_writers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module whose output is added to the residual stream: the input embeddings, then per
    block its attention's o_proj and its MLP's down_proj (names as in `model.named_modules()`)."""
    layers = decoder_layers(model)
    kind = type(model).__name__
    if any(hasattr(layer, "post_feedforward_layernorm") for layer in layers):
        raise SafesubError(f"model {kind}: its blocks normalise their outputs before adding them to the stream "
                           "(post-norms), so the refusal interventions cannot act on the stream exactly")
    names = {id(m): n for n, m in model.named_modules()}
    embedding = model.get_input_embeddings()
    out = [(names[id(embedding)], embedding)]
    for i, layer in enumerate(layers):
        attn = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        mlp = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if not isinstance(attn, torch.nn.Linear) or not isinstance(mlp, torch.nn.Linear):
            raise SafesubError(f"model {kind}: block {i} has no self_attn.o_proj and mlp.down_proj (Llama-style "
                               "blocks are needed for the refusal interventions)")
        out += [(names[id(attn)], attn), (names[id(mlp)], mlp)]
    return out


def hidden_size(model) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


def _direction(direction, size: int, what: str = "refusal direction") -> torch.Tensor:
    """`direction` as a float32 CPU vector of `size` entries, finite, else a SafesubError."""
    if not isinstance(direction, torch.Tensor):
        raise SafesubError(f"{what}: expected a torch tensor, got {type(direction).__name__}")
    r = direction.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    if r.numel() != size:
        raise SafesubError(f"{what}: has {r.numel()} entries, but the residual stream has {size}")
    if not torch.isfinite(r).all():
        raise SafesubError(f"{what}: contains non-finite values")
    return r


def unit_direction(direction, size: int, what: str = "refusal direction") -> torch.Tensor:
    r = _direction(direction, size, what)
    norm = float(r.norm())
    if norm == 0:
        raise SafesubError(f"{what}: is zero")
    return r / norm


def _touch(model) -> None:
    """Move the weights' version counter without changing a value (the smallest parameter multiplied in place by
    1), so `prefix.prefix_cache`'s memo, keyed by the state of the weights, is not reused across a change of hooks."""
    with torch.no_grad():
        min(model.parameters(), key=lambda p: p.numel()).mul_(1)


def swap_output(output, fn):
    """`output` with its hidden states (the tensor itself, or a tuple's first element) replaced by fn(them)."""
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    return fn(output)


# ------------------------------------------------------------------------------------------------ interventions


@contextmanager
def directional_ablation(model, direction: torch.Tensor, strength: float = 1.0) -> Iterator[None]:
    """Within the block, `model` computes with x <- x - s r r^T x on everything written into the residual stream
    (embeddings, every o_proj and down_proj output), r = direction / ||direction||, s = `strength`."""
    r = unit_direction(direction, hidden_size(model))
    s = finite_number(strength, "ablation strength")
    writers = residual_writers(model)
    local: dict[tuple, torch.Tensor] = {}

    def ablate(h: torch.Tensor) -> torch.Tensor:
        key = (h.device, h.dtype)
        if key not in local:
            local[key] = r.to(device=h.device, dtype=h.dtype)
        u = local[key]
        return h - s * (h @ u).unsqueeze(-1) * u

    def hook(module, args, output):
        return swap_output(output, ablate)

    handles = []
    try:
        for _, module in writers:
            handles.append(module.register_forward_hook(hook))
        _touch(model)
        yield
    finally:
        for h in handles:
            h.remove()
        _touch(model)


@contextmanager
def activation_addition(model, direction: torch.Tensor, layer: int, alpha: float = 1.0) -> Iterator[None]:
    """Within the block, `model` computes with x <- x + alpha r at stream point `layer` (0..L: the input of decoder
    layer `layer`, or for L the last block's output), at every position; r = `direction` as given (not normalised)."""
    layers = decoder_layers(model)
    r = _direction(direction, hidden_size(model))
    a = finite_number(alpha, "addition scale alpha")
    L = len(layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= L:
        raise SafesubError(f"layer {layer!r}: must be a stream point 0..{L}")
    local: dict[tuple, torch.Tensor] = {}

    def add(h: torch.Tensor) -> torch.Tensor:
        key = (h.device, h.dtype)
        if key not in local:
            local[key] = (a * r).to(device=h.device, dtype=h.dtype)
        return h + local[key]

    def pre_hook(module, args, kwargs):
        if args:
            return (add(args[0]),) + tuple(args[1:]), kwargs
        return args, kwargs | {"hidden_states": add(kwargs["hidden_states"])}

    def post_hook(module, args, output):
        return swap_output(output, add)

    handle = None
    try:
        if layer < L:
            handle = layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            handle = layers[L - 1].register_forward_hook(post_hook)
        _touch(model)
        yield
    finally:
        if handle is not None:
            handle.remove()
        _touch(model)


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


@torch.no_grad()
def orthogonalized_weights(model, direction: torch.Tensor, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The tensors weight orthogonalisation changes, by state-dict name, in the model's dtype and device: every
    stream writer's weight (and bias) with W <- W - s r r^T W (embedding rows: E <- E - s E r r^T), computed in
    float32. With tied embeddings it also holds the output head's weight, the ORIGINAL embedding, for an untied
    model (see the module docstring)."""
    r = unit_direction(direction, hidden_size(model))
    s = finite_number(strength, "orthogonalisation strength")
    embedding = model.get_input_embeddings()
    out: dict[str, torch.Tensor] = {}
    for name, module in residual_writers(model):
        W = module.weight.detach()
        u = r.to(W.device)
        Wf = W.float()
        if module is embedding:
            new = Wf - s * (Wf @ u).unsqueeze(1) * u.unsqueeze(0)
        else:
            new = Wf - s * u.unsqueeze(1) * (u @ Wf).unsqueeze(0)
        out[f"{name}.weight"] = new.to(W.dtype)
        bias = getattr(module, "bias", None)
        if bias is not None:
            b = bias.detach().float()
            out[f"{name}.bias"] = (b - s * (b @ u) * u).to(bias.dtype)
    if _tied(model):
        head = {id(m): n for n, m in model.named_modules()}[id(model.get_output_embeddings())]
        out[f"{head}.weight"] = embedding.weight.detach().clone()
    return out


@torch.no_grad()
def orthogonalize_weights(model, direction: torch.Tensor, strength: float = 1.0):
    """A copy of `model` with `orthogonalized_weights` written in (the original is untouched): a model to export
    (`save_pretrained`). A tied model's copy is untied (config.tie_word_embeddings = False), its head keeping the
    original embedding."""
    weights = orthogonalized_weights(model, direction, strength)
    tied = _tied(model)
    new = copy.deepcopy(model)
    if tied:
        head = new.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        new.config.tie_word_embeddings = False
        text = new.config.get_text_config() if hasattr(new.config, "get_text_config") else None
        if text is not None and text is not new.config:
            text.tie_word_embeddings = False
    params = dict(new.named_parameters())
    for name, w in weights.items():
        params[name].copy_(w)
    return new


@contextmanager
@torch.no_grad()
def orthogonalized(model, direction: torch.Tensor, strength: float = 1.0) -> Iterator[None]:
    """Within the block, `model` itself holds `orthogonalized_weights` (a tied output head is untied for the while
    and keeps the original embedding); on exit, even on error, every tensor is written back from a copy (exactly)
    and a tied head tied again. What a live score of weight orthogonalisation runs on, without a second copy of the
    model (`orthogonalize_weights` makes that copy, for an export). A float32 matrix takes the rank-one update in
    place (W -= s r (r^T W); E -= s (E r) r^T); other dtypes are computed in float32 and rounded once."""
    r = unit_direction(direction, hidden_size(model))
    s = finite_number(strength, "orthogonalisation strength")
    embedding = model.get_input_embeddings()
    tied, head = _tied(model), model.get_output_embeddings()
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        if tied:  # the head keeps the original embedding (see the module docstring)
            head.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        for _, module in residual_writers(model):
            for p in (module.weight, getattr(module, "bias", None)):
                if p is None:
                    continue
                saved.append((p, p.detach().clone()))
                u = r.to(p.device)
                w = p.detach()
                if p.dim() == 1:
                    p.copy_(w.float() - s * (w.float() @ u) * u)
                elif w.dtype == torch.float32:
                    if module is embedding:
                        w.addr_(w @ u, u, alpha=-s)
                    else:
                        w.addr_(u, u @ w, alpha=-s)
                else:
                    wf = w.float()
                    outer = torch.outer(wf @ u, u) if module is embedding else torch.outer(u, u @ wf)
                    p.copy_(wf - s * outer)
        yield
    finally:
        for p, w in saved:
            p.copy_(w)
        if tied:
            head.weight = embedding.weight
        _touch(model)
