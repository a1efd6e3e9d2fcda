"""Last-real-token hidden states, activation MSO per layer, and 2-D maps of activations.

Contract (docs/method.md, "Activations"):

- States. For a prompt p formatted by `generation.format_prompt` (chat template or raw text), run the model on
  its tokens and keep, at every layer l = 0..L, the hidden state of the LAST REAL token:
  ``H[l, i] = hidden_states[l][i, last real position of prompt i]`` (hidden_states[0] is the embedding output,
  hidden_states[L] the model's last hidden state as Hugging Face returns it, i.e. after the final norm).
  Batches are LEFT-padded (`generation.encode_batch`), so the last real token of every row is at position -1,
  and position ids are counted from each row's first real token, so a prompt's states do not depend on what it
  is batched with (up to float rounding). Prompts longer than the model's context are truncated from the left
  (the end, where the generation prompt sits, is kept); that is warned about and can be returned.
  Result: a float32 CPU tensor of shape (L+1, n, D).

- Activation MSO. For two prompt sets with states A (L+1, n, D) and B (L+1, m, D), at each layer l take the
  rows of A_l (n x D), optionally minus their mean (``center=True``), and the basis of A_l^T (D x n: its
  columns live in R^D), likewise for B; then, at each energy fraction eta, k_X, k_Y = energy ranks and

      MSO_l(eta) = ||Q_X^T Q_Y||_F^2 / min(k_X, k_Y)   in [0, 1],   random baseline max(k_X, k_Y) / D

  (`overlap.overlap_curve`). depth = l / L. The study's summary is the mean over layers whose depth lies in a
  band, DEPTH_BAND = 0.65..0.90, per energy (`band_mean`; `depth_band_mean` for any band). Where a set's
  (centred) states are all zero the
  overlap is undefined and reported as NaN: e.g. at layer 0 (embeddings) every chat-formatted prompt ends on
  the same template token, so its centred states vanish.

- 2-D maps. `embed_2d` maps n points of R^D to the plane with PCA (sklearn), UMAP (init="pca",
  random_state=seed, n_neighbors=min(15, n-1)) or t-SNE (init="pca", random_state=seed,
  perplexity=min(30, (n-1)/3)). For a fixed seed and thread count the result is reproducible. Coordinates mean
  nothing in themselves: only neighbourhoods and separation do. `activation_map` embeds several labelled groups
  (e.g. model x prompt set) jointly at one layer and returns one row per prompt.

Every function here is pure: no file I/O (the disk cache is wired elsewhere).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA

from safesub_core.errors import SafesubError
from safesub_core.generation import context_length, encode_batch, format_prompt, prepare_tokenizer
from safesub_core.linalg import DEFAULT_ENERGIES, Basis, check_energy
from safesub_core.overlap import overlap_curve
from safesub_core.prefix import accepts

METHODS = ("pca", "umap", "tsne")
DEPTH_BAND = (0.65, 0.90)  # the study's depth band (layer / L) of the activation overlap's summary
BAND_MIN_LAYERS = 2  # a band holding fewer transformer layers is widened to this many around its centre
LABEL_SEP = " · "


class TruncationWarning(UserWarning):
    """Some prompts were longer than the model's context and were truncated from the left."""


# --------------------------------------------------------------------------------------------------------------
# states


def _forward_target(model):
    """The module whose forward returns hidden states: the base model (skips the LM head) when there is one."""
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model:
        return base
    return model


