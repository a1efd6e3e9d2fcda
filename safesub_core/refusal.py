"""The refusal direction (Arditi et al. 2024, "Refusal in language models is mediated by a single direction"): its
candidates, the refusal score, the screen and the selection (docs/method.md, "Other safety-subspace hypotheses").
The residual stream, its stream points l = 0..L and writers, and the interventions (directional ablation, activation
addition, weight orthogonalisation) are `interventions`; the bridge to the study's alignment subspaces is `bridge`.

Prompts are formatted by `generation.format_prompt` and run left-padded with position ids counted from
each row's first real token (`prefix.PromptBatch`, the template's header shared), so a prompt's states and scores do
not depend on its batch.

- Candidates (`candidate_directions`). The post-instruction positions are the last k tokens of a formatted prompt,
  k = the number of tokens of the chat template after the user's text (`post_instruction_tokens`: for the tiny
  family's template "\\n<|assistant|>\\n"), or 1 for raw prompts; positions are named by their offset from the end,
  -k..-1. Per stream point l and position i: r_{l,i} = mean over harmful prompts of x_l[i] - mean over harmless
  prompts of x_l[i]. Result: a float32 tensor (L+1, k, D), with the two means.
- Refusal score (`refusal_score`). At the first answer position (the prompt's last), with R the refusal tokens:
  score = log P(R) - log P(not R) = log sum_{t in R} p_t - log sum_{t not in R} p_t (natural logs; positive: the
  model leans to refusing). R (`refusal_token_ids`) is the set of first tokens of the refusal markers that open an
  answer (`REFUSAL_OPENINGS`: the capitalised ones of `scoring.text.REFUSAL_MARKERS`, "I'm sorry", "I cannot",
  "As an AI", "My apologies", ...; not the mid-sentence ones such as "is illegal and unethical"), each tokenized
  alone with no special tokens, the way the project tokenizes continuations; the unknown token is never in R. For most
  tokenizers R = {"I", "As", "My"}: crude, as in the paper (whose R was {"I", "As"} for several models), since many
  compliant answers open with "I".
- Selection (`select_direction`, `choose`). Each candidate with layer l < max_layer_frac * L and a nonzero norm is
  scored on validation prompts: bypass = mean refusal score of the harmful prompts under directional ablation of
  r_hat; induce = mean refusal score of the harmless prompts under activation addition of r at layer l; kl = mean
  KL(p || p_ablated) of the next-token distributions at the last position of the harmless prompts (the model as is
  first, as in `scoring.logprobs.kl_to_reference`). Chosen: the lowest bypass among candidates with induce >
  induce_min (0) and kl < kl_max (0.1), the paper's filters; when none passes, the lowest bypass among the eligible,
  and the selection's note says so. Per candidate two batched passes: harmful + harmless rows under ablation, then
  harmless rows under addition.
- The screen (`ablation_gradient`, `select_direction(n_exact=...)`), for when scoring every candidate costs too much
  (a 30-layer model on a CPU). The refusal score S under ablation of a unit r at strength s changes at first order
  by dS/ds = -r^T M r, M = sum over prompts, stream writers and positions of g w^T (w a writer's output, g the
  gradient of the prompt's S with respect to it): one forward and backward pass over the harmful prompts gives M
  (D x D), and then every candidate's first-order bypass estimate, baseline - r^T M r / n, costs a product. Only the
  n_exact candidates with the lowest estimate are then scored exactly; the others keep NaN scores (`bypass_linear`
  holds the estimate for all). The estimate only ranks: the choice is made on exact scores.

Bad input (empty prompt sets, prompts shorter than the positions asked, candidates of another model, a layer out of
range, an unsupported architecture) raises a one-line SafesubError. Nothing here touches the disk.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from safesub_core.errors import SafesubError, finite_number
from safesub_core.generation import context_length, encode_rows, format_prompt, prepare_tokenizer, template_header
from safesub_core.interventions import (activation_addition, decoder_layers, directional_ablation, hidden_size,
                                        residual_writers, swap_output, unit_direction)
from safesub_core.prefix import PromptBatch, accepts, prefix_length, supports_prefix
from safesub_core.scoring.text import REFUSAL_MARKERS

MAX_LAYER_FRAC = 0.8  # the paper keeps candidates from layers l < 0.8 L
KL_MAX = 0.1  # ... whose ablation moves the harmless prompts' next-token distribution by less than this
INDUCE_MIN = 0.0  # ... and whose addition makes harmless prompts lean to refusing (refusal score above this)
# The refusal markers that open an answer (capitalised: "I'm sorry", "As an AI", "My apologies", ...); the rest
# ("is illegal and unethical", "cannot help with", ...) are matched inside a completion and open none.
REFUSAL_OPENINGS: tuple[str, ...] = tuple(m for m in REFUSAL_MARKERS if m[:1].isupper())
_PROBE = "\x00safesub-probe\x00"


# ------------------------------------------------------------------------------------------------ scores


def refusal_token_ids(tokenizer, openings: Sequence[str] = REFUSAL_OPENINGS) -> list[int]:
    """Sorted distinct first tokens of `openings`, each tokenized alone without special tokens; the unknown token
    and special tokens are left out. A one-line SafesubError when none is left."""
    skip = set(getattr(tokenizer, "all_special_ids", []) or [])
    if getattr(tokenizer, "unk_token_id", None) is not None:
        skip.add(tokenizer.unk_token_id)
    ids = set()
    for text in openings:
        tok = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tok and tok[0] not in skip:
            ids.add(int(tok[0]))
    if not ids:
        raise SafesubError("refusal tokens: no refusal opening starts with a token the tokenizer knows")
    return sorted(ids)


def log_odds(logits: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """(n,) log P(tokens) - log P(every other token) of next-token logits (n, V)."""
    if len(tokens) == 0:
        raise SafesubError("refusal tokens: none given")
    logp = torch.log_softmax(logits.float(), -1)
    hit = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    hit[torch.as_tensor(list(tokens), dtype=torch.long, device=logits.device)] = True
    inside = logp.masked_fill(~hit, float("-inf")).logsumexp(-1)
    outside = logp.masked_fill(hit, float("-inf")).logsumexp(-1)
    return inside - outside


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(n,) KL(p_ref || p) of next-token logits (n, V)."""
    lr, lm = torch.log_softmax(ref_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    return (lr.exp() * (lr - lm)).sum(-1).clamp_min(0)


def _prompt_list(prompts, what: str) -> list[str]:
    items = list(prompts.prompts) if hasattr(prompts, "prompts") else list(prompts)
    if not items:
        raise SafesubError(f"{what}: is empty")
    return items


def _rows(model, tokenizer, prompts, chat: bool, what: str) -> list[list[int]]:
    """Token ids of the formatted prompts, each cut to the model's context from the left."""
    prepare_tokenizer(tokenizer)
    texts = [format_prompt(tokenizer, p, chat) for p in _prompt_list(prompts, what)]
    return encode_rows(tokenizer, texts, context_length(model))[0]


def _device(model):
    return next(model.parameters()).device


@contextmanager
def _eval(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def _run(model, rows: list[list[int]], header: Sequence[int], pad_id: int, batch_size: int, keep: int = 1,
         each: Callable[[list[int], object], None] | None = None) -> torch.Tensor:
    """Float32 CPU logits (n, V) at the last position of each row, batched shortest first; every batch leaves each
    row at least `keep` positions of its own beyond the shared header; `each(indices, output)` sees every batch."""
    device = _device(model)
    use_prefix = supports_prefix(model)
    kwargs = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: torch.Tensor | None = None
    with _eval(model):
        for start in range(0, len(order), max(1, batch_size)):
            idx = order[start:start + max(1, batch_size)]
            chunk = [rows[i] for i in idx]
            P = prefix_length(chunk, header, keep) if use_prefix else 0
            result = PromptBatch.build(chunk, pad_id, P, device).forward(model, **kwargs)
            last = result.logits[:, -1].float().cpu()
            if out is None:
                out = torch.empty(len(rows), last.shape[-1])
            out[torch.tensor(idx)] = last
            if each is not None:
                each(idx, result)
    return out


def refusal_score(model, tokenizer, prompts, chat: bool = True, batch_size: int = 32,
                  tokens: Sequence[int] | None = None) -> torch.Tensor:
    """(n,) refusal score of each prompt: log P(R) - log P(not R) at the first answer position (module docstring);
    `tokens` = R, by default `refusal_token_ids(tokenizer)`. The model as it stands (hooks and all)."""
    rows = _rows(model, tokenizer, prompts, chat, "prompt set")
    R = refusal_token_ids(tokenizer) if tokens is None else list(tokens)
    logits = _run(model, rows, template_header(tokenizer, chat), tokenizer.pad_token_id, batch_size)
    return log_odds(logits, R)


# ------------------------------------------------------------------------------------------------ candidates


def post_instruction_tokens(tokenizer, chat: bool = True) -> list[int]:
    """Token ids of the formatted prompt after the user's text (the template's closing of the user turn and the
    generation prompt), tokenized alone; empty for raw prompts."""
    text = format_prompt(tokenizer, _PROBE, chat)
    if _PROBE not in text:
        return []
    tail = text[text.find(_PROBE) + len(_PROBE):]
    return list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []


@dataclass(frozen=True)
class Candidates:
    """Candidate refusal directions: per stream point l = 0..L and post-instruction position, the harmful mean
    minus the harmless mean of the residual stream (module docstring)."""

    directions: torch.Tensor  # (L+1, k, D) float32: harmful_mean - harmless_mean
    harmful_mean: torch.Tensor  # (L+1, k, D)
    harmless_mean: torch.Tensor  # (L+1, k, D)
    positions: tuple[int, ...]  # offsets from the prompt's end, e.g. (-2, -1)
    n_harmful: int
    n_harmless: int

    @property
    def n_layers(self) -> int:
        """L, the number of decoder blocks (stream points 0..L)."""
        return self.directions.shape[0] - 1

    def _index(self, layer: int, position: int) -> tuple[int, int]:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= self.n_layers:
            raise SafesubError(f"layer {layer!r}: must be a stream point 0..{self.n_layers}")
        if position not in self.positions:
            raise SafesubError(f"position {position!r}: must be one of {', '.join(map(str, self.positions))}")
        return layer, self.positions.index(position)

    def direction(self, layer: int, position: int) -> torch.Tensor:
        """(D,) the raw candidate r (the difference of means) at a stream point and position."""
        return self.directions[self._index(layer, position)]

    def unit(self, layer: int, position: int) -> torch.Tensor:
        """(D,) the candidate normalised to length 1 (a SafesubError for a zero candidate)."""
        return unit_direction(self.direction(layer, position), self.directions.shape[-1],
                              f"candidate ({layer}, {position})")

    def table(self) -> pd.DataFrame:
        """One row per candidate: layer, position, depth (l / L), norm."""
        norms = self.directions.double().norm(dim=-1)
        return pd.DataFrame([dict(layer=l, position=p, depth=l / self.n_layers, norm=float(norms[l, j]))
                             for l in range(self.n_layers + 1) for j, p in enumerate(self.positions)])

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The candidates as a dict of tensors (for the disk cache); `from_tensors` reads it back."""
        return dict(directions=self.directions, harmful_mean=self.harmful_mean, harmless_mean=self.harmless_mean,
                    positions=torch.tensor(self.positions, dtype=torch.long),
                    counts=torch.tensor([self.n_harmful, self.n_harmless], dtype=torch.long))

    @classmethod
    def from_tensors(cls, d: Mapping[str, torch.Tensor]) -> "Candidates":
        return cls(d["directions"], d["harmful_mean"], d["harmless_mean"], tuple(int(x) for x in d["positions"]),
                   int(d["counts"][0]), int(d["counts"][1]))


@torch.no_grad()
def _mean_states(model, rows: list[list[int]], header: Sequence[int], pad_id: int, k: int, batch_size: int,
                 progress: Callable[[], None] | None) -> torch.Tensor:
    """(L+1, k, D) float32 mean over rows of the stream at every point, at each row's last k positions."""
    layers = decoder_layers(model)
    L = len(layers)
    seen: dict[int, torch.Tensor] = {}

    def keep(point: int):
        def grab(h: torch.Tensor) -> None:
            seen[point] = h[:, -k:].detach()  # the prefix pass comes first, the batch's own pass last
        return grab

    hooks = []
    try:
        for l in range(L):
            grab = keep(l)
            hooks.append(layers[l].register_forward_pre_hook(
                lambda m, args, kwargs, grab=grab: grab(args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        last = keep(L)
        hooks.append(layers[L - 1].register_forward_hook(
            lambda m, args, output: last(output[0] if isinstance(output, tuple) else output)))
        total: torch.Tensor | None = None

        def each(idx, _):
            nonlocal total
            states = torch.stack([seen[l] for l in range(L + 1)]).double().sum(1).cpu()  # (L+1, k, D)
            total = states if total is None else total + states
            if progress is not None:
                progress()

        _run(model, rows, header, pad_id, batch_size, keep=k, each=each)
    finally:
        for h in hooks:
            h.remove()
    return (total / len(rows)).float()


def candidate_directions(model, tokenizer, harmful, harmless, positions: int | None = None, chat: bool = True,
                         batch_size: int = 16, progress: Callable[[int, int], None] | None = None) -> Candidates:
    """Difference-of-means candidates at every stream point and each of the last `positions` tokens of the
    formatted prompts (default: the post-instruction tokens, `post_instruction_tokens`; 1 for raw prompts).
    `harmful`, `harmless`: prompt sets or lists of prompts (their train splits). `progress(done, total)` after each
    batch."""
    prepare_tokenizer(tokenizer)
    k = len(post_instruction_tokens(tokenizer, chat)) if positions is None else positions
    if positions is None:
        k = max(1, k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SafesubError(f"positions {positions!r}: must be a whole number of at least 1")
    sets = [_rows(model, tokenizer, harmful, chat, "harmful prompt set"),
            _rows(model, tokenizer, harmless, chat, "harmless prompt set")]
    for what, rows in zip(("harmful", "harmless"), sets):
        short = [i for i, r in enumerate(rows) if len(r) < k]
        if short:
            raise SafesubError(f"{what} prompt set: prompt {short[0]} has fewer than {k} tokens once formatted")
    header = template_header(tokenizer, chat)
    step = max(1, int(batch_size))
    total = sum(-(-len(rows) // step) for rows in sets)
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    harmful_mean, harmless_mean = (_mean_states(model, rows, header, tokenizer.pad_token_id, k, step, tick)
                                   for rows in sets)
    return Candidates(harmful_mean - harmless_mean, harmful_mean, harmless_mean, tuple(range(-k, 0)),
                      len(sets[0]), len(sets[1]))


# ------------------------------------------------------------------------------------------------ the screen


def ablation_gradient(model, tokenizer, prompts, chat: bool = True, batch_size: int = 16,
                      tokens: Sequence[int] | None = None) -> torch.Tensor:
    """M (D, D) float64 = sum over `prompts`, stream writers and positions of g w^T (module docstring: "The
    screen"), so d/ds of the summed refusal score under directional ablation of a unit r at strength s is -r^T M r
    at s = 0. One forward and backward pass per batch, the header not shared (its positions need gradients too);
    parameters' .grad are left alone."""
    rows = _rows(model, tokenizer, prompts, chat, "prompt set")
    R = refusal_token_ids(tokenizer) if tokens is None else list(tokens)
    writers = residual_writers(model)
    embedding = model.get_input_embeddings()
    D = hidden_size(model)
    device, pad = _device(model), tokenizer.pad_token_id
    kwargs = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    seen: list[torch.Tensor] = []

    def hook(module, args, output):
        def keep(h: torch.Tensor) -> torch.Tensor:
            if module is embedding and not h.requires_grad:  # a frozen model: the stream starts here
                h = h.detach().requires_grad_()
            seen.append(h)
            return h
        return swap_output(output, keep)

    M = torch.zeros(D, D, dtype=torch.float64)
    handles = []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    try:
        for _, module in writers:
            handles.append(module.register_forward_hook(hook))
        with _eval(model), torch.enable_grad():
            for start in range(0, len(order), max(1, batch_size)):
                chunk = [rows[i] for i in order[start:start + max(1, batch_size)]]
                seen.clear()
                logits = PromptBatch.build(chunk, pad, 0, device).forward(model, **kwargs).logits[:, -1]
                score = log_odds(logits, R).sum()
                grads = torch.autograd.grad(score, seen, allow_unused=True)
                for w, g in zip(seen, grads):
                    if g is not None:
                        M += torch.einsum("btd,bte->de", g.float(), w.detach().float()).double().cpu()
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return M


# ------------------------------------------------------------------------------------------------ selection


@dataclass(frozen=True)
class Selection:
    """The chosen refusal direction and the table it was chosen from."""

    table: pd.DataFrame  # one row per candidate: layer, position, depth, norm, eligible, bypass_linear (the screen's
    #                      estimate; NaN without one), bypass, induce, kl (NaN where not scored), passed, chosen
    layer: int
    position: int
    direction: torch.Tensor  # (D,) unit
    raw: torch.Tensor  # (D,) the raw candidate (difference of means)
    bypass: float
    induce: float
    kl: float
    baseline_harmful: float  # mean refusal score of the validation harmful prompts, no intervention
    baseline_harmless: float  # ... of the harmless ones
    passed: bool  # whether the chosen candidate passed every filter
    note: str = ""


def choose(table: pd.DataFrame, kl_max: float = KL_MAX, induce_min: float = INDUCE_MIN) -> tuple[pd.DataFrame, str]:
    """(table with `passed` and `chosen` columns, note): the chosen row is the lowest bypass among eligible rows with
    induce > induce_min and kl < kl_max, else among the eligible rows scored (the note says so). Cheap: filters can
    move without a forward pass."""
    t = table.copy()
    t["passed"] = t["eligible"] & (t["induce"] > induce_min) & (t["kl"] < kl_max)
    pool = t[t["passed"]] if t["passed"].any() else t[t["eligible"] & t["bypass"].notna()]
    if pool.empty:
        raise SafesubError("refusal direction: no candidate is eligible (every one is zero, too deep or unscored)")
    note = "" if t["passed"].any() else (f"no candidate passes the filters (induce > {induce_min:g}, "
                                         f"KL < {kl_max:g}): the lowest bypass score among the eligible is chosen")
    t["chosen"] = False
    t.loc[pool["bypass"].idxmin(), "chosen"] = True
    return t, note


def select_direction(candidates: Candidates, model, tokenizer, val_harmful, val_harmless,
                     max_layer_frac: float = MAX_LAYER_FRAC, kl_max: float = KL_MAX, induce_min: float = INDUCE_MIN,
                     chat: bool = True, batch_size: int = 32, layers: Sequence[int] | None = None,
                     n_exact: int | None = None, tokens: Sequence[int] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Selection:
    """Score the eligible candidates on the validation prompts and choose one (module docstring). `layers`
    restricts the stream points scored (default: all with l < max_layer_frac * L); `n_exact`: score only that many
    exactly, those with the lowest first-order bypass estimate (the screen; None: every eligible candidate, the
    paper's procedure); `tokens`: the refusal tokens (default `refusal_token_ids`). `progress(done, total)` after
    the screen and after each candidate."""
    L = candidates.n_layers
    frac = finite_number(max_layer_frac, "max layer fraction")
    if hidden_size(model) != candidates.directions.shape[-1]:
        raise SafesubError(f"candidates: have hidden size {candidates.directions.shape[-1]}, the model "
                           f"{hidden_size(model)}")
    if len(decoder_layers(model)) != L:
        raise SafesubError(f"candidates: come from a model of {L} layers, this one has {len(decoder_layers(model))}")
    rows_h = _rows(model, tokenizer, val_harmful, chat, "validation harmful prompt set")
    rows_b = _rows(model, tokenizer, val_harmless, chat, "validation harmless prompt set")
    R = refusal_token_ids(tokenizer) if tokens is None else list(tokens)
    header, pad = template_header(tokenizer, chat), tokenizer.pad_token_id
    base_h = _run(model, rows_h, header, pad, batch_size)
    base_b = _run(model, rows_b, header, pad, batch_size)
    wanted = set(range(L + 1)) if layers is None else {int(x) for x in layers}
    table = candidates.table()
    table["eligible"] = (table["layer"] < frac * L) & table["layer"].isin(wanted) & (table["norm"] > 0)
    for col in ("bypass_linear", "bypass", "induce", "kl"):
        table[col] = float("nan")
    todo = table.index[table["eligible"]].tolist()
    steps = len(todo)
    baseline_h = float(log_odds(base_h, R).mean())
    if n_exact is not None:
        if isinstance(n_exact, bool) or not isinstance(n_exact, int) or n_exact < 1:
            raise SafesubError(f"exact candidates {n_exact!r}: must be a whole number of at least 1")
        M = ablation_gradient(model, tokenizer, val_harmful, chat, batch_size, R)
        for i in todo:
            u = candidates.unit(int(table.at[i, "layer"]), int(table.at[i, "position"])).double()
            table.at[i, "bypass_linear"] = baseline_h - float(u @ M @ u) / len(rows_h)
        todo = table.loc[todo, "bypass_linear"].nsmallest(n_exact).index.tolist()
        steps = len(todo) + 1
        if progress is not None:
            progress(1, steps)
    n_h = len(rows_h)
    for done, i in enumerate(todo, steps - len(todo) + 1):
        layer, position = int(table.at[i, "layer"]), int(table.at[i, "position"])
        raw = candidates.direction(layer, position)
        with directional_ablation(model, raw):
            ablated = _run(model, rows_h + rows_b, header, pad, batch_size)
        with activation_addition(model, raw, layer):
            added = _run(model, rows_b, header, pad, batch_size)
        table.at[i, "bypass"] = float(log_odds(ablated[:n_h], R).mean())
        table.at[i, "kl"] = float(_kl(base_b, ablated[n_h:]).mean())
        table.at[i, "induce"] = float(log_odds(added, R).mean())
        if progress is not None:
            progress(done, steps)
    table, note = choose(table, kl_max, induce_min)
    row = table[table["chosen"]].iloc[0]
    layer, position = int(row["layer"]), int(row["position"])
    return Selection(table=table, layer=layer, position=position, direction=candidates.unit(layer, position),
                     raw=candidates.direction(layer, position).clone(), bypass=float(row["bypass"]),
                     induce=float(row["induce"]), kl=float(row["kl"]),
                     baseline_harmful=baseline_h,
                     baseline_harmless=float(log_odds(base_b, R).mean()), passed=bool(row["passed"]), note=note)
