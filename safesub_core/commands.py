"""The command line's verbs: each `cmd_<verb>(args)` reads its parsed options (safesub_core/cli.py), does the
work through the library and writes its outputs through `outputs.write_all` once everything is computed.

Contract: a command opens its family once (`_family`, after the output guard opened it; the checkpoints' files are
hashed first where their hash is not stored), reads its evaluation sets (`_sets`: the family file's `eval_sets`,
then --harmful/--utility/--benign/--edgy and --convention, then the defaults; `EvalSets.for_family`) before any
model loads, draws tqdm progress bars on stderr (`_bar`, closed before an error
line by `close_bars`), prints warnings beside a result as `warning:` lines, and raises SafesubError for bad input.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from safesub_core import demo, findings, scoring
from safesub_core.cache import DiskCache
from safesub_core.fingerprints import fingerprint_all
from safesub_core.compute import live_prompts, resolve_compute
from safesub_core.errors import SafesubError
from safesub_core.family import Family, resolve_family
from safesub_core.linalg import check_energy
from safesub_core.outputs import summary_path, write_all
from safesub_core.overlap import overlap_summary, overlap_warnings, weight_overlap
from safesub_core.placement import Placement
from safesub_core.prompts import ROLES, EvalSets, PromptSet, SetSpec, catalogue, resolve, split_of
from safesub_core.session import FamilySession
from safesub_core.projection import ProjectionConfig
from safesub_core.sweeps import grid, sweep


def load_family(spec: str):
    """A family by name or file (`family.resolve_family`), building 'tiny' on first use with a progress bar."""
    return resolve_family(spec, progress=_bar(f"building the {spec} family"))


def _opened(args) -> Family:
    """The command's family: the one the output guard opened already, else `load_family` (nothing hashed)."""
    if getattr(args, "opened_family", None) is None:
        args.opened_family = load_family(args.family)
    return args.opened_family


def _family(args) -> Family:
    """The command's family (`_opened`), its checkpoints' files hashed once per command (with a bar where a hash is
    not stored yet)."""
    _opened(args)
    if not getattr(args, "hashed", False):
        fingerprint_all(args.opened_family, progress=_bar("hashing the checkpoints' files (once: stored)"))
        args.hashed = True
    return args.opened_family


def _bar(desc: str):
    """A progress callback (done, total, *what) drawing a tqdm bar, created on the first call."""
    bar = None

    def update(done, total, *what):
        nonlocal bar
        bar = bar or tqdm(desc=desc, total=total, leave=False, file=sys.stderr)
        bar.total, bar.n = total, done
        bar.refresh()

    return update


def set_overrides(args) -> dict[str, str]:
    """The evaluation sets named on the command line: role -> spec (--harmful, --utility, --benign, --edgy)."""
    return {r: getattr(args, r) for r in ROLES if getattr(args, r, None)}


def _sets(args, convention: str | None = None) -> EvalSets:
    """The command's evaluation sets (see the module docstring), each cut to --n-prompts when given; read before any
    model loads (bad input: one line)."""
    sets = EvalSets.for_family(_opened(args), set_overrides(args),
                               convention=convention or getattr(args, "convention", None))
    return sets.head(args.n_prompts) if getattr(args, "n_prompts", None) else sets


def _guard_set_files(args) -> None:
    """No output of the command is a prompt file one of its set specs names (the output guard sees plain paths only;
    a spec's file is its source): one line "<option> <path>: is the prompt file of this command (<flag>)"."""
    specs = [(f"--{r}", t) for r, t in set_overrides(args).items()]
    if getattr(args, "command", None) == "score":
        specs.append(("--prompts" if args.prompts is not None else "SPEC", args.set or args.prompts or ""))
    files = []
    for flag, text in specs:
        try:
            spec = SetSpec.parse(text, flag)
        except SafesubError:
            continue  # reported when the set is read
        if spec.file():
            files.append((flag, Path(spec.source).expanduser().resolve()))
    outs = [("--out file", getattr(args, "out", None))]
    if getattr(args, "command", None) == "score":
        outs.append(("summary file", summary_path(args)))
    for label, out in outs:
        if out is None:
            continue
        for flag, src in files:
            if Path(out).expanduser().resolve() == src:
                raise SafesubError(f"{label} {out}: is the prompt file of this command ({flag})")


