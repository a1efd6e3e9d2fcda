"""The study's activation experiment (E4), as the study ran it: activation MSO of four prompt sets over its layer band,
with bootstrap intervals, a same-source noise ceiling and a label-permutation null (docs/method.md, "The study's
activation experiment (E4), which restates the study's set-up: Ponkshe et al., ICLR 2026, its section on
activation space).

Math. For a model with L transformer layers, `output_hidden_states` has L+1 entries (embeddings included) and the
study averages over the layers ``study_band(L+1) = range(int(0.65 (L+1)), int(0.90 (L+1)))`` (e.g. L+1 = 31 gives
layers 20..26). A set's states at layer l are S_l (n x D), the last real token of each prompt (`activations.
last_token_states`, float32). For two sets X, Y and an energy eta, `activations.activation_overlap` gives

    MSO_l(eta) = ||Q_X^T Q_Y||_F^2 / min(k_X, k_Y),   random baseline max(k_X, k_Y) / D,

with Q the top-k left singular vectors of S_l^T (D x n), k the energy rank at eta; centred (rows minus their
mean) or not (the study's released run: not). The band mean is the mean of MSO_l over the band's layers (NaN
layers, where a set's centred states vanish, left out). Pairs (`PAIRS`): U-H1, H1-H2, U-H2, H1-H2b, and the
same-source noise ceiling H1a-H1b (H1 split at random into two halves, `CEILING_PAIR`): the overlap two samples of
ONE source reach, against which the cross-source pairs are read.

Statistics (docs/method.md, "Statistics"). Bootstrap: each replicate resamples the prompts of every set (the halves
H1a, H1b each within itself) with replacement, then recomputes every pair's MSO at every band layer and energy AT
THE POINT ESTIMATE'S RANKS k_X, k_Y (`_mso_at_ranks`); the 95% interval is the percentile interval of the
replicates, per layer and for the band mean. Why fixed ranks, measured: a resample repeats about 37% of its
prompts, which lowers the rank an energy fraction picks; with ranks re-chosen per replicate the MSO of random
Gaussian states (D = 576, 100 a set) came out at about half the estimate at eta 0.1-0.9, so the intervals missed
their own estimates. The summary's ``boot_mean`` (the replicates' mean) shows any bias left. Null for U against
H1: pool the two sets' states, shuffle the labels (sizes kept), recompute the band-mean
MSO at every energy; reported are the null's mean, its 95th percentile and two one-sided permutation p-values,
``p_greater = (1 + #{null >= observed}) / (1 + n_perm)`` (the observed overlap is LARGER than two samples of one
pooled source give) and ``p_less`` likewise with <= (SMALLER: the sets differ). Cost: the bootstrap and the null
use the band layers only, in each pair's own coordinates (`_pair_coords`, exact); every energy is kept, as the
energies cost nothing beside the SVDs: about 3.5 minutes of CPU on one core for 7 band layers, D = 576, 100 prompts
a set, n_boot = n_perm = 200, both centrings (docs/method.md). The noise ceiling's halves hold n/2 prompts, so
its ranks, MSO and random baseline at an eta are smaller than the full-size pairs': compare each pair with its
own random_baseline.

API.
- `study_band(n_hidden_states) -> range`: the study's layers (SafesubError when empty).
- `word_problems(n, seed)`: deterministic templated word problems with answers (a `PromptSet`, kind "math").
- `study_sets(n=100, seed=0) -> StudySets`: U, H1, H2, H2b from what is packaged; `StudySets.table()` gives each
  set's role, name, source and size.
- `StudyActivationConfig`: chat (False: raw text, as the study), energies, n_prompts, n_boot, n_perm, seed,
  centers, confidence.
- `study_overlap(states, cfg, model="") -> StudyResult`: PURE, over state tensors {"U", "H1", "H2", "H2b"} each
  (L+1, n, D) (H2b optional: its pair is left out without it).
- `run_study(session, models, cfg, sets=None) -> StudyResult`: states of each model from a `FamilySession` (its
  disk cache), then `study_overlap`. The session must match the config: ``session.chat == cfg.chat`` and float32
  weights, else a one-line SafesubError (a session is never created behind the caller's back: it holds models);
  `study_session(family, cfg)` opens a matching one.
- `StudyResult`: ``layers`` (columns LAYER_COLUMNS: one row per model, pair, center, band layer, energy),
  ``summary`` (SUMMARY_COLUMNS: the band mean with its interval and, for U-H1, the null), ``null`` (the null's
  draws: model, center, energy, draw, mso), ``sets`` (role, name, source, size), ``band``.
"""
from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from safesub_core.activations import activation_overlap
from safesub_core.errors import SafesubError
from safesub_core.linalg import check_energy
from safesub_core.prompts import PromptSet, load_set

