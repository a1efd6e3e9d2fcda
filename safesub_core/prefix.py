"""Prompt batches that run a shared prefix once per state of the weights.

Chat-formatted prompts all open with the template's header (`generation.template_header`: for SmolLM2 the
system prompt and the opening of the user turn, 24 of a short prompt's ~40 tokens). A batch of token rows that
share their first P tokens is laid out as

    ids        (B, P + W)   the prefix, then each row's own suffix, left-padded to the longest (W)
    mask       (B, P + W)   1 over the prefix and over each suffix's real tokens, 0 over padding
    positions  (B, P + W)   position ids counting real tokens only: the prefix 0..P-1, each suffix from P on

so every row's last real token sits at position -1 and is scored as it would be alone. The prefix's key/value
cache (batch 1) is computed once per (model, prefix, state of the weights) and repeated over the batch, and the
forward pass runs the suffixes only. The state of the weights is every parameter's storage and version counter;
an in-place write to a parameter (a projection composed into the model, `load_state_dict`, an optimizer step)
moves the counter, so a stale cache is never reused. A write through `param.data` does not move it: writers of
weights here write to the parameters themselves. On a CPU, where a pass costs about the same whatever the batch,
this halves the tokens of a live read-out (benchmarks/README.md).

P = 0 gives the plain left-padded batch: for models whose forward lacks the cache arguments, and for prompts
with no template (raw text shares no header). Outputs agree with the unshared batch to float rounding (4e-5 on
smol's logits; greedy completions are identical in the tests).

Branches: a row may carry continuations that each extend it on their own (a refusal and a compliance opening; a
reference answer and a draft answer), laid out after it in the same row,

    row i      pad ... pad | row's own tokens | branch 1 | branch 2 | ...

with a 4-D additive attention mask in which the row's tokens see the prefix and the row causally, and a branch's
tokens see those and the branch itself, never another branch; a branch's positions continue from the row's end.
So one pass scores every continuation of every row, each as it would be scored appended to the row alone, and the
logits that matter (the row's last position and the branches') are the last `tail` positions of each row. It
needs an attention that takes a custom mask (`supports_branches`: eager and sdpa). With ``share=True`` a row's
branches that open alike share those tokens (a trie: "I", "'m", " sorry" and "I", " cannot" lay out "I" once): a
branch token sees the prefix, the row and its own ancestors in the trie, and the logits are the same as unshared.
"""
from __future__ import annotations

import copy
import inspect
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache

MIN_PREFIX = 2  # a single shared token is not worth a cache
_CACHE_ARGS = ("past_key_values", "position_ids", "use_cache")
_MASKED_ATTENTION = ("eager", "sdpa")
_memo: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, object]]" = weakref.WeakKeyDictionary()
_memo_lock = threading.Lock()