def _session(args, sets: EvalSets | None = None):
    placement = Placement.parse(args.device_map, args.max_memory)  # a bad map: one line before any model loads
    device, dtype = resolve_compute(placement.main_device if placement else args.device, args.dtype)
    sets = sets or _sets(args)
    family = _family(args)
    return FamilySession(family, device=device, dtype=dtype, sets=sets, chat=not args.raw,
                         batch=live_prompts(family, device), placement=placement)


def _first(prompt_set: PromptSet, args) -> PromptSet:
    """A prompt set the command reads, cut to --n-prompts when given."""
    return prompt_set.head(args.n_prompts) if args.n_prompts else prompt_set


# ---------------------------------------------------------------------------------------------- commands


def cmd_sweep(args) -> None:
    grid(args.subspace, args.mode, args.fracs, args.alpha)  # bad settings fail before any model loads
    _guard_set_files(args)
    sets = _sets(args)  # bad evaluation sets too (checked even when no score uses them)
    judge = _judge(args)  # a judge that cannot run: one line before any model loads
    if judge is not None and args.scores != "generate":
        raise SafesubError(f"sweep --judge {args.judge}: judges read completions, so it needs --scores generate")
    target = _session(args, sets) if args.scores != "none" else _family(args)
    table = sweep(target, args.variant, args.subspace, args.mode, args.fracs, alpha=args.alpha, scores=args.scores,
                  progress=_bar("sweep"), seeds=args.seeds, judge=judge)
    _warn(table.attrs["warnings"])
    write_all([(table, args.out)])


def _warn(lines) -> None:
    """Warnings beside a result (it is still written): one `warning:` line each on stderr."""
    close_bars()
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def _pairs(specs: list[str] | None) -> list[tuple[str, str]] | None:
    if not specs:
        return None
    out = []
    for p in specs:
        x, sep, y = p.partition(":")
        if not sep or not x.strip() or not y.strip() or ":" in y:
            raise SafesubError(f"pair {p!r}: expected two checkpoint names as x:y (e.g. harmful:useful)")
        out.append((x.strip(), y.strip()))
    return out


def cmd_overlap(args) -> None:
    pairs = _pairs(args.pairs)
    for e in args.energies:
        check_energy(e)
    family = _family(args)
    for name in list(args.reference) + [x for p in pairs or [] for x in p]:
        family.checkpoint(name)
    tables = []
    for reference in args.reference:
        kw = dict(pairs=pairs) if pairs else {}
        tables.append(weight_overlap(family, reference, args.energies, progress=_bar(f"overlap vs {reference}"), **kw))
    table = pd.concat(tables, ignore_index=True)
    _warn(overlap_warnings(table))
    write_all([(table, args.out), (overlap_summary(table) if args.summary else None, args.summary)])


def _judge(args):
    if args.judge == "off":
        return None
    judge = scoring.Judge(kind=args.judge, path=args.judge_path)
    judge.check()
    return judge


_KIND_ROLES = {"harmful": "harmful", "math": "utility", "benign": "benign", "edgy": "edgy"}


def scored_set(args) -> tuple[PromptSet, SetSpec]:
    """The set `score` scores: SPEC or --prompts (one of them; default builtin-harmful:eval) in the set-spec grammar.
    Its role is --kind's, else utility when it names a reference field or a convention, else benign (a named set
    keeps its own kind)."""
    if args.set is not None and args.prompts is not None:
        raise SafesubError(f"score: give the set once (SPEC {args.set!r} or --prompts {args.prompts!r})")
    text = args.set if args.set is not None else args.prompts or "builtin-harmful:eval"
    where = "--prompts" if args.prompts is not None else "prompt set"
    spec = SetSpec.parse(text, where)
    role = _KIND_ROLES.get(args.kind) or ("utility" if spec.reference or spec.convention else "benign")
    return _first(spec.load(role, None, False, where), args), spec


