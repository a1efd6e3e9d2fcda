"""Model families: which checkpoints form one, read from a family file or given as paths, and THE resolver of a
family spec.

A family is a base W0, an aligned model WA, an optional safety-tuned WS and named fine-tuned variants W_FT,j of
its `start` model (WA or WS), described by a YAML/JSON family file (docs/ARCHITECTURE.md) or given as paths; each
checkpoint's kind (hf, lora, gguf) is detected by `checkpoints.Checkpoint.resolve`.

`resolve_family(spec, confined=False, progress=None)` is the one way a spec becomes a Family (the CLI, the notebook
API, the findings and the app all call it):
  "tiny"          the built-in demo family (docs/method.md, "Demo families"), built on first use;
  "smol"          the built-in smol family at size `settings.smol_size()`: it must have been built
                  (`safesub build smol`), else a one-line SafesubError says so;
  "paths:{json}"  checkpoint paths as the app's Family page enters them: {"base", "aligned", "safety_tuned",
                  "start", "variants": {name: path}};
  anything else   the path of a family file.
With `confined`, a family file and every path it names (checkpoints, card, behaviour), or every entered path, must
resolve inside the allowed roots (`paths.confine`); the built-in families are trusted (the person who started
safesub built them) and never confined.

A checkpoint (in a family file, an entered path, a "paths:" spec) may name a Hugging Face hub model instead,
`org/name` or `org/name@revision` (`hub.hub_name`): when no path of that name exists (beside the family
file for a family file's, from the working folder for an entered one; a path on disk always wins), it is the
model's snapshot folder in the local hub cache (`hub.hub_snapshot`: local files only, never the network;
absent, one line naming the model and the cache folder searched). Confinement: a hub snapshot is allowed outside
the allowed roots (the user named a model, not a path), but it and every file in it must resolve inside the hub
cache (`settings.hub_cache()`), so a link out of the cache is refused.

Validation happens at the boundary, before any checkpoint is opened (`check_family_file`, `check_entered_paths`):
a family file holds only the keys of FILE_KEYS (an unknown key is an error naming it and the nearest known key);
name is text; base and aligned are required non-empty paths (text), safety_tuned an optional one; start is
'aligned' or 'safety_tuned' (safety_tuned only when that checkpoint is given); variants is a required, non-empty
mapping name -> non-empty path whose names are not role names; safety_variants an optional mapping of the same
kind (variants fine-tuned from the safety-tuned model, which must then be given; names unlike every role's and
variant's); card and behaviour are optional paths of files
beside it (relative paths are relative to the family file), the card UTF-8 text, the behaviour a JSON object
(its "models", when present, a mapping of mappings; its "metrics" a mapping). An optional key given as null is
absent. Optional evaluation settings: eval_sets, a mapping role (harmful, utility, benign, edgy) -> a set spec
(`prompts.specs`: text in the spec grammar, or a mapping {set | path, prompt, reference, split, n, convention}; a
relative path is relative to the family file and confined like the checkpoints), checked for its syntax here and
read by `prompts.EvalSets.for_family` before any model loads; refusal_openings, a non-empty list of non-empty
texts (how a refusal opens, for the live refusal score); system_prompt, text (the system message of chat prompts).
They are the Family's attributes `eval_sets` (dict, role -> spec as given), `refusal_openings` (tuple or None) and
`system_prompt` (str or None); `file` is the family file's path and `confined` whether it was opened confined.
Entered paths ("paths:" JSON) are checked the same way against PATHS_KEYS (an empty safety_tuned, a blank form
field, is absent; so is a blank system_prompt). Every problem is ONE SafesubError line; from a family file it names
the file ("family file <path>: ..."), including the problems of the checkpoints it names.
"""
from __future__ import annotations

import difflib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from safesub_core import demo, settings
from safesub_core.checkpoints import Checkpoint, TensorReader
from safesub_core.errors import SafesubError
from safesub_core.hub import hub_name, hub_snapshot
from safesub_core.paths import confine, expanded, read_utf8, real_path
from safesub_core.prompts.specs import ROLES as SET_ROLES
from safesub_core.prompts.specs import SetSpec