STUDY_BAND = (0.65, 0.90)  # fractions of L+1 (hidden-state entries, embeddings included), as the study's code
STUDY_ENERGIES = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
STUDY_VERSION = 1  # bump when the statistics change: cached results of older versions are not read
ROLES = ("U", "H1", "H2", "H2b")
CEILING_PAIR = "H1a-H1b"
PAIRS = (("U-H1", "U", "H1"), ("H1-H2", "H1", "H2"), ("U-H2", "U", "H2"), ("H1-H2b", "H1", "H2b"),
         (CEILING_PAIR, "H1a", "H1b"))
NULL_PAIR = "U-H1"  # the pair the label-permutation null is computed for
LAYER_COLUMNS = ("model", "pair", "center", "layer", "depth", "energy", "k_x", "k_y", "mso", "lo", "hi",
                 "random_baseline", "n_x", "n_y")
SUMMARY_COLUMNS = ("model", "pair", "noise_ceiling", "center", "energy", "k_x", "k_y", "mso", "lo", "hi",
                   "boot_mean", "random_baseline", "n_x", "n_y", "n_layers", "null_mean", "null_q95", "p_greater",
                   "p_less")
NULL_COLUMNS = ("model", "center", "energy", "draw", "mso")
SET_COLUMNS = ("role", "name", "source", "size")


# --------------------------------------------------------------------------------------------------------------
# band


def study_band(n_hidden_states: int) -> range:
    """The study's layers: ``range(int(0.65 (L+1)), int(0.90 (L+1)))`` for n_hidden_states = L+1 entries of
    `output_hidden_states` (embeddings included); a SafesubError when that range is empty."""
    try:
        n = int(n_hidden_states)
    except (TypeError, ValueError):
        raise SafesubError(f"hidden-state count {n_hidden_states!r}: not an integer") from None
    if n != n_hidden_states or n < 1:
        raise SafesubError(f"hidden-state count {n_hidden_states!r}: must be a whole number >= 1")
    band = range(int(STUDY_BAND[0] * n), int(STUDY_BAND[1] * n))
    if len(band) == 0:
        raise SafesubError(f"study layer band: empty for a model with {n} hidden states ({n - 1} layers): "
                           f"int(0.65*{n}) = int(0.90*{n}) = {band.start}")
    return band


# --------------------------------------------------------------------------------------------------------------
# sets

_NAMES = ("Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena", "Kofi", "Ines")
_ITEMS = ("apples", "books", "marbles", "stamps", "pencils", "cookies", "shells", "cards")
WORD_SOURCE = "generated templated word problems, written for safesub (public domain)"


