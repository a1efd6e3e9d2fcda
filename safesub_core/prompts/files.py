"""Prompt sets from user files: TXT, CSV, JSON, JSONL and YAML seed files.

Contract: `load_file(path, column=None, field=None, name=None, kind="benign", reference=None)` reads TXT (one prompt
a line, blank lines skipped), CSV (`column`), JSON (a list of strings, or of objects with `field`), JSONL (one
string or object a line, `field`), and YAML seed files (``seeds[].value`` as pyrit writes them, or a list).
`reference` names the column/field holding reference answers, if any. Every problem is one SafesubError line.

CSV headers: the first row of a CSV file is always its header, and no prompt is ever silently taken for one. With
several columns the header names them (`column`, else the first usual name: prompt, text, value, question, ...;
else an error listing them, which shows the row taken as the header). With ONE column the header cannot always be
told from the data, so its first row is taken as the header only when it is a usual name (case and surrounding
spaces ignored) or the `column` asked for; any other first row is an error that quotes it and asks to name the
column (to take that row as the header) or to add a header row such as 'prompt' (a TXT file has no header at all).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import yaml

from safesub_core.errors import SafesubError
from safesub_core.paths import read_utf8
from safesub_core.prompts.sets import PromptSet

_FIELD_GUESSES = ("prompt", "text", "value", "question", "instruction", "goal", "behavior", "behaviour", "query")
EXTENSIONS = (".txt", ".csv", ".json", ".jsonl", ".yaml", ".yml", ".prompt")


def _read_text(path: Path) -> str:
    if not path.exists():
        raise SafesubError(f"{path}: file not found")
    if path.is_dir():
        raise SafesubError(f"{path}: is a folder, not a prompt file")
    return read_utf8(path, str(path), "utf-8-sig")


def _scalar(value, path: Path, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise SafesubError(f"{path}: {where} is a {type(value).__name__}, not text")


def _pick_field(rows: list, field: str | None, path: Path, what: str = "field") -> str | None:
    """The field to read from a list of objects: `field`, or a usual name; None for a list of strings."""
    if all(isinstance(r, str) for r in rows):
        if field is not None:
            raise SafesubError(f"{path}: holds plain strings, so there is no {what} {field!r}")
        return None
    keys: list[str] = []
    for r in rows:
        if not isinstance(r, dict):
            raise SafesubError(f"{path}: mixes objects with {type(r).__name__} values")
        keys += [k for k in r if k not in keys]
    if field is None:
        guess = next((g for g in _FIELD_GUESSES if all(g in r for r in rows)), None)
        if guess is None:
            raise SafesubError(f"{path}: choose a {what}; available: {', '.join(map(str, keys)) or 'none'}")
        return guess
    missing = [i for i, r in enumerate(rows) if field not in r]
    if len(missing) == len(rows):
        raise SafesubError(f"{path}: no {what} {field!r}; available: {', '.join(map(str, keys)) or 'none'}")
    if missing:
        raise SafesubError(f"{path}: {what} {field!r} is missing in row {missing[0] + 1}")
    return field


def _rows_to_lists(rows: list, field: str | None, reference: str | None, path: Path):
    if not rows:
        return [], None
    key = _pick_field(rows, field, path)
    prompts, refs = [], ([] if reference is not None else None)
    if reference is not None and key is None:
        raise SafesubError(f"{path}: holds plain strings, so there is no reference field {reference!r}")
    if reference is not None:
        _pick_field(rows, reference, path)
    for i, r in enumerate(rows):
        text = _scalar(r if key is None else r[key], path, f"row {i + 1}")
        if not text.strip():
            continue
        prompts.append(text.strip())
        if refs is not None:
            refs.append(_scalar(r[reference], path, f"row {i + 1} reference").strip())
    return prompts, refs


def _load_txt(text: str):
    return [ln.strip() for ln in text.splitlines() if ln.strip()], None


def _load_csv(text: str, column: str | None, reference: str | None, path: Path):
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise SafesubError(f"{path}: malformed CSV ({str(err).strip().splitlines()[0]})") from None
    cols = [str(c) for c in df.columns]
    if column is None:
        if len(cols) == 1:
            column = _one_column_header(cols[0], path)
        else:
            column = next((g for g in _FIELD_GUESSES if g in cols), None)
            if column is None:
                raise SafesubError(f"{path}: choose a column; available: {', '.join(cols)}")
    for c in [column] + ([reference] if reference is not None else []):
        if c not in cols:
            raise SafesubError(f"{path}: no column {c!r}; available: {', '.join(cols)}")
    prompts, refs = [], ([] if reference is not None else None)
    for i in range(len(df)):
        p = str(df[column].iloc[i]).strip()
        if not p:
            continue
        prompts.append(p)
        if refs is not None:
            refs.append(str(df[reference].iloc[i]).strip())
    return prompts, refs


def _one_column_header(first: str, path: Path) -> str:
    """The header of a one-column CSV whose column was not named: its first row, when that is a usual name."""
    if first.strip().lower() in _FIELD_GUESSES:
        return first
    shown = first if len(first) <= 60 else first[:57] + "..."
    raise SafesubError(
        f"{path}: one column, whose first row {shown!r} may be a header or a prompt: name the column to take that "
        f"row as the header, or add a header row such as 'prompt' (or use a .txt file, one prompt a line)"
    )


def _load_json(text: str, field: str | None, reference: str | None, path: Path):
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise SafesubError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno} ({err.msg})") from None
    if isinstance(doc, dict) and isinstance(doc.get("seeds"), list):
        return _load_seeds(doc, field, reference, path)
    if not isinstance(doc, list):
        keys = ", ".join(doc) if isinstance(doc, dict) else ""
        raise SafesubError(
            f"{path}: expected a JSON list of strings or objects, found a {type(doc).__name__}"
            + (f" with keys {keys}" if keys else "")
        )
    return _rows_to_lists(doc, field, reference, path)


def _load_jsonl(text: str, field: str | None, reference: str | None, path: Path):
    rows = []
    for lineno, ln in enumerate(text.splitlines(), start=1):
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError as err:
            raise SafesubError(f"{path}: malformed JSON at line {lineno}, column {err.colno} ({err.msg})") from None
    return _rows_to_lists(rows, field, reference, path)


def _load_seeds(doc, field: str | None, reference: str | None, path: Path):
    if isinstance(doc, list):
        return _rows_to_lists(doc, field, reference, path)
    if not isinstance(doc, dict) or "seeds" not in doc:
        keys = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise SafesubError(f"{path}: expected a seed file with a 'seeds' list (found {keys})")
    seeds = doc["seeds"]
    if not isinstance(seeds, list):
        raise SafesubError(f"{path}: 'seeds' is a {type(seeds).__name__}, not a list")
    return _rows_to_lists(seeds, field if field is not None else ("value" if seeds and
                                                                   all(isinstance(s, dict) for s in seeds)
                                                                   else None), reference, path)


def _load_yaml(text: str, field: str | None, reference: str | None, path: Path):
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SafesubError(f"{path}: malformed YAML{where} ({problem})") from None
    if doc is None:
        return [], None
    return _load_seeds(doc, field, reference, path)


def load_file(
    path,
    column: str | None = None,
    field: str | None = None,
    name: str | None = None,
    kind: str = "benign",
    reference: str | None = None,
) -> PromptSet:
    """A prompt set from a user file (TXT, CSV, JSON, JSONL, YAML seeds); see the module docstring.

    `column` (CSV) and `field` (JSON/JSONL/YAML) may be left out when the file has one column or a usual field
    name (prompt, text, value, question, ...). `reference` names the column or field of reference answers.
    """
    path = Path(path).expanduser()
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise SafesubError(
            f"{path}: unknown prompt file type {ext or '(no extension)'!r} (expected {', '.join(EXTENSIONS)})"
        )
    text = _read_text(path)
    if ext == ".txt" and reference is not None:
        raise SafesubError(f"{path}: a TXT file has no reference column; use CSV, JSON or JSONL")
    if not text.strip():  # an empty file of any type holds no prompts
        prompts, refs = [], None
    elif ext == ".txt":
        prompts, refs = _load_txt(text)
    elif ext == ".csv":
        prompts, refs = _load_csv(text, column if column is not None else field, reference, path)
    elif ext == ".json":
        prompts, refs = _load_json(text, field if field is not None else column, reference, path)
    elif ext == ".jsonl":
        prompts, refs = _load_jsonl(text, field if field is not None else column, reference, path)
    else:
        prompts, refs = _load_yaml(text, field if field is not None else column, reference, path)
    set_name = name or path.stem
    if not prompts:
        raise SafesubError(f"prompt set {set_name!r}: is empty ({path} holds no prompts)")
    return PromptSet(set_name, tuple(prompts), None if refs is None else tuple(refs), kind, f"file {path}")