ROLES = ("base", "aligned", "safety_tuned")
STARTS = ("aligned", "safety_tuned")
OPTIONAL_KEYS = ("eval_sets", "refusal_openings", "system_prompt")  # evaluation settings (docs/method.md)
FILE_KEYS = ("name", "base", "aligned", "safety_tuned", "start", "variants", "safety_variants", "card", "behaviour",
             *OPTIONAL_KEYS)
PATHS_KEYS = ("base", "aligned", "safety_tuned", "start", "variants", *OPTIONAL_KEYS)
PATHS_PREFIX = "paths:"
_BUILD_LOCK = threading.Lock()  # one build of the tiny family at a time in this process (the app's sessions)
_KINDS = {"list": "a list", "dict": "a mapping", "int": "a number", "float": "a number", "bool": "true/false",
          "NoneType": "empty", "str": "text", "date": "a date", "datetime": "a date", "bytes": "binary data"}


def _kind(value: Any) -> str:
    """How a value read from YAML/JSON is named in an error: its kind, and a short scalar shown as written."""
    kind = _KINDS.get(type(value).__name__, type(value).__name__)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        shown = repr(value)
        return f"{kind} ({shown if len(shown) <= 24 else shown[:21] + '...'})"
    return kind


def _unknown_key(key: Any, known: tuple[str, ...], where: str) -> SafesubError:
    near = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(known)}"
    shown = repr(key) if len(repr(key)) <= 40 else repr(key)[:37] + "..."
    return SafesubError(f"{where}: unknown key {shown} ({hint})")


def _path_text(value: Any, what: str, where: str) -> str:
    """A path given as text: not empty, no NUL character; else one SafesubError line."""
    if not isinstance(value, str):
        raise SafesubError(f"{where}: {what} must be a path (text), not {_kind(value)}")
    if not value.strip():
        raise SafesubError(f"{where}: {what} is an empty path")
    if "\x00" in value:
        raise SafesubError(f"{where}: {what} contains a NUL character")
    return value


def _check_start(who: str, start: str, has_safety: bool) -> None:
    """start names a role that is given (`who` opens the error line)."""
    if start not in STARTS:
        raise SafesubError(f"{who}: start must be 'aligned' or 'safety_tuned', not {start!r}")
    if start == "safety_tuned" and not has_safety:
        raise SafesubError(f"{who}: start is safety_tuned but no safety_tuned checkpoint is given")


def _check_variant_names(who: str, variants, safety_variants=()) -> None:
    """No variant takes a role's name, and no S-started variant a role's or a variant's."""
    clash = set(variants) & set(ROLES)
    if clash:
        raise SafesubError(f"{who}: variant name {sorted(clash)[0]!r} is reserved for a role")
    clash = set(safety_variants) & (set(ROLES) | set(variants))
    if clash:
        raise SafesubError(f"{who}: safety variant name {sorted(clash)[0]!r} is already a role's or a variant's")


def _check_variants(where: str, variants: Any, key: str = "variants") -> dict:
    """A family file's mapping of variant name -> path, checked (non-empty names and paths)."""
    what = "variant" if key == "variants" else "safety variant"
    if not isinstance(variants, dict):
        raise SafesubError(f"{where}: {key} must be a mapping of name: path, not {_kind(variants)}")
    if not variants:
        raise SafesubError(f"{where}: {key} is empty (give at least one fine-tuned {what}, name: path)")
    for v, path in variants.items():
        if not isinstance(v, str) or not v.strip():
            raise SafesubError(f"{where}: {what} name {v!r} must be non-empty text")
        if path is None:
            raise SafesubError(f"{where}: {what} {v!r} has no path (give name: path)")
        _path_text(path, f"{what} {v!r}", where)
    return dict(variants)