def cmd_score(args) -> None:
    cfg = None
    if args.subspace:
        cfg = ProjectionConfig(args.subspace, args.mode, args.frac, alpha=args.alpha)
    _guard_set_files(args)
    prompt_set, spec = scored_set(args)  # bad prompts, sets, point, judge: before models load
    convention = args.convention or spec.convention
    sets = _sets(args, convention)
    judge = _judge(args)
    session = _session(args, sets)
    session.family.checkpoint(args.model)
    per_prompt, summary = session.score_set(args.model, prompt_set, cfg, max_new_tokens=args.max_new_tokens,
                                            judge=judge, progress=_bar(f"scoring {prompt_set.name}"))
    point = {} if cfg is None else cfg.__dict__
    which = {"convention": sets.convention} if prompt_set.kind == "math" else {}  # which exact match a number used
    summary = {"model": args.model, "set": prompt_set.name} | point | which | {
        k: v for k, v in summary.items() if not isinstance(v, list)}
    write_all([(per_prompt, args.out), (pd.DataFrame([summary]), summary_path(args))])


def cmd_activations(args) -> None:
    for e in args.energies:
        check_energy(e)
    sx, sy = _first(resolve(args.set_x), args), _first(resolve(args.set_y), args)
    session = _session(args)
    for name in [args.model_x, args.model_y] + (args.models if args.map else []):
        session.family.checkpoint(name)
    table = session.activation_overlap(args.model_x, sx, args.model_y, sy, args.energies, center=args.center)
    band = session.band_mean(table)
    coords = None
    if args.map:
        coords = session.activation_map(args.models, [sx, sy], layer=args.layer, method=args.method)
    write_all([(table, args.out), (coords, args.map)])  # all computed first: a failure leaves no file
    print(band.title)
    print(band.table.to_string(index=False))


def cmd_export(args) -> None:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SafesubError(f"export folder {out}: exists and is not empty")
    cfg = ProjectionConfig(args.subspace, args.mode, args.frac, alpha=args.alpha)
    session = _session(args)
    session.family.check_variant(args.variant)
    _export_into(out, lambda tmp: session.export(args.variant, cfg, tmp))
    print(out)


