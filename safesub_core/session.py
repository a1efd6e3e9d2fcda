"""A working session on one family: its models resident once, one subspace engine per variant, scores per point.

Contract:
- `FamilySession(family)` loads the start model twice (a `reference` that stays untouched and a `working` copy
  the projection writes into) and the tokenizer; other checkpoints load on first use and stay resident within
  `model_bytes` (`compute.model_budget`), the least recently used dropped first (loaded again when used). The app
  keeps one session at a time. With a `placement` (a device map across the GPUs and the CPU, `placement.py`)
  every model is spread over its devices (the working copy loaded a second time, not copied), each tensor's update
  made on its own device.
- A *point* is (variant, ProjectionConfig) and, for a Random or Random-K subspace, the random draw `seed` (default
  the session's; one engine per variant and draw). `point_scores(variant, cfg)` returns the engine's diagnostics
  plus the live scores of the projected model, composed in memory (nothing written to disk).
- Live scores (forward passes, plus a few greedy tokens for arithmetic; what sliders show) run on the evaluation sets
  (`EvalSets`: the family file's `eval_sets`, else the built-in eval splits) in waves of `batch` prompts a role
  (`waves.LiveWaves`): a move scores the first wave, `sharpen` adds one more while the slider rests, and every
  score comes with its interval and n (`waves.summarise`):
    margin_mean, share_margin_negative   refusal log-odds on harmful prompts (the family's refusal openings
                                         against every other answer); the share below 0 is predicted to comply
    nll_mean                             NLL of reference answers on utility prompts
    arith_exact_match                    exact match of greedy answers (12 new tokens) on utility prompts
    kl_to_start                          KL(start || model) of the next token on benign prompts
  Prompts are put to the models with the chat template (or raw) and the family's system prompt (`format`).
- A point may also be a competing method's (`hypotheses.MethodPoint`: SafeLoRA at tau, refusal ablation,
  orthogonalisation or addition at a strength; `hypotheses.Hypotheses` holds those methods): it is scored the same
  way, its key holding the refusal direction it used.
- Generation scores (`generation_scores`): refusal rate and attack success rate on harmful prompts, exact match on
  utility prompts (the sets' answer convention), over-refusal on edgy prompts, each with its interval, and the
  per-prompt tables.
Every score, state and map is cached on disk under ONE kind of key (`_key`): everything that decides what it means.
That is the code's SCORE_VERSION and `definitions()` (refusal markers, the refusal openings, live answer tokens),
the tokenizer's files (`fingerprints.tokenizer_fingerprint` of the start model's: tokenizer, special tokens, chat
template), the prompt format (chat on or off, system prompt), dtype and device type; the model's files (`fingerprints.model_fingerprint`: weights,
config, generation config, and a LoRA adapter's start model); for a projected point also the start and base models,
the point and its random draw; where a score compares with the start model (kl_to_start), the start model; then what the
entry itself needs: the prompts' content (a live wave's own), the answer convention, max new tokens, the judge (its kind, rubric and local model files).
A session notices files changed on disk since it loaded them (`_sync`, on every key): it reloads the changed
models and tokenizer, rebuilds the engines that read them and forgets what was derived from them, so a resident
session never scores stale models under fresh keys. A point's scores are reproducible to float rounding (about 1e-6
relative), not bit for bit: a rank move writes the weights from the previous point's (`projected`), and the pass
that scores them may also check a draft of the answers.
A session may be shared by several app users at once: its own lock serialises everything that sets or reads the
working model, so concurrent sliders never score a half-written projection. Every public method takes that lock
itself; callers (pages, the CLI, a notebook) never do. The session is the one surface the app's pages use:
diagnostics and curves of a point, weight and activation overlaps, the depth-band mean (`band_mean`, the study's
band as in `activations.band_mean`), 2-D maps, and one prompt through any model (`inspect`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch

from safesub_core import scoring
from safesub_core.activations import BandMean, activation_map, activation_overlap, band_mean, last_token_states
from safesub_core.cache import DiskCache
from safesub_core.checkpoints import Checkpoint
from safesub_core.compute import (CPU_BATCH, CPU_DEFAULT_BATCH, FULL_LIVE_PROMPTS, GPU_BATCH, dtype_name,
                                  executable_batch, model_budget, resident_budget)
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.fingerprints import model_fingerprint, tokenizer_fingerprint
from safesub_core.generation import PromptFormat, generate
from safesub_core.hashing import snapshot
from safesub_core.hypotheses import Hypotheses, MethodPoint
from safesub_core.interventions import orthogonalize_weights
from safesub_core.linalg import DEFAULT_ENERGIES
from safesub_core.loading import load_model
from safesub_core.overlap import weight_overlap
from safesub_core.placement import Placement
from safesub_core.precision import composed_state_dict
from safesub_core.projection import ProjectionConfig, ProjectionDiagnostics
from safesub_core.prompts import EvalSets, PromptSet
from safesub_core.scoring.judges import LOCAL_KINDS
from safesub_core.scoring.live import LIVE_ARITH_TOKENS
from safesub_core.subspace import SubspaceEngine
from safesub_core.waves import LiveWaves, Waves, generation_summary

REPORTS = {"harmful": scoring.harmfulness_report, "math": scoring.utility_report,  # a prompt set's kind -> its scores
           "edgy": scoring.overrefusal_report, "benign": scoring.overrefusal_report}
ROLE_KINDS = {"harmful": "harmful", "utility": "math", "edgy": "edgy", "benign": "benign"}  # a role's scores
GENERATION_TOKENS = 48  # new tokens of the generation scores by default
GENERATION_ROLES = ("harmful", "utility", "edgy")  # the sets generation scores read, in this order
MAX_MOVES = 16  # rank moves of the working model between fresh compositions (float rounding builds up over them)
# Bump when what a cached score, state or map means changes in code (a definition, the prompt formatting, a
# decoding rule) in a way `definitions()` does not see: every entry the session wrote before is then recomputed.
SCORE_VERSION = 2


def definitions(openings: Sequence[str] = ()) -> str:
    """A digest of what defines the scores (refusal markers, the refusal openings of the live log-odds, the live
    answer's token count): part of every key, so editing one never serves an old score."""
    payload = [list(scoring.REFUSAL_MARKERS), list(openings), LIVE_ARITH_TOKENS]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _nbytes(model: torch.nn.Module) -> int:
    """Parameter bytes of a model (shared tensors once)."""
    return sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())