def check_options(spec: dict, where: str, blank_is_absent: bool = False) -> dict[str, Any]:
    """The optional evaluation settings of a family file or of entered paths (eval_sets, refusal_openings,
    system_prompt), checked: {eval_sets: dict, refusal_openings: tuple | None, system_prompt: str | None}."""
    sets = spec.get("eval_sets") or {}
    if not isinstance(sets, dict):
        raise SafesubError(f"{where}: eval_sets must be a mapping of role: set spec, not {_kind(sets)}")
    for role, value in sets.items():
        if role not in SET_ROLES:
            raise _unknown_key(role, SET_ROLES, f"{where}: eval_sets")
        if value is not None:
            SetSpec.parse(value, f"{where}: eval_sets.{role}")  # its syntax; the set is read by EvalSets.for_family
    openings = spec.get("refusal_openings")
    if openings is not None:
        if not isinstance(openings, list) or not openings:
            raise SafesubError(f"{where}: refusal_openings must be a non-empty list of texts, not {_kind(openings)}")
        for i, text in enumerate(openings):
            if not isinstance(text, str) or not text.strip():
                raise SafesubError(f"{where}: refusal_openings item {i + 1} must be non-empty text, not "
                                   f"{_kind(text) if not isinstance(text, str) else 'empty'}")
        openings = tuple(openings)
    system = spec.get("system_prompt")
    if system is not None:
        if not isinstance(system, str):
            raise SafesubError(f"{where}: system_prompt must be text, not {_kind(system)}")
        if not system.strip():
            if not blank_is_absent:
                raise SafesubError(f"{where}: system_prompt is empty (leave the key out for none)")
            system = None
    return dict(eval_sets={r: v for r, v in sets.items() if v is not None}, refusal_openings=openings,
                system_prompt=system)


def check_family_file(doc: Any, where: str, default_name: str) -> dict[str, Any]:
    """A parsed family file's content, checked (the module docstring lists the rules): name, base, aligned,
    safety_tuned, start, variants, card and behaviour as given (None when absent); or one SafesubError line
    opening with `where`."""
    if not isinstance(doc, dict):
        raise SafesubError(f"{where}: must be a mapping with base, aligned and variants, not {_kind(doc)}")
    for key in doc:
        if key not in FILE_KEYS:
            raise _unknown_key(key, FILE_KEYS, where)
    spec = {k: v for k, v in doc.items() if v is not None}  # an optional key given as null is absent
    name = spec.get("name", default_name)
    if not isinstance(name, str):
        raise SafesubError(f"{where}: name must be text, not {_kind(name)}")
    if not name.strip():
        raise SafesubError(f"{where}: name is empty")
    for key in ("base", "aligned"):
        if key not in spec:
            raise SafesubError(f"{where}: missing required key {key!r}")
    paths = {k: _path_text(spec[k], k, where) for k in ("base", "aligned", "safety_tuned", "card", "behaviour")
             if k in spec}
    start = spec.get("start", "aligned")
    if not isinstance(start, str):
        raise SafesubError(f"{where}: start must be 'aligned' or 'safety_tuned', not {_kind(start)}")
    who = f"{where}: family '{name}'"
    _check_start(who, start, "safety_tuned" in paths)
    if "variants" not in spec:
        raise SafesubError(f"{where}: missing required key 'variants' (the fine-tuned variants, name: path)")
    variants = _check_variants(where, spec["variants"])
    safety_variants = _check_variants(where, spec["safety_variants"], "safety_variants") \
        if "safety_variants" in spec else {}
    if safety_variants and "safety_tuned" not in paths:
        raise SafesubError(f"{where}: safety_variants are fine-tuned from the safety-tuned model, but no "
                           "safety_tuned checkpoint is given")
    _check_variant_names(who, variants, safety_variants)
    return dict(name=name, **{k: paths.get(k) for k in ("base", "aligned", "safety_tuned", "card", "behaviour")},
                start=start, variants=variants, safety_variants=safety_variants, **check_options(spec, where))