def accepts(model, name: str) -> bool:
    """Whether `model.forward` takes an argument `name`."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def supports_prefix(model) -> bool:
    """A model whose forward takes a key/value cache and explicit position ids (every HF decoder here)."""
    return all(accepts(model, a) for a in _CACHE_ARGS)


def supports_branches(model) -> bool:
    """A model that can run rows with branches: a shared prefix, and an attention (eager or sdpa) that takes the
    custom 4-D mask as given (flash attention takes none)."""
    return supports_prefix(model) and getattr(model.config, "_attn_implementation", None) in _MASKED_ATTENTION


def prefix_length(rows: Sequence[Sequence[int]], header: Sequence[int], keep: int = 1) -> int:
    """P: the longest common prefix of every row and `header`, leaving each row at least `keep` tokens of its
    own; 0 when that is under MIN_PREFIX tokens (or `header` is empty)."""
    p = len(header)
    for r in rows:
        p = min(p, len(r) - keep)
        for i in range(p):
            if r[i] != header[i]:
                p = i
                break
    return p if p >= MIN_PREFIX else 0


def new_cache(model):
    """An empty key/value cache for `model` (transformers' DynamicCache)."""
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _weights_state(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


@torch.no_grad()
def prefix_cache(model, prefix: Sequence[int]):
    """The key/value cache of `prefix` (batch 1), computed once per state of the model's weights; each call returns
    a copy the caller may extend."""
    key = (tuple(prefix), _weights_state(model))
    with _memo_lock:
        hit = _memo.get(model)
    if hit is None or hit[0] != key:
        device = next(model.parameters()).device
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
        cache = new_cache(model)
        kwargs = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
        model(input_ids=ids, position_ids=torch.arange(len(prefix), device=device)[None], past_key_values=cache,
              use_cache=True, **kwargs)
        hit = (key, cache)
        with _memo_lock:
            _memo[model] = hit
    return copy.deepcopy(hit[1])


@dataclass
class PromptBatch:
    """Token rows laid out as a shared prefix plus left-padded suffixes, each row with optional branches (see the
    module docstring)."""

    ids: torch.Tensor  # (B, P + W)
    mask: torch.Tensor  # (B, P + W)
    positions: torch.Tensor  # (B, P + W)
    prefix: tuple[int, ...]  # the shared prefix (P tokens; empty: none)
    branch: torch.Tensor | None = None  # (B, P + W) 0 over the rows' tokens, j over branch j, -1 padding; None: none
    branch_lengths: tuple[tuple[int, ...], ...] = ()  # per row, its branches' lengths
    nodes: tuple[tuple[tuple[int, ...], ...], ...] = ()  # per row, per branch: its tokens' places after the row
    ancestors: torch.Tensor | None = None  # (B, W, W) shared branches: a suffix position may see another's token

    @classmethod
    def build(cls, rows: Sequence[Sequence[int]], pad_id: int, prefix_len: int = 0, device=None,
              branches: Sequence[Sequence[Sequence[int]]] | None = None, share: bool = False) -> "PromptBatch":
        """Rows of token ids (each longer than `prefix_len`, all sharing their first `prefix_len` tokens); with
        `branches`, per row a list of continuations (possibly empty lists) each run on the row alone (`share`:
        branches that open alike share those tokens)."""
        P = prefix_len
        branches = [[list(b) for b in bs] for bs in branches] if branches is not None else None
        if share and branches is not None:
            return cls._shared(rows, pad_id, P, device, branches)
        tails = [[t for b in bs for t in b] for bs in branches] if branches is not None else [[] for _ in rows]
        width = max(len(r) - P + len(t) for r, t in zip(rows, tails))
        ids = torch.full((len(rows), P + width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), P + width), dtype=torch.long)
        for i, (r, t) in enumerate(zip(rows, tails)):
            ids[i, :P] = torch.tensor(r[:P], dtype=torch.long)
            mask[i, :P] = 1
            ids[i, P + width - (len(r) - P + len(t)):] = torch.tensor(list(r[P:]) + t, dtype=torch.long)
            mask[i, P + width - (len(r) - P + len(t)):] = 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        if branches is None:
            return cls(ids.to(device), mask.to(device), positions.to(device), tuple(rows[0][:P]))
        branch = mask - 1  # 0 over real tokens, -1 over padding
        for i, (r, bs) in enumerate(zip(rows, branches)):
            start = P + width - len(tails[i])
            for j, b in enumerate(bs, 1):  # a branch's positions continue from the row's end
                branch[i, start:start + len(b)] = j
                positions[i, start:start + len(b)] = torch.arange(len(r), len(r) + len(b))
                start += len(b)
        nodes, start = [], 0
        for bs in branches:
            places, start = [], 0
            for b in bs:
                places.append(tuple(range(start, start + len(b))))
                start += len(b)
            nodes.append(tuple(places))
        return cls(ids.to(device), mask.to(device), positions.to(device), tuple(rows[0][:P]), branch.to(device),
                   tuple(tuple(len(b) for b in bs) for bs in branches), tuple(nodes))

    @classmethod
    def _shared(cls, rows, pad_id: int, P: int, device, branches) -> "PromptBatch":
        """`build` with each row's branches laid out as a trie (see the module docstring)."""
        tries = []  # per row: (tokens, parent place (-1: the row), depth) per node; per branch its nodes' places
        for bs in branches:
            index: dict[tuple, int] = {}
            tokens, parents, depths, places = [], [], [], []
            for b in bs:
                path = []
                for d in range(len(b)):
                    key = tuple(b[:d + 1])
                    if key not in index:
                        index[key] = len(tokens)
                        tokens.append(b[d])
                        parents.append(path[-1] if path else -1)
                        depths.append(d)
                    path.append(index[key])
                places.append(tuple(path))
            tries.append((tokens, parents, depths, tuple(places)))
        flat = cls.build([list(r) + t[0] for r, t in zip(rows, tries)], pad_id, P, device)
        W = flat.ids.shape[1] - P
        branch = flat.mask.clone().cpu() - 1
        positions = flat.positions.clone().cpu()
        ancestors = torch.zeros((len(rows), W, W), dtype=torch.bool)
        for i, (r, (tokens, parents, depths, _)) in enumerate(zip(rows, tries)):
            start = W - len(tokens)  # the row's branch tokens, in suffix coordinates
            for n, (par, d) in enumerate(zip(parents, depths)):
                branch[i, P + start + n] = 1
                positions[i, P + start + n] = len(r) + d
                ancestors[i, start + n, start + n] = True
                if par >= 0:
                    ancestors[i, start + n] |= ancestors[i, start + par]
        return cls(flat.ids, flat.mask, positions.to(device), flat.prefix, branch.to(device),
                   tuple(tuple(len(b) for b in bs) for bs in branches), tuple(t[3] for t in tries),
                   ancestors.to(device))

    @property
    def tail(self) -> int:
        """The last positions of every row that hold its last own token and all its branches (logits to keep)."""
        return max((1 + len({n for places in row for n in places}) for row in self.nodes), default=1)

    def branch_logits(self, logits: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per row, per branch: the logits (len + 1, V) predicting the branch's tokens and the token after it (the
        row's last position, then the branch's own), from `logits` (B, T, V) of the rows' last T >= `tail`
        positions."""
        out = []
        for b, row_nodes in enumerate(self.nodes):
            row = logits[b, logits.shape[1] - 1 - len({n for places in row_nodes for n in places}):]
            spans = []
            for places in row_nodes:
                spans.append(torch.cat([row[:1], row[[1 + n for n in places]]]))
            out.append(spans)
        return out

    def attention(self, dtype) -> torch.Tensor:
        """The additive 4-D attention mask (B, 1, W, P + W) of a batch with branches: the suffix positions' queries
        over the prefix and the suffixes (0 where a position may look, the dtype's minimum where not)."""
        P = len(self.prefix)
        own = self.branch[:, P:]
        W = own.shape[1]
        key, query = own[:, None, :], own[:, :, None]
        causal = torch.ones(W, W, dtype=torch.bool, device=own.device).tril()
        same = (key == query) if self.ancestors is None else self.ancestors
        seen = causal & (key >= 0) & ((key == 0) | same)
        seen |= torch.eye(W, dtype=torch.bool, device=own.device) & (query < 0)  # padding sees itself: no empty row
        seen = torch.cat([seen.new_ones(len(self), W, P), seen], 2)
        additive = torch.zeros(seen.shape, dtype=dtype, device=own.device)
        return additive.masked_fill(~seen, torch.finfo(dtype).min)[:, None]

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) real tokens per row, the prefix included."""
        return self.mask.sum(1)

    def cache(self, model):
        """The prefix's key/value cache repeated over the batch (for a batch with a prefix)."""
        cache = prefix_cache(model, self.prefix)
        cache.batch_repeat_interleave(len(self))
        return cache

    def forward(self, model, **kwargs):
        """`model(...)` on the batch: the suffixes on top of the prefix's cache, or the whole rows when P = 0.
        With branches, pass logits_to_keep=`tail` and read them with `branch_logits`."""
        P = len(self.prefix)
        mask = self.mask if self.branch is None else self.attention(next(model.parameters()).dtype)
        kw = dict(input_ids=self.ids[:, P:], attention_mask=mask, **kwargs)
        if accepts(model, "position_ids"):
            kw["position_ids"] = self.positions[:, P:]
        if P:
            kw |= dict(past_key_values=self.cache(model), use_cache=True)
        else:
            kw["use_cache"] = False
        return model(**kw)

    def generate(self, model, **kwargs) -> torch.Tensor:
        """`model.generate(...)` from the batch (the prefix's cache passed in); returns the new tokens only (B, T)."""
        kw = dict(input_ids=self.ids, attention_mask=self.mask, **kwargs)
        if self.prefix:
            kw["past_key_values"] = self.cache(model)
        return model.generate(**kw)[:, self.ids.shape[1]:]