def judge_key(judge: scoring.Judge | None) -> dict | None:
    """What decides a judge's verdicts: its kind, model name, rubric (and HarmBench prompt) and answer length, and for
    a local judge model its files (weights, config, generation config and tokenizer) and dtype; None for no judge.
    An endpoint's URL is not part of it (it is never stored): name its model."""
    if judge is None or judge.kind == "off":
        return None
    key = dict(kind=judge.kind, model=judge.model, rubric=judge.rubric, max_new_tokens=judge.max_new_tokens)
    if judge.kind == "harmbench":
        key["harmbench_prompt"] = judge.harmbench_prompt
    if judge.kind in LOCAL_KINDS:
        key["dtype"] = judge.dtype
        judge.check()
        ck = Checkpoint.resolve("judge", judge.path, allow_pickle=True)  # read for its hash only
        key["files"] = [model_fingerprint(ck), tokenizer_fingerprint(ck)]
    return key


class FamilySession(LiveWaves, Hypotheses):
    """One family's models, engines and scores; see the module docstring."""

    def __init__(self, family: Family, device: str = "cpu", dtype=torch.float32, sets: EvalSets | None = None,
                 chat: bool = True, seed: int = 0, cache: DiskCache | None = None,
                 resident_bytes: int | None = None, batch: int | None = None, model_bytes: int | None = None,
                 placement: Placement | None = None):
        family.validate()
        self.family, self.device, self.dtype, self.chat, self.seed = family, device, dtype, chat, seed
        self.placement = placement  # a device map across GPUs and the CPU (`placement.Placement`), or None
        if placement is not None:
            self.device = placement.main_device
        self.sets = sets or EvalSets.for_family(family)
        self.waves = Waves(self.sets, batch or FULL_LIVE_PROMPTS)  # a slider's first wave, then more at rest
        self.openings = tuple(family.refusal_openings or scoring.DEFAULT_REFUSAL_OPENINGS)
        self.cache = cache or DiskCache()
        self.resident_bytes = resident_bytes if resident_bytes is not None else resident_budget(device)
        self.model_bytes = model_bytes if model_bytes is not None else model_budget(device)
        self.evicted = 0  # checkpoints dropped to stay within `model_bytes`
        self._batch_sizes: dict[str, int] = {}  # kind of run -> the batch size that last ran (`_batched`)
        self._lock = threading.RLock()  # serialises every use of the shared working model
        self._load_start()

    def _load_start(self) -> None:
        """(Re)load the start model (the reference and its working copy) and the tokenizer, and forget everything
        derived from earlier ones: other models, engines, the working model's point, drafts, the reference's
        logits. What is loaded is fingerprinted first (`_loaded`); a failed load changes nothing."""
        family = self.family
        ck = family.start_checkpoint
        model_print, tokenizer_print = model_fingerprint(ck, family), tokenizer_fingerprint(ck, family)
        reference, tokenizer = load_model(ck, family, self.device, self.dtype, placement=self.placement)
        working = copy.deepcopy(reference) if self.placement is None else \
            load_model(ck, family, self.device, self.dtype, tokenizer=False, placement=self.placement)[0]
        self.reference, self.tokenizer, self.working = reference, tokenizer, working
        self._models: dict[str, torch.nn.Module] = {family.start: self.reference}
        self._loaded: dict[str, str] = {family.start: model_print}  # resident model -> its model fingerprint
        self._tokenizer_print = tokenizer_print
        self._engines: dict[tuple[str, int], SubspaceEngine] = {}  # (variant, seed) -> its engine
        self._engine_prints: dict[tuple[str, int], tuple[str, ...]] = {}  # -> `_engine_print` when it was built
        self._applied: tuple[str, int, ProjectionConfig] | None = None  # the working model's (variant, seed, point)
        self._moves = 0  # applies since the working model was last composed anew
        self._reference_logits: dict = {}  # the untouched start model's KL logits, computed once
        self._answers: dict[tuple, torch.Tensor] = {}  # greedy answer tokens per point: drafts for the next ones
        self._checked: tuple | None = None  # ((point, wave), draft, F(draft)) from the latest forward pass
        self._warm: set = set()  # (variant, seed) whose cold paths `warm` has run
        self._intervention = None  # a competing method's hooks or weights attached now (`hypotheses`)

    @property
    def format(self) -> PromptFormat:
        """How every prompt is put to the models: the chat template (or raw text) and the family's system prompt."""
        return PromptFormat(self.chat, self.family.system_prompt)

    def _engine_print(self, variant: str) -> tuple[str, ...]:
        """The tensors a variant's engine reads: base, start and variant (`SubspaceEngine.build` keys by them)."""
        f = self.family
        return f.base.fingerprint(), f.start_checkpoint.fingerprint(f), f.checkpoint(variant).fingerprint(f)

    def _sync(self) -> None:
        """Reload what changed on disk since this session loaded it: a changed start model or tokenizer reloads
        everything (`_load_start`); another changed resident model is dropped (loaded again on use), an engine
        whose checkpoints changed is rebuilt on use, and the drafts are forgotten. The family is validated again
        first. Cheap when nothing changed (fingerprints are memoised by file stats)."""
        f = self.family
        start = f.start_checkpoint
        with snapshot():
            start_changed = (model_fingerprint(start, f) != self._loaded.get(f.start)
                             or tokenizer_fingerprint(start, f) != self._tokenizer_print)
            models = [n for n in list(self._loaded) if n != f.start
                      and model_fingerprint(f.checkpoint(n), f) != self._loaded.get(n)]
            engines = [k for k, p in list(self._engine_prints.items()) if p != self._engine_print(k[0])]
        if not (start_changed or models or engines):
            return
        with self._lock:
            self._release_intervention()
            f.validate()
            if start_changed:
                self._load_start()
                return
            for n in models:
                self._models.pop(n, None)
                self._loaded.pop(n, None)
            for k in engines:
                self._engines.pop(k, None)
                self._engine_prints.pop(k, None)
                if self._applied is not None and self._applied[:2] == k:
                    self._applied = None  # the working model holds the old engine's point: compose anew
            self._answers.clear()
            self._checked = None

    # ------------------------------------------------------------------------------------------------ models
    def model(self, name: str) -> torch.nn.Module:
        """A checkpoint of the family by name ('base', 'aligned', a variant...), loaded once."""
        with self._lock:
            self._sync()
            self._release_intervention()
            if name not in self._models:
                ck = self.family.checkpoint(name)
                model_print = model_fingerprint(ck, self.family)
                self._make_room()
                self._models[name] = load_model(ck, self.family, self.device, self.dtype, tokenizer=False,
                                                placement=self.placement)[0]
                self._loaded[name] = model_print
            self._models[name] = self._models.pop(name)  # most recently used last
            return self._models[name]

    def _make_room(self) -> None:
        """Drop the least recently used checkpoints (never the start model) until one more of the start model's
        size fits in `model_bytes` beside the others; a model is never refused (at worst it is the only other)."""
        size = _nbytes(self.reference)
        others = [n for n in self._models if n != self.family.start]
        while others and (len(others) + 1) * size > self.model_bytes:
            name = others.pop(0)
            self._models.pop(name, None)
            self._loaded.pop(name, None)
            self.evicted += 1

    def in_memory(self) -> dict:
        """What this session holds: the checkpoints loaded (each once; the start model also has its working copy),
        their parameter bytes (shared tensors counted once), device and dtype."""
        with self._lock:
            seen, total = set(), 0
            for m in [*self._models.values(), self.working]:
                for p in m.parameters():
                    if p.data_ptr() not in seen:
                        seen.add(p.data_ptr())
                        total += p.numel() * p.element_size()
            devices = sorted({str(p.device) for m in self._models.values() for p in m.parameters()})
            return dict(models=list(self._models), working_copy=self.family.start, bytes=total,
                        device=str(self.device), devices=devices, dtype=dtype_name(self.dtype),
                        budget=self.model_bytes, evicted=self.evicted)

    def engine(self, variant: str, progress: Callable[[int, int, str], None] | None = None,
               seed: int | None = None) -> SubspaceEngine:
        """The variant's SubspaceEngine with the random subspaces of draw `seed` (default the session's), built
        once."""
        key = (variant, self.seed if seed is None else int(seed))
        with self._lock:
            self._sync()
            if key not in self._engines:
                engine_print = self._engine_print(variant)
                self._engines[key] = SubspaceEngine.build(self.family, variant, seed=key[1], device=self.device,
                                                          cache=self.cache, progress=progress,
                                                          resident_bytes=self.resident_bytes)
                self._engine_prints[key] = engine_print
            return self._engines[key]

    def _seed(self, cfg: ProjectionConfig | None, seed: int | None) -> int | None:
        """The draw a point uses: None for a checkpoint, the session's for Top-K (it draws nothing), else `seed`
        (default the session's)."""
        if not isinstance(cfg, ProjectionConfig):
            return None  # a checkpoint, or a competing method's point (`hypotheses.MethodPoint`)
        return self.seed if seed is None or cfg.subspace == "topk" else int(seed)

    def drop_engine(self, variant: str) -> None:
        """Release the variant's engines (their resident bases), e.g. between variants of a long run."""
        with self._lock:
            for key in [k for k in self._engines if k[0] == variant]:
                self._engines.pop(key, None)
                self._engine_prints.pop(key, None)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the session's lock: for code that uses `projected` or `working` directly from several threads."""
        with self._lock:
            yield

    @property
    def n_layers(self) -> int:
        """Transformer layers of the family's models (hidden states have n_layers + 1 entries)."""
        return int(getattr(self.reference.config, "num_hidden_layers", 1))

    def diagnostics(self, variant: str, cfg: ProjectionConfig) -> ProjectionDiagnostics:
        """Energy kept, cosines and per-tensor tables at a point (cumulative sums: no model runs)."""
        with self._lock:
            return self.engine(variant).diagnostics(cfg)

    def curves(self, variant: str, modes: Sequence[str] = ("parallel",)) -> pd.DataFrame:
        """Energy kept and cos(task, kept) over the rank grid for every subspace (`SubspaceEngine.curves`)."""
        with self._lock:
            return self.engine(variant).curves(modes=tuple(modes))

    def projected(self, variant: str, cfg: ProjectionConfig, exact: bool = False,
                  seed: int | None = None) -> torch.nn.Module:
        """The working model set to the point (variant, cfg) with random draw `seed` (`_seed`), composed in memory;
        a caller that shares the session across threads holds `locked()` while using it. From the previous point of
        the same variant, draw, subspace, mode and alpha it moves by the ranks between (`SubspaceEngine.apply`),
        composing anew every MAX_MOVES moves and, with `exact`, now (an export)."""
        seed = self._seed(cfg, seed)
        with self._lock:
            self._sync()
            self._release_intervention()
            if self._applied != (variant, seed, cfg) or (exact and self._moves):
                applied, self._applied = self._applied, None  # a failed apply leaves the working model unknown
                since = applied[2] if applied and applied[:2] == (variant, seed) and not exact \
                    and self._moves < MAX_MOVES else None
                self.engine(variant, seed=seed).apply(self.working, self.reference, cfg, applied=since)
                self._applied, self._moves = (variant, seed, cfg), 0 if since is None else self._moves + 1
            return self.working

    def export(self, variant: str, cfg: ProjectionConfig, out_dir) -> None:
        """Write the projected model as a Hugging Face directory (safetensors), on request only. The weights are
        W_start + alpha X composed in float32 (`precision.composed_state_dict`): in bfloat16 or float16 the update
        would be rounded away again."""
        with self._lock:
            model = self.projected(variant, cfg, exact=True)
            model.save_pretrained(out_dir, state_dict=composed_state_dict(model), safe_serialization=True)
            self.tokenizer.save_pretrained(out_dir)

    def export_method(self, target: str, point: MethodPoint, out_dir) -> None:
        """Write a competing method's model as a Hugging Face directory (safetensors): SafeLoRA of `target` at tau
        (composed in float32, as `export`), or `target` with its weights orthogonalised against the refusal
        direction (`interventions.orthogonalize_weights`: untied when tied). Ablation and addition are hooks, not
        weights: a one-line SafesubError says to export orthogonalisation instead."""
        if point.method not in ("safelora", "orthogonalisation"):
            raise SafesubError(f"export: {point.label} is a hook on the model, not a set of weights (export "
                               "orthogonalisation, which computes the same as ablation)")
        with self._lock:
            if point.method == "safelora":
                model = self._method_model(target, point)
                model.save_pretrained(out_dir, state_dict=composed_state_dict(model), safe_serialization=True)
            else:
                self._release_intervention()
                model = self.reference if target == self.family.start else self.model(target)
                sel = self.refusal_selection(point.source)
                orthogonalize_weights(model, sel.direction, point.value).save_pretrained(out_dir,
                                                                                        safe_serialization=True)
            self.tokenizer.save_pretrained(out_dir)

    # ------------------------------------------------------------------------------------------------ scores
    def _key(self, target: str | None = None, cfg: ProjectionConfig | None = None, reference: bool = False,
             seed: int | None = None, **entry) -> dict:
        """THE cache key of every entry this session writes (see the module docstring): what all of them mean
        (score version, definitions, tokenizer, chat, dtype, device type), the model of `target` (a checkpoint, or
        with `cfg` the point of variant `target`: also the start and base models, the point and its random draw
        `seed`, `_seed`), the start model where the entry compares with it (`reference`), then the entry's own parts. Files changed since they
        were loaded are reloaded first (`_sync`), so the key names what computes the entry."""
        f = self.family
        with snapshot():
            self._sync()
            parts = dict(version=SCORE_VERSION, definitions=definitions(self.openings), tokenizer=self._tokenizer_print,
                         format=[self.format.chat, self.format.system], dtype=dtype_name(self.dtype),
                         device=torch.device(self.device).type)
            if self.placement is not None:
                parts["placement"] = self.placement.key()
            if target is not None:
                parts |= dict(target=target, model=model_fingerprint(f.checkpoint(target), f))
            if cfg is not None:
                parts |= dict(start=model_fingerprint(f.start_checkpoint, f), base=f.base.fingerprint(),
                              point=cfg.__dict__, seed=self._seed(cfg, seed))
                if isinstance(cfg, MethodPoint):
                    parts |= dict(kind="method") | self._method_key(cfg)
            if reference:
                parts["reference"] = model_fingerprint(f.start_checkpoint, f)
        return parts | entry

    def generation_scores(self, name: str, cfg: ProjectionConfig | None = None, max_new_tokens: int = GENERATION_TOKENS,
                          judge: scoring.Judge | None = None, progress: Callable[[int, int], None] | None = None,
                          compute: bool = True, seed: int | None = None, roles: Sequence[str] = GENERATION_ROLES,
                          forward_scores: bool = True) -> tuple[dict, pd.DataFrame] | None:
        """Greedy-decoding scores of a checkpoint (cfg None) or a point of variant `name`: (summary, per prompt).

        The per-prompt table has one row per prompt of the sets of `roles` (default the harmful, utility and edgy
        sets), with its role and set, the completion, the refusal verdict, the refusal log-odds and (utility)
        correctness; the summary holds each rate with its interval and n (`waves.generation_summary`; a role not
        scored has n 0). With `compute=False` only a result already in the disk cache is returned (None otherwise):
        nothing is loaded or run. `forward_scores=False` leaves out the per-prompt refusal log-odds and answer NLL
        (forward passes that cost about as much as the generation on a CPU; the rates do not use them); such a
        result is cached under its own key.
        """
        unknown = [r for r in roles if r not in GENERATION_ROLES]
        if unknown or not roles:
            raise SafesubError(f"generation roles {list(roles)}: choose from {', '.join(GENERATION_ROLES)}")
        sets = {role: getattr(self.sets, role) for role in GENERATION_ROLES if role in roles}
        parts = self._key(name, cfg, seed=seed, sets={k: ps.content_hash for k, ps in sets.items()},
                          convention=self.sets.convention, max_new_tokens=max_new_tokens, judge=judge_key(judge),
                          **({} if forward_scores else {"forward_scores": False}))
        if not compute:
            out = self.cache.get("generation_scores", parts)
            return None if out is None else (out["summary"], pd.DataFrame(out["table"]))

        def run_all():
            total, tables, extras = sum(len(ps) for ps in sets.values()), [], {}
            for role, ps in sets.items():
                done = sum(len(t) for t in tables)
                df, summary = self.score_set(name, ps, cfg, max_new_tokens, judge, kind=ROLE_KINDS[role], seed=seed,
                                             progress=progress and (lambda i, n, d=done: progress(d + i, total)),
                                             forward_scores=forward_scores)
                tables.append(df.assign(role=role, set=ps.name))
                extras |= {k: summary[k] for k in ("judge_scored", "judge_message") if k in summary}
            table = pd.concat(tables, ignore_index=True)
            return dict(summary=generation_summary(table) | extras, table=table.to_dict(orient="list"))

        with self._lock:
            out = self.cache.get_or_compute("generation_scores", parts, run_all)
        return out["summary"], pd.DataFrame(out["table"])

    def score_set(self, name: str, prompt_set: PromptSet, cfg: ProjectionConfig | None = None,
                  max_new_tokens: int = GENERATION_TOKENS, judge: scoring.Judge | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  kind: str | None = None, seed: int | None = None,
                  forward_scores: bool = True) -> tuple[pd.DataFrame, dict]:
        """Greedy completions of a checkpoint (cfg None) or a point of variant `name` on one prompt set, scored by
        `kind` (default the set's own): harmfulness (refusal matching, judge) for 'harmful', exact match for 'math',
        refusal rate (over-refusal) for 'benign' and 'edgy'. (per prompt, summary); not cached (see
        `generation_scores`)."""
        report = REPORTS[kind or prompt_set.kind]
        kw = dict(judge=judge, openings=self.openings) if report is scoring.harmfulness_report else \
            dict(convention=self.sets.convention) if report is scoring.utility_report else \
            dict(openings=self.openings)
        kw["forward_scores"] = forward_scores
        with self._lock:
            model = self._wave_model(name, cfg, seed)
            return self._batched("generation", lambda b: report(
                model, self.tokenizer, prompt_set, max_new_tokens=max_new_tokens, chat=self.format,
                progress=progress, batch_size=b, **kw))

    def _batched(self, kind: str, fn: Callable[[int], object]):
        """fn(batch_size) at the size that last ran for `kind` (on the CPU `compute.CPU_BATCH`; on a GPU searched
        from GPU_BATCH down, shrinking after an out-of-memory error: `compute.executable_batch`), remembering the size
        that ran."""
        cpu = CPU_BATCH.get(kind, CPU_DEFAULT_BATCH)
        start = self._batch_sizes.get(kind, GPU_BATCH if torch.device(self.device).type == "cuda" else cpu)
        out, self._batch_sizes[kind] = executable_batch(fn, start, self.device)
        return out

    # ------------------------------------------------------------------------------------------- activations
    def states(self, name: str, prompt_set: PromptSet, cfg: ProjectionConfig | None = None,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Last-real-token hidden states (L+1, n, D) of a checkpoint, or of a point of variant `name` (cached)."""
        parts = self._key(name, cfg, prompts=prompt_set.content_hash)

        def compute():
            model = self.model(name) if cfg is None else self.projected(name, cfg)
            return {"states": self._batched("states", lambda b: last_token_states(
                model, self.tokenizer, prompt_set.prompts, chat=self.format, batch_size=b, progress=progress))}

        with self._lock:
            return self.cache.get_or_compute("activations", parts, compute)["states"]

    def activation_overlap(self, name_x: str, set_x: PromptSet, name_y: str, set_y: PromptSet,
                           energies=DEFAULT_ENERGIES, center: bool = False) -> pd.DataFrame:
        """Activation MSO per layer and energy between (model x, set x) and (model y, set y)."""
        return activation_overlap(self.states(name_x, set_x), self.states(name_y, set_y), energies, center)

    def activation_map(self, names: list[str], sets: list[PromptSet], layer: int, method: str = "pca",
                       seed: int = 0) -> pd.DataFrame:
        """Joint 2-D map of every (model, set) pair's states at `layer` (cached)."""
        parts = self._key(models={n: model_fingerprint(self.family.checkpoint(n), self.family) for n in names},
                          sets=[s.content_hash for s in sets], layer=layer, method=method, seed=seed)

        def compute():
            states = {(n, s.name): self.states(n, s) for n in names for s in sets}
            prompts = {(n, s.name): list(s.prompts) for n in names for s in sets}
            return activation_map(states, prompts, layer=layer, method=method, seed=seed)

        with self._lock:
            return self.cache.get_or_compute("activation_map", parts, compute)

    @staticmethod
    def band_mean(table: pd.DataFrame) -> BandMean:
        """The mean of an activation-overlap table over the study's depth band (`activations.band_mean`)."""
        return band_mean(table)

    # ------------------------------------------------------------------------------------------- weight space
    def weight_overlap(self, reference: str = "aligned", pairs: Sequence[tuple[str, str]] | None = None,
                       energies: Sequence[float] = DEFAULT_ENERGIES,
                       progress: Callable[[int, int, str], None] | None = None) -> pd.DataFrame:
        """Weight-space MSO per tensor and per block of the family's updates relative to `reference` (default pairs:
        the study's among the variants fine-tuned from it; `overlap.weight_overlap`, cached in the session's disk
        cache)."""
        with self._lock:
            return weight_overlap(self.family, reference, energies, pairs, progress=progress, cache=self.cache)

    # ------------------------------------------------------------------------------------------- one prompt
    def inspect(self, name: str, prompt: str, cfg: ProjectionConfig | None = None,
                max_new_tokens: int = 40) -> tuple[str, float]:
        """(greedy completion, refusal log-odds) of one prompt under a checkpoint, or under the point of variant
        `name` at `cfg`."""
        with self._lock:
            model = self.model(name) if cfg is None else self.projected(name, cfg)
            text = generate(model, self.tokenizer, [prompt], max_new_tokens=max_new_tokens,
                            chat=self.format).completions[0]
            return text, float(scoring.refusal_logodds(model, self.tokenizer, [prompt], self.openings,
                                                       chat=self.format)[0])