def _export_into(out: Path, write: Callable[[Path], None]) -> None:
    """`write(folder)` into a temporary folder then renamed to `out` (empty or absent): nothing half-written."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise SafesubError(f"export folder {out}: cannot be written ({err.strerror or type(err).__name__})"
                               ) from None
        raise


def cmd_cache(args) -> None:
    cache = DiskCache()
    if args.action == "info":
        info = cache.info()
        print(f"cache folder: {cache.root}")
        print(info.to_string(index=False) if len(info) else "(empty)")
    else:
        print(f"removed {cache.clear(args.namespace)} entries from {cache.root}")


def cmd_build(args) -> None:
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # `kill` cleans up like Ctrl-C: no temporary folder is left behind
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t0 = time.time()
    try:
        path = demo.build(args.family, args.out, size=args.size, seed=args.seed,
                          progress=_bar(f"building the {args.family} family"), log=tqdm.write)
    except KeyboardInterrupt:
        kept = "finished stages are kept (rerun to resume)" if args.family == "smol" else "nothing was kept (rerun)"
        raise KeyboardInterrupt(f"{args.family} family: build interrupted; {kept}") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    close_bars()
    print(f"built {path} in {time.time() - t0:.1f} s (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(demo.summary(path))


def cmd_findings(args) -> None:
    for flag in ("families", "modes", "variants", "gen_modes", "power_modes", "power_matches"):  # never empty
        text = getattr(args, flag)
        if text is not None and not findings.parse_list(text):
            raise SafesubError(f"findings: argument --{flag.replace('_', '-')}: expected comma-separated names, "
                               f"got {text!r}")
    families = findings.parse_list(args.families)
    configs = findings.family_configs(
        families, findings.parse_per_family(args.n_prompts), findings.parse_rhos(args.rhos),
        findings.parse_rhos_for(args.rhos_for), findings.runner.parse_for(args.for_family),
        modes=findings.parse_list(args.modes),
        variants=findings.parse_list(args.variants), gen_modes=findings.parse_list(args.gen_modes),
        gen_tokens=args.gen_tokens, sets=args.sets, judge=_judge(args), n_seeds=args.seeds,
        power_modes=findings.parse_list(args.power_modes), power_matches=findings.parse_list(args.power_matches),
        study_prompts=args.study_prompts, live_waves=args.live_waves,
        study_chat=args.study_chat, n_boot=args.n_boot, n_perm=args.n_perm)
    for cfg in configs.values():  # the settings checked here, in one line, before any family is opened
        findings.experiments.study_config(cfg), findings.experiments.power_config(cfg)
    hf_logging.disable_progress_bar()
    bars: dict = {}

    def progress(family, done, total, what):
        bars.setdefault(family, _bar(family))(done, total, f"{family}: {what}")

    chosen = set_overrides(args)
    if chosen:  # read once here, so a bad set is one line before any family is opened
        EvalSets.from_specs(chosen, convention=args.convention)
    if getattr(args, "only", None) == "hypotheses":
        _findings_hypotheses(args, families, configs, chosen, progress)
        return
    extra = ({"sets": chosen} if chosen else {}) | ({"convention": args.convention} if args.convention else {})
    out = findings.run(families, configs, args.out, None if args.no_figures else args.figures, args.study,
                       args.plotlyjs, command="safesub " + " ".join(args.argv), progress=progress, log=print,
                       jobs=args.jobs, **extra)
    close_bars()
    print(f"wrote {out}")


def _findings_hypotheses(args, families, configs, chosen, progress) -> None:
    """`findings --only hypotheses`: the section "Beyond the study: competing hypotheses" alone, written into --out
    between its markers (the rest of the report kept)."""
    from safesub_core.findings import hypotheses as H
    from safesub_core.hypotheses import TradeoffGrid

    hconfigs = {f: H.HypothesesConfig(variant=args.hypotheses_variant, n_prompts=configs[f].n_prompts,
                                      grid=TradeoffGrid(seeds=tuple(range(args.hypotheses_seeds))), sets=args.sets,
                                      set_overrides=chosen or None, convention=args.convention)
                for f in families}
    out = H.run_section(families, hconfigs, args.out, None if args.no_figures else args.figures, args.plotlyjs,
                        command="safesub " + " ".join(args.argv), progress=progress, log=print)
    close_bars()
    print(f"wrote {out}")


def _guard_folder(args, path: Path, label: str) -> None:
    """An output folder of `hypotheses` (the output guard sees --out files only): not an existing non-folder, and
    neither a checkpoint, the family file nor anything inside or above one (one line)."""
    from safesub_core.outputs import kind_problem

    problem = kind_problem(path, "folder")
    if problem:
        raise SafesubError(f"{label} {path}: {problem}")
    family = _opened(args)
    real = path.expanduser().resolve()
    inputs = [(ck.path, f"checkpoint {name!r} of the family") for name, ck in family.checkpoints().items()]
    if family.root is not None:
        inputs.append((Path(family.root), "the family's folder"))
    for where, what in inputs:
        where = Path(where).expanduser().resolve()
        if real == where or where in real.parents or real in where.parents:
            raise SafesubError(f"{label} {path}: is (or holds, or lies in) {what}, an input of this command")


def cmd_hypotheses(args) -> None:
    """The refusal direction, SafeLoRA, the bridge and the trade-off on one variant (findings/hypotheses.py)."""
    from safesub_core.findings import hypotheses as H
    from safesub_core.findings import hypotheses_figures as HF
    from safesub_core.hypotheses import MethodPoint, TradeoffGrid

    defaults = TradeoffGrid()
    grid = TradeoffGrid(ranks=tuple(args.ranks or defaults.ranks), taus=tuple(args.taus or defaults.taus),
                        strengths=tuple(args.strengths or defaults.strengths), alphas=tuple(args.alphas or ()),
                        seeds=tuple(range(args.seeds)), mode=args.mode)
    grid.points()  # bad knobs (a rank fraction outside (0, 1], tau outside [0, 1]): one line before any model loads
    H.finite_tolerance(args.tolerance)
    export = None
    if args.export_method is not None or args.value is not None or args.export_dir is not None:
        if args.export_method is None or args.value is None or args.export_dir is None:
            raise SafesubError("hypotheses: --export-method, --value and --export-dir go together (give all three)")
        export = MethodPoint(args.export_method, args.value)
        edir = Path(args.export_dir)
        if edir.exists() and (not edir.is_dir() or any(edir.iterdir())):
            raise SafesubError(f"export folder {edir}: exists and is not empty")
    _guard_set_files(args)
    sets = _sets(args)
    family = _opened(args)
    family.check_variant(args.variant)
    out = Path(args.out_dir or f"hypotheses-{family.name}-{args.variant}")
    _guard_folder(args, out, "--out folder")
    if export is not None:
        _guard_folder(args, Path(args.export_dir), "--export-dir folder")
        if Path(args.export_dir).expanduser().resolve() == out.expanduser().resolve():
            raise SafesubError(f"--export-dir folder {args.export_dir}: is the --out folder")
    session = _session(args, sets)
    bars: dict = {}

    def progress(stage, done, total):
        bars.setdefault(stage, _bar(stage))(done, total)

    r = H.compute(session, args.variant, grid, waves=args.waves, utility=args.utility_score,
                  tolerance=args.tolerance, progress=progress)
    matched = r.matched.copy()
    if len(matched):
        matched["utility_vs_floor"] = [H.floor_status(x) for _, x in matched.iterrows()]
    fig = HF.tradeoff_figure(r.tradeoff, HF.figure_title(r))
    close_bars()
    out.mkdir(parents=True, exist_ok=True)
    tables = [(r.selection, out / "selection.csv"), (r.safelora, out / "safelora.csv"), (r.bridge, out / "bridge.csv"),
              (r.shift, out / "shift.csv"), (r.tradeoff, out / "tradeoff.csv"), (matched, out / "matched.csv")]
    write_all(tables)
    print(HF.write_html(fig, out / "tradeoff.html", f"safesub: {r.name} hypotheses ({r.variant})", "inline"))
    if export is not None:
        _export_into(Path(args.export_dir), lambda tmp: session.export_method(args.variant, export, tmp))
    print(H.summary_text(r))




def cmd_prompts(args) -> None:
    """Print the named sets (or the sets given as specs), then a family's evaluation sets by role."""
    tables = []
    if args.specs:
        rows = []
        for text in args.specs:
            spec = SetSpec.parse(text, text)
            role = "utility" if spec.reference or spec.convention else "benign"
            ps = spec.load(role, None, False, text)
            parts = [split_of(p) for p in ps]
            rows.append(dict(spec=text, name=ps.name, kind=ps.kind, size=len(ps), train=parts.count("train"),
                             eval=parts.count("eval"), **{"prompt field": spec.prompt or "",
                             "reference field": spec.reference or ""}, source=ps.source))
        tables.append(("Sets", pd.DataFrame(rows)))
    elif args.family is None and not set_overrides(args):
        tables.append(("Named sets (a ':train' or ':eval' suffix picks the fixed split)", catalogue()))
    if args.family is not None:
        tables.append((f"Evaluation sets of the family {_opened(args).name!r}", _sets(args).describe()))
    elif set_overrides(args) or args.convention:
        sets = EvalSets.from_specs(set_overrides(args), convention=args.convention)
        tables.append(("Evaluation sets", (sets.head(args.n_prompts) if args.n_prompts else sets).describe()))
    for i, (title, table) in enumerate(tables):
        if args.csv:
            print(table.to_csv(index=False), end="")
        else:
            print(("\n" if i else "") + title)
            print(table.to_string(index=False))


def close_bars() -> None:
    """Close the progress bars an error left open now, so their clean-up never lands after the error line."""
    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        with contextlib.suppress(Exception):
            bar.close()
    if bars:
        print(file=sys.stderr)  # the error line starts on a line of its own