def check_entered_paths(doc: Any) -> dict[str, Any]:
    """The JSON of a "paths:" spec (entered on the Family page or carried by a link), checked: the arguments of
    `Family.from_paths` (name 'entered', base, aligned, safety_tuned or None, start, variants)."""
    where = "family paths"
    if not isinstance(doc, dict):
        raise SafesubError(f"{where}: the link's family parameter is malformed")
    for key in doc:
        if key not in PATHS_KEYS:
            raise _unknown_key(key, PATHS_KEYS, where)
    given = {role: doc.get(role) for role in ROLES if doc.get(role) not in (None, "")}  # a blank field: not given
    for role in ("base", "aligned"):
        if role not in given:
            raise SafesubError(f"checkpoint '{role}': no path given")
    paths = {k: _path_text(v, f"checkpoint {k!r}", where) for k, v in given.items()}
    start = doc.get("start") or "aligned"
    if not isinstance(start, str):
        raise SafesubError(f"{where}: start must be 'aligned' or 'safety_tuned', not {_kind(start)}")
    _check_start("family 'entered'", start, "safety_tuned" in paths)
    variants = doc.get("variants")
    if not variants or not isinstance(variants, dict):
        raise SafesubError("family: give at least one fine-tuned variant (name = path)")
    for v, path in variants.items():
        if not v.strip():
            raise SafesubError(f"{where}: a variant has an empty name (give name = path)")
        _path_text(path, f"variant {v!r}", where)
    _check_variant_names("family 'entered'", variants)
    options = {k: v for k, v in doc.items() if k in OPTIONAL_KEYS and v is not None}
    return dict(name="entered", base=paths["base"], aligned=paths["aligned"], safety_tuned=paths.get("safety_tuned"),
                start=start, variants=dict(variants), **check_options(options, where, blank_is_absent=True))


def _text_file(path: Path, label: str) -> str:
    """The UTF-8 text of the file at `path`, or one SafesubError line opening with `label`."""
    try:
        if not path.exists():
            raise SafesubError(f"{label}: does not exist")
        if not path.is_file():
            raise SafesubError(f"{label}: is not a file")
    except OSError as err:  # a name too long
        raise SafesubError(f"{label}: cannot be read ({err.strerror or err})") from None
    return read_utf8(path, label)


def _read_beside(root: Path, rel: str, what: str, where: str, confined: bool) -> str:
    """The text of the file `rel` (relative to `root`) a family file names, confined like its checkpoints."""
    label = f"{where}: {what}"
    return _text_file(confine(root / rel, label) if confined else real_path(root / rel, label), f"{label} {rel}")