def word_problems(n: int, seed: int = 0) -> PromptSet:
    """`n` distinct templated arithmetic word problems with their answers (kind "math"), deterministic in `seed`:
    "Tom has 12 apples and buys 7 more. How many apples does he have now?" -> "19" (also gives away, boxes of)."""
    if int(n) != n or int(n) < 1:
        raise SafesubError(f"word problems: need a whole n >= 1, got {n!r}")
    n = int(n)
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    tries = 0
    while len(seen) < n:
        tries += 1
        if tries > 100 * n + 10_000:
            raise SafesubError(f"word problems: cannot write {n} distinct problems")
        who, item, form = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randrange(4)
        a, b = rng.randint(2, 40), rng.randint(2, 20)
        if form == 0:
            q, ans = f"{who} has {a} {item} and buys {b} more. How many {item} does {who} have now?", a + b
        elif form == 1:
            a = a + b
            q, ans = f"{who} has {a} {item} and gives {b} to a friend. How many {item} are left?", a - b
        elif form == 2:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q, ans = f"{who} buys {a} boxes with {b} {item} in each box. How many {item} is that in all?", a * b
        else:
            c = rng.randint(2, 20)
            q = (f"{who} had {a} {item}, found {b} more and then lost {c}. How many {item} does {who} have "
                 "now?")
            ans = a + b - c
            if ans < 0:
                continue
        seen.setdefault(q, str(ans))
    return PromptSet(f"word-problems-{n}-s{seed}", tuple(seen), tuple(seen.values()), "math", WORD_SOURCE)


@dataclass(frozen=True)
class StudySets:
    """The study's four prompt sets: U (useful), H1 (harmful requests), H2 (a second harmful source: ToxiGen),
    H2b (another second source: Do-Not-Answer)."""

    U: PromptSet
    H1: PromptSet
    H2: PromptSet
    H2b: PromptSet

    def by_role(self) -> dict[str, PromptSet]:
        return {r: getattr(self, r) for r in ROLES}

    def table(self) -> pd.DataFrame:
        """One row per set: role, name, source, size."""
        return pd.DataFrame([(r, ps.name, ps.source, len(ps)) for r, ps in self.by_role().items()],
                            columns=list(SET_COLUMNS))


def study_sets(n: int = 100, seed: int = 0) -> StudySets:
    """The study's sets from what is packaged, at most `n` prompts each (all there are where fewer):

    U   = GSM8K (all 100), then generated word problems (`word_problems`, `seed`) up to n;
    H1  = HarmBench eval split + AdvBench eval split, concatenated (repeats dropped), the first n;
    H2  = ToxiGen toxic texts (`toxigen`, the whole set: no family trains on it), the first n;
    H2b = Do-Not-Answer eval split, the first n.
    A missing data package is the one-line SafesubError of `prompts.load_set`.
    """
    if int(n) != n or int(n) < 1:
        raise SafesubError(f"study sets: need a whole n >= 1 prompts a set, got {n!r}")
    n = int(n)
    gsm = load_set("gsm8k")
    if len(gsm) >= n:
        U = gsm.head(n)
    else:
        extra = word_problems(n - len(gsm), seed)
        U = PromptSet(f"gsm8k+{extra.name}", gsm.prompts + extra.prompts, gsm.references + extra.references,
                      "math", f"{gsm.source}; {extra.source}")
    hb, ab = load_set("harmbench:eval"), load_set("advbench:eval")
    h1 = list(dict.fromkeys(hb.prompts + ab.prompts))[:n]
    H1 = PromptSet(f"harmbench:eval+advbench:eval[:{n}]", tuple(h1), None, "harmful", f"{hb.source}; {ab.source}")
    return StudySets(U=U, H1=H1, H2=load_set("toxigen").head(n), H2b=load_set("donotanswer:eval").head(n))


# --------------------------------------------------------------------------------------------------------------
# config and result