@torch.no_grad()
def last_token_states(
    model,
    tokenizer,
    prompts: Sequence[str],
    chat: bool = True,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    return_truncated: bool = False,
):
    """Hidden state of each prompt's last real token at every layer: float32 CPU tensor (L+1, n, D).

    Prompts are batched by similar length (less padding; the result is in the input order), left-padded, with
    position ids counted from each row's first real token. Over-long prompts are truncated from the left and a
    `TruncationWarning` says how many; with ``return_truncated=True`` the result is ``(states, truncated)``, a
    list of bools in prompt order. `progress(done, total)` is called after each batch.
    """
    prompts = list(prompts)
    if len(prompts) == 0:
        raise SafesubError("prompt set: is empty")
    if int(batch_size) < 1:
        raise SafesubError(f"batch size {batch_size}: must be at least 1")
    batch_size = int(batch_size)
    prepare_tokenizer(tokenizer)
    device = next(model.parameters()).device
    max_length = context_length(model)
    texts = [format_prompt(tokenizer, p, chat) for p in prompts]
    # longest first (a stable sort on character length, a cheap proxy for token length): batches of similar
    # length waste less compute on padding, and an out-of-memory error shows up on the first batch.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))

    target = _forward_target(model)
    use_position_ids = accepts(target, "position_ids")
    was_training = model.training
    model.eval()
    out: torch.Tensor | None = None
    truncated = [False] * len(texts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch, cut = encode_batch(tokenizer, [texts[i] for i in idx], max_length, device)
            kwargs = dict(batch, output_hidden_states=True, use_cache=False, return_dict=True)
            if use_position_ids:
                kwargs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_(min=0)
            hidden = target(**kwargs).hidden_states
            if hidden is None:
                raise SafesubError(f"model {type(model).__name__}: returns no hidden states")
            last = torch.stack([h[:, -1, :] for h in hidden]).to(device="cpu", dtype=torch.float32)
            if out is None:
                out = torch.empty((last.shape[0], len(texts), last.shape[2]), dtype=torch.float32)
            out[:, torch.tensor(idx, dtype=torch.long)] = last
            for i, c in zip(idx, cut):
                truncated[i] = bool(c)
            if progress is not None:
                progress(min(start + batch_size, len(texts)), len(texts))
    finally:
        model.train(was_training)
    n_cut = sum(truncated)
    if n_cut:
        warnings.warn(
            f"prompt set: {n_cut} of {len(texts)} prompts exceed the model's context of {max_length} tokens "
            f"and were truncated from the left",
            TruncationWarning,
            stacklevel=2,
        )
    return (out, truncated) if return_truncated else out


# --------------------------------------------------------------------------------------------------------------
# activation MSO


def _check_states(name: str, X) -> torch.Tensor:
    if not isinstance(X, torch.Tensor):
        raise SafesubError(f"{name}: expected a torch tensor (layers, prompts, hidden), got {type(X).__name__}")
    if X.dim() != 3:
        raise SafesubError(f"{name}: expected shape (layers, prompts, hidden), got {tuple(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0 or X.shape[2] == 0:
        raise SafesubError(f"{name}: is empty, shape {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise SafesubError(f"{name}: contains non-finite values")
    return X


def _layer_index(layer: int, n_layers_plus_1: int) -> int:
    try:
        index = int(layer)
    except (TypeError, ValueError):
        raise SafesubError(f"layer {layer!r}: not an integer") from None
    if not -n_layers_plus_1 <= index < n_layers_plus_1:
        raise SafesubError(f"layer {layer}: out of range 0..{n_layers_plus_1 - 1}")
    return index % n_layers_plus_1


def activation_overlap(
    A: torch.Tensor,
    B: torch.Tensor,
    energies: Sequence[float] = DEFAULT_ENERGIES,
    center: bool = False,
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Per-layer MSO of the activation subspaces of two prompt sets (states from `last_token_states`).

    A is (L+1, n, D), B is (L+1, m, D). Returns columns layer, depth (layer / L), energy, k_x, k_y, mso,
    random_baseline, one row per (layer, energy). `layers` restricts the layers (default: all).
    """
    A = _check_states("activation set A", A)
    B = _check_states("activation set B", B)
    if A.shape[0] != B.shape[0]:
        raise SafesubError(f"activation sets: have {A.shape[0]} and {B.shape[0]} layers, not the same model depth")
    if A.shape[2] != B.shape[2]:
        raise SafesubError(f"activation sets: hidden sizes {A.shape[2]} and {B.shape[2]} differ")
    energies = [check_energy(e) for e in energies]
    if not energies:
        raise SafesubError("energy fractions: none given")
    if center and min(A.shape[1], B.shape[1]) < 2:
        raise SafesubError("activation MSO: centering needs at least 2 prompts per set")
    n_layers = A.shape[0] - 1
    chosen = range(A.shape[0]) if layers is None else sorted({_layer_index(x, A.shape[0]) for x in layers})
    frames = []
    for layer_i in chosen:
        X, Y = A[layer_i].double(), B[layer_i].double()
        scale = max(float(X.abs().max()), float(Y.abs().max()))
        if center:
            X = X - X.mean(0, keepdim=True)
            Y = Y - Y.mean(0, keepdim=True)
        df = overlap_curve(Basis.of(X.T), Basis.of(Y.T), energies)
        if min(float(X.abs().max()), float(Y.abs().max())) <= 1e-12 * scale:
            # a (numerically) zero matrix spans nothing, e.g. centred states that are all the same (at layer 0
            # every chat-formatted prompt ends on the same template token): the overlap is undefined
            df["mso"] = float("nan")
        df.insert(0, "depth", layer_i / n_layers if n_layers > 0 else 0.0)
        df.insert(0, "layer", layer_i)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


_NUMERIC = ("layer", "depth", "k_x", "k_y", "mso", "random_baseline")


def depth_band_mean(df: pd.DataFrame, lo: float = DEPTH_BAND[0], hi: float = DEPTH_BAND[1]) -> pd.DataFrame:
    """Mean over the layers with lo <= depth <= hi (both ends included), per energy (the study's summary).

    Groups by `energy` and by any other non-numeric label column the frame carries (e.g. a pair name). Returns
    those keys plus mso, random_baseline, k_x, k_y (means) and n_layers (how many layers were averaged).
    """
    if not 0.0 <= float(lo) <= float(hi) <= 1.0:
        raise SafesubError(f"depth band {lo}..{hi}: needs 0 <= lo <= hi <= 1")
    missing = [c for c in ("depth", "energy", "mso") if c not in df.columns]
    if missing:
        raise SafesubError(f"overlap table: lacks column(s) {', '.join(missing)}")
    eps = 1e-9
    band = df[(df["depth"] >= lo - eps) & (df["depth"] <= hi + eps)]
    if band.empty:
        depths = ", ".join(f"{d:.3g}" for d in sorted(df["depth"].unique()))
        raise SafesubError(f"depth band {lo}..{hi}: contains no layer (layer depths: {depths})")
    keys = [c for c in df.columns if c not in _NUMERIC]
    values = [c for c in ("mso", "random_baseline", "k_x", "k_y") if c in df.columns]
    g = band.groupby(keys, sort=True)
    res = g[values].mean()
    res["n_layers"] = g["layer"].nunique() if "layer" in band.columns else g.size()
    return res.reset_index()


@dataclass(frozen=True)
class BandMean:
    """The depth-band summary of an activation-overlap table: `table` (`depth_band_mean` over lo..hi), the band
    used, and `note`: empty for the study's band, else one sentence saying how it was widened."""

    table: pd.DataFrame
    lo: float
    hi: float
    note: str

    @property
    def title(self) -> str:
        """What the table is, in one line: the note when the band was widened, else the band itself."""
        return self.note or f"Mean over the study's depth band {self.lo:g}-{self.hi:g}"


def depth_band(depths: Sequence[float], band: tuple[float, float] = DEPTH_BAND,
               min_layers: int = BAND_MIN_LAYERS) -> tuple[float, float, str]:
    """(lo, hi, note): `band`, or, when it holds fewer than `min_layers` transformer layers (depth > 0; fewer only
    when the model has fewer), the narrowest band around its centre that holds `min_layers` of them (the layers
    nearest the centre, the shallower first on a tie); the note says what was widened."""
    lo, hi = band
    eps = 1e-9
    ds = sorted({float(d) for d in depths if d > eps})
    inside = [d for d in ds if lo - eps <= d <= hi + eps]
    need = min(min_layers, len(ds))
    if len(inside) >= need:
        return lo, hi, ""
    centre = (lo + hi) / 2
    chosen = sorted(ds, key=lambda d: (abs(d - centre), d))[:need]
    new_lo, new_hi = min(chosen), max(chosen)
    note = (f"the study's depth band {lo:g}-{hi:g} holds {len(inside)} of this {len(ds)}-layer model's layers "
            f"(depths {', '.join(f'{d:.3g}' for d in ds)}), so it is widened to {new_lo:.3g}-{new_hi:.3g} "
            f"({len(chosen)} layers)")
    return new_lo, new_hi, note


def band_mean(table: pd.DataFrame, band: tuple[float, float] = DEPTH_BAND) -> BandMean:
    """The mean of an activation-overlap table (`activation_overlap`, any extra label columns) over the layers
    whose depth lies in `band`, per energy and label (`depth_band_mean`).

    A model too shallow for the band to hold BAND_MIN_LAYERS transformer layers gets the band widened to the
    layers nearest its centre (`depth_band`), and `note` says so: the findings report and the app's Overlap page
    both show this, so they report the same band mean. (The page used to fall back to the single layer nearest
    the band's middle, counting the embeddings as a layer; it now widens as the findings do.)
    """
    if "depth" not in table.columns:
        raise SafesubError("overlap table: lacks column(s) depth")
    lo, hi, note = depth_band(table["depth"].unique(), band)
    return BandMean(depth_band_mean(table, lo, hi), lo, hi, note)


# --------------------------------------------------------------------------------------------------------------
# 2-D maps


def embed_2d(X, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D coordinates (n, 2) of the n rows of X (n, D) by PCA, UMAP or t-SNE; reproducible for a seed."""
    m = str(method).lower().replace("-", "")
    if m not in METHODS:
        raise SafesubError(f"2-D map method {method!r}: unknown, choose one of pca, umap, tsne")
    if isinstance(X, torch.Tensor):
        X = X.detach().to("cpu", torch.float64).numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise SafesubError(f"2-D map input: expected shape (points, features), got {X.shape}")
    n, d = X.shape
    if n < 3:
        raise SafesubError(f"2-D map input: has {n} point(s), needs at least 3")
    if d < 1:
        raise SafesubError("2-D map input: has no features")
    if not np.isfinite(X).all():
        raise SafesubError("2-D map input: contains non-finite values")
    seed = int(seed)
    if m == "pca":
        k = min(2, n, d)
        Z = PCA(n_components=k, random_state=seed).fit_transform(X)
    elif m == "umap":
        import umap  # heavy (numba compiles on import) and only for this method: imported when asked for

        Z = umap.UMAP(
            n_components=2, init="pca", random_state=seed, n_neighbors=min(15, n - 1), n_jobs=1
        ).fit_transform(X)
    else:
        from sklearn.manifold import TSNE  # heavy and only for this method: imported when asked for

        Z = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (n - 1) / 3)).fit_transform(X)
    Z = np.asarray(Z, dtype=np.float64)
    if Z.shape[1] < 2:  # one feature: the second coordinate is 0
        Z = np.concatenate([Z, np.zeros((n, 2 - Z.shape[1]))], axis=1)
    return Z


def _split_label(key: Hashable) -> tuple[str, str, str]:
    if isinstance(key, tuple):
        if len(key) != 2:
            raise SafesubError(f"map group {key!r}: expected (model, prompt set)")
        model, pset = str(key[0]), str(key[1])
        return f"{model}{LABEL_SEP}{pset}", model, pset
    label = str(key)
    if LABEL_SEP in label:
        model, pset = label.split(LABEL_SEP, 1)
        return label, model, pset
    return label, label, ""


def activation_map(
    states_by_label: Mapping[Hashable, torch.Tensor],
    prompts_by_label: Mapping[Hashable, Sequence[str]] | None = None,
    layer: int = -1,
    method: str = "pca",
    seed: int = 0,
) -> pd.DataFrame:
    """Joint 2-D map of several groups of last-token states at one layer.

    `states_by_label` maps a group to its states (L+1, n_i, D); a key is a (model, prompt set) pair or a label
    "model · set". `prompts_by_label` (same keys, optional) gives the prompt texts for hover. Returns columns
    x, y, label, model, set, prompt, index (the prompt's position in its group), one row per prompt.
    """
    if not states_by_label:
        raise SafesubError("2-D map: no groups of states given")
    groups = []
    depth = width = None
    for key, S in states_by_label.items():
        label, model, pset = _split_label(key)
        S = _check_states(f"states of {label}", S)
        if depth is None:
            depth, width = S.shape[0], S.shape[2]
        elif S.shape[0] != depth:
            raise SafesubError(f"states of {label}: have {S.shape[0]} layers, other groups {depth}")
        elif S.shape[2] != width:
            raise SafesubError(f"states of {label}: hidden size {S.shape[2]}, other groups {width}")
        prompts = None if prompts_by_label is None else prompts_by_label.get(key)
        if prompts is None:
            prompts = [""] * S.shape[1]
        elif len(prompts) != S.shape[1]:
            raise SafesubError(f"prompts of {label}: {len(prompts)} prompts for {S.shape[1]} states")
        groups.append((label, model, pset, S, list(prompts)))
    layer_i = _layer_index(layer, depth)
    X = torch.cat([S[layer_i] for _, _, _, S, _ in groups], 0)
    Z = embed_2d(X, method, seed)
    rows = []
    for label, model, pset, S, prompts in groups:
        for i in range(S.shape[1]):
            rows.append((label, model, pset, str(prompts[i]), i))
    df = pd.DataFrame(rows, columns=["label", "model", "set", "prompt", "index"])
    df.insert(0, "y", Z[:, 1])
    df.insert(0, "x", Z[:, 0])
    return df
