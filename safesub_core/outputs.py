"""Where the command line writes: never over one of its inputs, never half a file.

Contract: `guard_outputs(args)` runs for every verb before any work and refuses (one line, status 2, nothing
written, no input touched) an output path that is an input of the command (the family file, a path it names, any
checkpoint of the family or a file inside one, the folder of a built-in family, a prompt file, a judge model
folder, the study's tables), another output of the same command (`--out` equal to `--summary` or `--map`, after
resolving links and relative paths), or an existing path of the wrong kind (for a file: a folder, a FIFO, a device
such as /dev/null, a socket; for a folder: anything but a folder). Absent paths and regular files are fine.
`write_csv` writes one table atomically (a temporary file, then a rename); `write_all` writes several and removes
those already written when one fails.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pandas as pd
import yaml

from safesub_core import demo, findings, settings
from safesub_core.errors import SafesubError
from safesub_core.family import PATHS_PREFIX, Family, resolve_family


def check_output(path: str | os.PathLike, what: str = "output file") -> Path:
    """Refuse an output file path that cannot be a regular file: an existing folder, FIFO, device or socket, or a
    path under a file."""
    path = Path(path)
    problem = kind_problem(path, "file")
    if problem:
        raise SafesubError(f"{what} {path}: {problem}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise SafesubError(f"{what} {path}: {parent} is a file, not a folder")
    return path


def kind_problem(path: Path, kind: str) -> str | None:
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
    if getattr(args, "judge_path", None):  # score, sweep, findings
        ins.append((Path(args.judge_path).expanduser(), "the judge model folder of this command (--judge-path)", True))
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
            outs.append(("summary file", summary_path(args), "file"))
        ins += _prompt_inputs(args, "--prompts")
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
        elif problem := kind_problem(path, kind):
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


def summary_path(args) -> Path:
    """The summary CSV of `score`: --summary, else <out>.summary.csv."""
    return Path(args.summary) if args.summary else Path(args.out).with_suffix(".summary.csv")
