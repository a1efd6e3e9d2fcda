"""Exact projections in any dtype: the float32 side path of a model held in bfloat16 or float16 (docs/method.md,
"Conventions", "Precision"). X is the update `subspace.SubspaceEngine.apply` keeps at a point (`subspace`'s
docstring), W = W_start + alpha X the weight it writes.

The problem. In a model held in bfloat16 or float16, W_start + alpha X rounded to that dtype loses the update
(weights of s.d. 0.03, an update of s.d. 2e-4: 35% of it in bfloat16, all of a norm's).

The float32 side path (`ExactUpdates`). So there the parameters keep W_start, untouched, and the update D = alpha X
is held in float32 beside them (a float32 master delta); each module owning a moved parameter runs in float32 with
the weight W_start.float() + D formed for its forward only, its inputs cast up and its outputs cast back. The
effective weight is W_start + alpha X exactly, to float32 rounding, in every mode; rank moves write
D += +-alpha U_{k0:k} C_{k0:k} (incremental as before); `composed_state_dict` gives the composed weights for an
export. Why not a low-rank side path: parallel's U_k C_k is rank k, but orthogonal's dT - P_k dT is dense (full
rank for a tall matrix), a norm or an embedding is no matmul to add a side product to, and streamed tensors would
need their factors kept anyway. Cost (benchmarks/bench_dtype.py): 4 bytes per moved parameter, and float32
arithmetic in the moved modules. A float32 model takes the old path (the weights themselves move), unchanged.
Outputs are still rounded to the model's dtype between modules, so an update of the size of that rounding is exact
in the weights yet not resolved in the scores (tests/test_dtype_projection.py prints both).

`SubspaceEngine.apply` takes the side path for every parameter whose dtype is `coarser` than its bases' float32.
Nothing here knows subspaces: `subspace` imports this module, never the reverse.
"""
from __future__ import annotations

import torch


def coarser(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether `dtype` is a floating type with a coarser spacing than `than` (bfloat16 or float16 vs float32)."""
    return dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(than).eps



class ExactUpdates:
    """The float32 side path of a model held in a coarser dtype (module docstring).

    Per moved tensor: its parameter keeps W_start in the model's dtype and `deltas[name]` holds D = alpha X in
    float32 on the parameter's device. Each module owning such a parameter runs in float32 with the weight
    W_start.float() + D, formed for its forward only, its floating inputs cast up and its floating outputs cast
    back to the model's dtype: the effective weight is exactly W_start + alpha X in float32. Made by
    `SubspaceEngine.apply` on first use (`of`), kept on the model; `remove` restores the plain model.
    """

    ATTR = "_safesub_exact"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.deltas: dict[str, torch.Tensor] = {}  # tensor name -> float32 alpha X, the parameter's shape
        self._owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # id(parameter) -> (module, its name)
        for module in model.modules():  # a tied parameter has two owners (embed_tokens and lm_head)
            for pname, p in module.named_parameters(recurse=False):
                self._owners.setdefault(id(p), []).append((module, pname))
        self._hooked: dict[int, list[tuple[str, torch.Tensor]]] = {}  # id(module) -> (parameter name, D)
        self._handles: list = []

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ExactUpdates":
        """The model's side path, made (with no tensor in it) on first use."""
        side = getattr(model, cls.ATTR, None)
        if side is None:
            side = cls(model)
            setattr(model, cls.ATTR, side)
        return side

    @property
    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.deltas.values())

    def delta(self, name: str, p: torch.nn.Parameter, w_start: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(D, fresh): the float32 update of the parameter `name`; fresh (zero) the first time, when `p` is set
        to `w_start` and the modules owning `p` get the side path's hooks."""
        if name in self.deltas:
            return self.deltas[name], False
        p.copy_(w_start)
        d = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        self.deltas[name] = d
        for module, pname in self._owners[id(p)]:
            if id(module) not in self._hooked:
                self._hooked[id(module)] = []
                self._handles += [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                                  module.register_forward_hook(self._post, with_kwargs=True, always_call=True)]
            self._hooked[id(module)].append((pname, d))
        return d, True

    def composed(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """W_start + alpha X in float32 for the parameter `name` (`p`, which holds W_start)."""
        return p.detach().float() + self.deltas[name] if name in self.deltas else p.detach().float()

    def remove(self) -> None:
        """Drop the hooks and the deltas: the model is its parameters again (W_start where a delta was)."""
        for h in self._handles:
            h.remove()
        self._handles, self._hooked, self.deltas = [], {}, {}
        if getattr(self.model, self.ATTR, None) is self:
            delattr(self.model, self.ATTR)

    def _pre(self, module, args, kwargs):
        low = None
        stash = []
        for pname, d in self._hooked[id(module)]:
            p = module._parameters[pname]
            low = p.dtype
            stash.append((p, p.data))
            p.data = p.data.float() + d
        module._safesub_stash = (stash, low)
        return _cast(args, low, torch.float32), _cast(kwargs, low, torch.float32)

    def _post(self, module, args, kwargs, output):
        stash, low = module.__dict__.pop("_safesub_stash", ((), None))
        for p, data in stash:
            p.data = data
        return _cast(output, torch.float32, low) if low is not None else output


def _cast(value, src: torch.dtype, dst: torch.dtype):
    """`value` (a tensor, or tuples, lists and dicts of them) with tensors of dtype `src` cast to `dst`."""
    if isinstance(value, torch.Tensor):
        return value.to(dst) if value.dtype == src else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, src, dst) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, src, dst) for k, v in value.items()}
    return value


def composed_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """The model's state dict with the projected weights composed, W = W_start + alpha X (through the side path
    where `SubspaceEngine.apply` made one), in `dtype` (None: each tensor's own; floating tensors only): what an
    export writes. In the model's coarser dtype the update is rounded away again, hence float32 by default."""
    side = getattr(model, ExactUpdates.ATTR, None)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        name = names.get(id(value))
        v = side.composed(name, value) if side is not None and name in side.deltas else value.detach()
        out[key] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out