@dataclass(frozen=True)
class StudyActivationConfig:
    """How the activation study runs: prompt format (`chat`: False is the study's raw text), energies, prompts a
    set, bootstrap replicates, permutation draws, seed, the centrings computed and the interval's confidence."""

    chat: bool = False
    energies: tuple[float, ...] = STUDY_ENERGIES
    n_prompts: int = 100
    n_boot: int = 200
    n_perm: int = 200
    seed: int = 0
    centers: tuple[bool, ...] = (False, True)
    confidence: float = 0.95

    def __post_init__(self):
        energies = tuple(check_energy(e) for e in self.energies)
        if not energies:
            raise SafesubError("activation study config: energies: none given")
        object.__setattr__(self, "energies", energies)
        for name, low in (("n_prompts", 1), ("n_boot", 0), ("n_perm", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or int(v) < low:
                raise SafesubError(f"activation study config: {name} {v!r} must be a whole number >= {low}")
            object.__setattr__(self, name, int(v))
        centers = tuple(dict.fromkeys(bool(c) for c in self.centers))
        if not centers:
            raise SafesubError("activation study config: centers: none given")
        object.__setattr__(self, "centers", centers)
        if not 0.0 < float(self.confidence) < 1.0:
            raise SafesubError(f"activation study config: confidence {self.confidence} must be in (0, 1)")


@dataclass
class StudyResult:
    """What the study computes (columns in the module docstring); `seconds` is the wall time of the overlap
    statistics (not the forward passes)."""

    layers: pd.DataFrame
    summary: pd.DataFrame
    null: pd.DataFrame
    sets: pd.DataFrame
    band: range
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# the pure computation


def _check(states: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = [r for r in ("U", "H1", "H2") if r not in states]
    if missing:
        raise SafesubError(f"activation study states: lack set(s) {', '.join(missing)} (need U, H1, H2, "
                           "optionally H2b)")
    unknown = [r for r in states if r not in ROLES]
    if unknown:
        raise SafesubError(f"activation study states: unknown set(s) {', '.join(map(str, unknown))}")
    out, shape = {}, None
    for r in ROLES:
        if r not in states or states[r] is None:
            continue
        S = states[r]
        if not isinstance(S, torch.Tensor) or S.dim() != 3:
            got = tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__
            raise SafesubError(f"states of set {r}: expected a tensor (layers, prompts, hidden), got {got}")
        if shape is None:
            shape = (S.shape[0], S.shape[2])
        elif (S.shape[0], S.shape[2]) != shape:
            raise SafesubError(f"states of set {r}: {S.shape[0]} layers x hidden {S.shape[2]}, other sets "
                               f"{shape[0]} x {shape[1]}")
        need = 4 if r == "H1" else 2
        if S.shape[1] < need:
            raise SafesubError(f"states of set {r}: {S.shape[1]} prompts, the study needs at least {need}")
        if not torch.isfinite(S).all():
            raise SafesubError(f"states of set {r}: contain non-finite values")
        out[r] = S.to(torch.float32)
    return out


def _mso(X: torch.Tensor, Y: torch.Tensor, energies, center: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MSO, k_x, k_y of two band-sliced state tensors (layers, n, D): arrays (layers, energies)."""
    df = activation_overlap(X, Y, energies, center)
    shape = (X.shape[0], len(energies))
    return (df["mso"].to_numpy(float).reshape(shape), df["k_x"].to_numpy(float).reshape(shape),
            df["k_y"].to_numpy(float).reshape(shape))


def _mso_at_ranks(X: torch.Tensor, Y: torch.Tensor, kx: np.ndarray, ky: np.ndarray, center: bool) -> np.ndarray:
    """MSO of two band-sliced state tensors (layers, n, D) at GIVEN ranks kx, ky (layers, energies): the bootstrap's
    statistic. A resample repeats about a third of its prompts, which lowers the rank an energy fraction picks and
    with it the overlap, so an interval from re-chosen ranks misses its own estimate; at the point estimate's
    ranks it does not (ranks beyond a resample's own are cut to it). NaN where a matrix is zero."""
    out = np.full(kx.shape, np.nan)
    for layer in range(X.shape[0]):
        A, B = X[layer].double(), Y[layer].double()
        if center:
            A, B = A - A.mean(0, keepdim=True), B - B.mean(0, keepdim=True)
        if float(A.abs().max()) == 0.0 or float(B.abs().max()) == 0.0:
            continue
        Ua, sa, _ = torch.linalg.svd(A.T, full_matrices=False)
        Ub, sb, _ = torch.linalg.svd(B.T, full_matrices=False)
        ra, rb = int((sa > sa[0] * 1e-10).sum()), int((sb > sb[0] * 1e-10).sum())
        G2 = (Ua[:, :ra].T @ Ub[:, :rb]).pow(2).cumsum(0).cumsum(1).numpy()
        for e in range(kx.shape[1]):
            a, b = min(int(kx[layer, e]), ra), min(int(ky[layer, e]), rb)
            if a and b:
                out[layer, e] = G2[a - 1, b - 1] / min(a, b)
    return out


def _pair_coords(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X (layers, n, D) and Y (layers, m, D) in float64 coordinates of an orthonormal basis Q_l (D x r, r = n + m)
    of a space holding both sets' rows at each layer: (layers, n, r) and (layers, m, r); as they are when r >= D.

    Exact for everything the MSO reads: a resample of the rows, or their mean, stays in the same space, and
    Q_l^T is an isometry there, so singular values, energy ranks and ||Q_X^T Q_Y||_F all keep their values. The
    bootstrap and the null run on these smaller matrices (about 3x faster with D = 576, 100 prompts a set)."""
    n, m, D = X.shape[1], Y.shape[1], X.shape[2]
    if n + m >= D:
        return X.double(), Y.double()
    Xs, Ys = [], []
    for layer in range(X.shape[0]):
        Q = torch.linalg.qr(torch.cat([X[layer], Y[layer]]).T.double())[0]  # (D, n + m)
        Xs.append(X[layer].double() @ Q)
        Ys.append(Y[layer].double() @ Q)
    return torch.stack(Xs), torch.stack(Ys)


def _quantiles(a: np.ndarray, confidence: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    alpha = 1.0 - confidence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN slice gives NaN
        lo, hi = np.nanquantile(a, [alpha / 2, 1 - alpha / 2], axis=axis)
    return lo, hi


def _nanmean(a: np.ndarray, axis) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def study_overlap(states: Mapping[str, torch.Tensor], cfg: StudyActivationConfig | None = None,
                  model: str = "") -> StudyResult:
    """The study's activation overlaps of one model's states (pure; see the module docstring).

    `states` maps "U", "H1", "H2" and optionally "H2b" to float states (L+1, n_set, D) of the same model. Returns a
    `StudyResult` labelled `model`; its `sets` table holds the roles and sizes only (names come from `run_study`).
    """
    cfg = cfg or StudyActivationConfig()
    t0 = time.perf_counter()
    S = _check(states)
    n_hidden, D = S["U"].shape[0], S["U"].shape[2]
    band = study_band(n_hidden)
    L = n_hidden - 1
    energies = list(cfg.energies)
    B = {r: S[r][band.start:band.stop] for r in S}  # (n_band, n, D)
    root = np.random.SeedSequence(int(cfg.seed))
    split_rng, boot_rng, perm_rng = (np.random.default_rng(s) for s in root.spawn(3))
    order = split_rng.permutation(B["H1"].shape[1])
    half = B["H1"].shape[1] // 2
    halves = {"H1a": np.sort(order[:half]), "H1b": np.sort(order[half:])}
    B["H1a"], B["H1b"] = B["H1"][:, halves["H1a"]], B["H1"][:, halves["H1b"]]
    pairs = [p for p in PAIRS if p[1] in B and p[2] in B]
    sizes = {r: B[r].shape[1] for r in B}

    # point estimates
    point = {(p, c): _mso(B[x], B[y], energies, c) for p, x, y in pairs for c in cfg.centers}

    # bootstrap: one resample of every set per replicate, shared by the pairs it enters; each pair's states in
    # the coordinates of the space its two sets span (`_pair_coords`: exact, smaller SVDs)
    coords = {p: _pair_coords(B[x], B[y]) if cfg.n_boot or p == NULL_PAIR else None for p, x, y in pairs}
    boot = {key: np.full((cfg.n_boot, len(band), len(energies)), np.nan) for key in point}
    for b in range(cfg.n_boot):
        idx = {r: torch.from_numpy(boot_rng.integers(0, sizes[r], sizes[r])) for r in B}
        for p, x, y in pairs:
            X, Y = coords[p][0][:, idx[x]], coords[p][1][:, idx[y]]
            for c in cfg.centers:
                _, kx, ky = point[(p, c)]
                boot[(p, c)][b] = _mso_at_ranks(X, Y, kx, ky, c)

    # label-permutation null of U against H1: band-mean MSO per energy
    pooled = torch.cat(coords[NULL_PAIR], dim=1)
    n_u = sizes["U"]
    null = {c: np.full((cfg.n_perm, len(energies)), np.nan) for c in cfg.centers}
    for d in range(cfg.n_perm):
        perm = torch.from_numpy(perm_rng.permutation(pooled.shape[1]))
        X, Y = pooled[:, perm[:n_u]], pooled[:, perm[n_u:]]
        for c in cfg.centers:
            null[c][d] = _nanmean(_mso(X, Y, energies, c)[0], axis=0)

    layer_rows, summary_rows, null_rows = [], [], []
    for p, x, y in pairs:
        for c in cfg.centers:
            mso, kx, ky = point[(p, c)]
            lo, hi = _quantiles(boot[(p, c)], cfg.confidence) if cfg.n_boot else (np.full_like(mso, np.nan),) * 2
            for li, layer in enumerate(band):
                for ei, eta in enumerate(energies):
                    layer_rows.append((model, p, c, layer, layer / L if L else 0.0, eta, int(kx[li, ei]),
                                       int(ky[li, ei]), mso[li, ei], lo[li, ei], hi[li, ei],
                                       max(kx[li, ei], ky[li, ei]) / D, sizes[x], sizes[y]))
            band_mso = _nanmean(mso, axis=0)
            n_layers = np.isfinite(mso).sum(axis=0)
            if cfg.n_boot:
                reps = _nanmean(boot[(p, c)], axis=1)  # (n_boot, energies): band means of the replicates
                blo, bhi = _quantiles(reps, cfg.confidence)
                bmean = _nanmean(reps, axis=0)
            else:
                blo = bhi = bmean = np.full(len(energies), np.nan)
            base = (np.maximum(kx, ky) / D).mean(axis=0)
            for ei, eta in enumerate(energies):
                nm = nq = pg = pl = np.nan
                if p == NULL_PAIR and cfg.n_perm:
                    draws = null[c][:, ei]
                    ok = draws[np.isfinite(draws)]
                    if ok.size and np.isfinite(band_mso[ei]):
                        nm, nq = float(ok.mean()), float(np.quantile(ok, 0.95))
                        pg = (1 + int((ok >= band_mso[ei]).sum())) / (1 + ok.size)
                        pl = (1 + int((ok <= band_mso[ei]).sum())) / (1 + ok.size)
                summary_rows.append((model, p, p == CEILING_PAIR, c, eta, float(kx[:, ei].mean()),
                                     float(ky[:, ei].mean()), float(band_mso[ei]), float(blo[ei]), float(bhi[ei]),
                                     float(bmean[ei]), float(base[ei]), sizes[x], sizes[y], int(n_layers[ei]),
                                     nm, nq, pg, pl))
    for c in cfg.centers:
        for d in range(cfg.n_perm):
            for ei, eta in enumerate(energies):
                null_rows.append((model, c, eta, d, float(null[c][d, ei])))
    sets = pd.DataFrame([(r, r, "", sizes[r]) for r in ROLES if r in S], columns=list(SET_COLUMNS))
    return StudyResult(
        layers=pd.DataFrame(layer_rows, columns=list(LAYER_COLUMNS)),
        summary=pd.DataFrame(summary_rows, columns=list(SUMMARY_COLUMNS)),
        null=pd.DataFrame(null_rows, columns=list(NULL_COLUMNS)),
        sets=sets, band=band, seconds=time.perf_counter() - t0,
        meta=dict(n_hidden_states=n_hidden, hidden=D, n_boot=cfg.n_boot, n_perm=cfg.n_perm, seed=cfg.seed,
                  chat=cfg.chat, halves={k: v.tolist() for k, v in halves.items()}),
    )


# --------------------------------------------------------------------------------------------------------------
# on a family session


def _check_session(session, cfg: StudyActivationConfig) -> None:
    if bool(session.chat) != bool(cfg.chat):
        raise SafesubError(f"activation study: the session formats prompts with chat={bool(session.chat)} but the "
                           f"config asks chat={bool(cfg.chat)}; open a matching one with study_session(family, cfg)")
    if session.dtype != torch.float32:
        raise SafesubError(f"activation study: the session runs its models in {session.dtype}, the study needs "
                           "torch.float32; open a matching one with study_session(family, cfg)")


def study_session(family, cfg: StudyActivationConfig | None = None, **kwargs):
    """A `FamilySession` on `family` that matches `cfg`: float32 and ``chat=cfg.chat`` (other FamilySession
    arguments pass through; a `dtype` or `chat` that contradicts those is a one-line SafesubError)."""
    cfg = cfg or StudyActivationConfig()
    if kwargs.pop("dtype", torch.float32) != torch.float32:
        raise SafesubError("activation study session: the study runs its models in torch.float32")
    if bool(kwargs.pop("chat", cfg.chat)) != bool(cfg.chat):
        raise SafesubError(f"activation study session: chat must be the config's ({bool(cfg.chat)})")
    from safesub_core.session import FamilySession  # the session loads models: imported when one is asked for

    return FamilySession(family, dtype=torch.float32, chat=cfg.chat, **kwargs)


def run_study(session, models: Sequence[str], cfg: StudyActivationConfig | None = None,
              sets: StudySets | None = None,
              progress: Callable[[str, str], None] | None = None) -> StudyResult:
    """The study's activation overlaps for each model in `models` (checkpoint names of the session's family: the
    start model and fine-tunes), states from the session's cache (`FamilySession.states`).

    `sets` default to `study_sets(cfg.n_prompts, cfg.seed)`. The session must use float32 and ``cfg.chat`` (else a
    one-line SafesubError). `progress(model, role)` is called before each set's states are computed or read.
    """
    cfg = cfg or StudyActivationConfig()
    models = [str(m) for m in models]
    if not models:
        raise SafesubError("activation study: no models given")
    _check_session(session, cfg)
    sets = sets or study_sets(cfg.n_prompts, cfg.seed)
    results, seconds = [], 0.0
    for m in models:
        def compute(m=m):
            states = {}
            for role, ps in sets.by_role().items():
                if progress is not None:
                    progress(m, role)
                states[role] = session.states(m, ps)
            res = study_overlap(states, cfg, model=m)
            return dict(layers=res.layers.to_dict(orient="list"), summary=res.summary.to_dict(orient="list"),
                        null=res.null.to_dict(orient="list"), seconds=res.seconds, meta=res.meta,
                        band=[res.band.start, res.band.stop])

        # cached like the states it reads: the model's files, the sets' contents, the config and this version
        parts = session._key(m, None, prompts=[ps.content_hash for ps in sets.by_role().values()]) | dict(
            study=dict(cfg.__dict__), version=STUDY_VERSION)
        out = session.cache.get_or_compute("activation_study", parts, compute)
        res = StudyResult(layers=pd.DataFrame(out["layers"]), summary=pd.DataFrame(out["summary"]),
                          null=pd.DataFrame(out["null"]), sets=sets.table(), band=range(*out["band"]),
                          seconds=out["seconds"], meta=out["meta"])
        seconds += res.seconds
        results.append(res)
    return StudyResult(
        layers=pd.concat([r.layers for r in results], ignore_index=True),
        summary=pd.concat([r.summary for r in results], ignore_index=True),
        null=pd.concat([r.null for r in results], ignore_index=True),
        sets=sets.table(), band=results[0].band, seconds=seconds,
        meta=results[0].meta | dict(models=models),
    )