def _behaviour(text: str, rel: str, where: str) -> dict:
    """A behaviour file's JSON object (what the Family page and the findings read from it), checked."""
    label = f"{where}: behaviour {rel}"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise SafesubError(f"{label}: is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except RecursionError:
        raise SafesubError(f"{label}: is not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise SafesubError(f"{label}: must be a JSON object, not {_kind(doc)}")
    models = doc.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise SafesubError(f"{label}: 'models' must map each model's name to its numbers")
    if not isinstance(doc.get("metrics", {}), dict):
        raise SafesubError(f"{label}: 'metrics' must map each metric's name to its description")
    return doc


class HubName(str):
    """A family file's checkpoint that names a hub model (no path of that name lies beside the file)."""


def _rooted(root: Path, text: str) -> Path | HubName:
    """A family file's checkpoint path, relative to the file's folder, or the hub model it names when no path of
    that name lies there (a path on disk always wins)."""
    path = root / text
    return HubName(text) if hub_name(text) and not _exists(path) else path


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long: not a path on disk
        return False


@dataclass
class Family:
    """A base, an aligned model, an optional safety-tuned model, and fine-tuned variants of `start`."""

    name: str
    base: Checkpoint
    aligned: Checkpoint
    variants: dict[str, Checkpoint]
    safety_tuned: Checkpoint | None = None
    start: str = "aligned"
    safety_variants: dict[str, Checkpoint] = field(default_factory=dict)  # fine-tuned from safety_tuned
    root: Path | None = None
    card: str = ""
    behaviour: dict = field(default_factory=dict)
    eval_sets: dict = field(default_factory=dict)  # role -> set spec as given (prompts.EvalSets.for_family reads it)
    refusal_openings: tuple[str, ...] | None = None
    system_prompt: str | None = None
    file: Path | None = None  # the family file, when read from one
    confined: bool = False  # opened confined: its eval-set paths are confined too

    def __post_init__(self):
        who = f"family '{self.name}'"
        _check_start(who, self.start, self.safety_tuned is not None)
        _check_variant_names(who, self.variants, self.safety_variants)
        if self.safety_variants and self.safety_tuned is None:
            raise SafesubError(f"{who}: has safety variants but no safety_tuned checkpoint")
        lora = [n for n, ck in self.safety_variants.items() if ck.kind == "lora"]
        if lora and self.start != "safety_tuned":
            raise SafesubError(f"{who}: safety variant {lora[0]!r} is a LoRA adapter, whose base would be the start "
                               "model (aligned); give it as a full checkpoint")

    @classmethod
    def from_file(cls, path: str | os.PathLike, allow_pickle: bool = False, confined: bool = False) -> "Family":
        """Read a family file (YAML or JSON; checked by `check_family_file`); relative paths are relative to it.

        With `confined`, the file and every path it names (checkpoints, card, behaviour) must resolve inside the
        allowed roots (safesub_core.paths). Every problem is one SafesubError line naming the file.
        """
        p = confine(path, "family file") if confined else expanded(path, "family file")
        where = f"family file {p}"
        text = _text_file(p, where)
        try:
            doc = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:  # ValueError: a date like 2024-13-01
            raise SafesubError(f"{where}: is not valid YAML/JSON ({type(err).__name__})") from None
        spec = check_family_file(doc, where, p.stem)
        root = p.resolve().parent
        card, behaviour = spec.pop("card"), spec.pop("behaviour")
        card = _read_beside(root, card, "card", where, confined) if card else ""
        behaviour = _behaviour(_read_beside(root, behaviour, "behaviour", where, confined), behaviour, where) \
            if behaviour else {}
        rooted = {role: _rooted(root, spec[role]) for role in ROLES if spec[role]}
        for key in ("variants", "safety_variants"):
            rooted[key] = {k: _rooted(root, v) for k, v in spec[key].items()}
        try:
            return cls.from_paths(**(spec | rooted), allow_pickle=allow_pickle, confined=confined, root=root, card=card,
                                  behaviour=behaviour, file=p)
        except SafesubError as err:  # a checkpoint's problem, said as the family file's
            raise SafesubError(f"{where}: {err}") from None

    @classmethod
    def from_paths(cls, name, base, aligned, variants, safety_tuned=None, start="aligned", allow_pickle=False,
                   confined=False, safety_variants=None, **kw):
        """A family from paths; each is resolved and its kind detected (and confined to the roots if asked)."""

        def ck(role, path):
            what = f"checkpoint '{role}'"
            if isinstance(path, HubName) or (hub_name(path) and not _exists(expanded(path, what))):
                path = hub_snapshot(role, path)  # a hub model, never confined (see the module docstring)
            else:
                path = confine(path, what) if confined else expanded(path, what)
            try:
                return Checkpoint.resolve(role, path, allow_pickle)
            except OSError as err:  # a name too long, a folder that cannot be listed
                raise SafesubError(f"{what}: {path} cannot be read ({err.strerror or err})") from None

        return cls(
            name=name,
            base=ck("base", base),
            aligned=ck("aligned", aligned),
            safety_tuned=ck("safety_tuned", safety_tuned) if safety_tuned else None,
            variants={k: ck(k, v) for k, v in variants.items()},
            safety_variants={k: ck(k, v) for k, v in (safety_variants or {}).items()},
            start=start,
            confined=confined,
            **kw,
        )

    @property
    def start_checkpoint(self) -> Checkpoint:
        return self.safety_tuned if self.start == "safety_tuned" else self.aligned

    def checkpoints(self) -> dict[str, Checkpoint]:
        out = {"base": self.base, "aligned": self.aligned}
        if self.safety_tuned:
            out["safety_tuned"] = self.safety_tuned
        return out | self.variants | self.safety_variants

    def parent(self, name: str) -> str | None:
        """The role `name` was fine-tuned from: base for aligned and safety_tuned, the start model for a variant,
        safety_tuned for a safety variant; None for base."""
        self.checkpoint(name)
        if name == "base":
            return None
        if name in ROLES:
            return "base"
        return "safety_tuned" if name in self.safety_variants else self.start

    def fine_tunes_of(self, reference: str) -> dict[str, str]:
        """{task: checkpoint} of the variants fine-tuned from `reference` (aligned or safety_tuned). A safety
        variant named <task>_s stands for <task> (the demo families' useful_s, harmful_s); others keep their name."""
        return {(n.removesuffix("_s") if n in self.safety_variants else n): n
                for n in [*self.variants, *self.safety_variants] if self.parent(n) == reference}

    def checkpoint(self, name: str) -> Checkpoint:
        try:
            return self.checkpoints()[name]
        except KeyError:
            raise SafesubError(
                f"family '{self.name}': has no checkpoint {name!r} (has {', '.join(self.checkpoints())})"
            ) from None

    def reader(self, name: str) -> TensorReader:
        ck = self.checkpoint(name)
        return TensorReader(ck, TensorReader(self.start_checkpoint) if ck.kind == "lora" else None)

    def check_variant(self, variant: str) -> str:
        """`variant` if it is one of the family's fine-tuned variants, else a one-line SafesubError listing them."""
        if variant not in self.variants:
            raise SafesubError(f"family '{self.name}': has no fine-tuned variant {variant!r} "
                               f"(has {', '.join(self.variants)})")
        return variant

    def update_readers(self, variant: str) -> tuple[TensorReader, TensorReader, TensorReader]:
        """(base, start, variant) readers, from which the alignment update (start - base) and the variant's task
        update (variant - start) are read; checked to hold the same tensors."""
        base, start, ft = self.reader("base"), self.reader(self.start), self.reader(self.check_variant(variant))
        start.check_compatible(base)
        start.check_compatible(ft)
        return base, start, ft

    def validate(self) -> None:
        """Every checkpoint has the same tensor names and shapes as the start model (one-line error otherwise)."""
        ref = self.reader(self.start)
        for name in self.checkpoints():
            if name != self.start:
                ref.check_compatible(self.reader(name))


def resolve_family(spec: str, *, confined: bool = False,
                   progress: Callable[[int, int, str], None] | None = None) -> Family:
    """The Family a spec names (see the module docstring); `progress(done, total, message)` follows a build of the
    tiny family. Every problem is a one-line SafesubError."""
    spec = str(spec).strip()
    if spec == "tiny":
        path = demo.family_file("tiny")
        if not path.is_file():
            with _BUILD_LOCK:
                if not path.is_file():
                    path = demo.build("tiny", progress=progress)
        return Family.from_file(path)
    if spec == "smol":
        path = demo.family_file("smol", settings.smol_size())
        if not path.is_file():
            raise SafesubError(f"family 'smol': not built yet ({path} is missing; build it on the app's Family page "
                               "or run `safesub build smol`)")
        return Family.from_file(path)
    if spec.startswith(PATHS_PREFIX):
        return _from_entered_paths(spec.removeprefix(PATHS_PREFIX), confined)
    return Family.from_file(spec, confined=confined)


def paths_spec(base: str, aligned: str, safety_tuned: str | None, start: str, variants: dict[str, str],
               eval_sets: dict | None = None, refusal_openings=None, system_prompt: str | None = None) -> str:
    """The "paths:{json}" spec of entered checkpoint paths and optional evaluation settings (what `resolve_family`
    reads back); settings not given are left out, so a spec without them reads as before."""
    doc = dict(base=base, aligned=aligned, safety_tuned=safety_tuned or None, start=start, variants=variants)
    options = dict(eval_sets={r: v for r, v in (eval_sets or {}).items() if v} or None,
                   refusal_openings=list(refusal_openings) if refusal_openings else None,
                   system_prompt=system_prompt if system_prompt and system_prompt.strip() else None)
    return PATHS_PREFIX + json.dumps(doc | {k: v for k, v in options.items() if v is not None}, sort_keys=True)


def _from_entered_paths(text: str, confined: bool) -> Family:
    """The family 'entered' from the JSON of a "paths:" spec (checked by `check_entered_paths`)."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise SafesubError("family paths: the link's family parameter is malformed") from None
    return Family.from_paths(**check_entered_paths(doc), confined=confined)
