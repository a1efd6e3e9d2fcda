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
With `confined`, a family file and every entered path must resolve inside the allowed roots (`paths.confine`); the
built-in families are trusted (the person who started safesub built them) and never confined.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from safesub_core import demo, settings
from safesub_core.checkpoints import Checkpoint, TensorReader
from safesub_core.errors import SafesubError
from safesub_core.paths import confine

ROLES = ("base", "aligned", "safety_tuned")
PATHS_PREFIX = "paths:"
_BUILD_LOCK = threading.Lock()  # one build of the tiny family at a time in this process (the app's sessions)


@dataclass
class Family:
    """A base, an aligned model, an optional safety-tuned model, and fine-tuned variants of `start`."""

    name: str
    base: Checkpoint
    aligned: Checkpoint
    variants: dict[str, Checkpoint]
    safety_tuned: Checkpoint | None = None
    start: str = "aligned"
    root: Path | None = None
    card: str = ""
    behaviour: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.start not in ("aligned", "safety_tuned"):
            raise SafesubError(f"family '{self.name}': start must be 'aligned' or 'safety_tuned', not {self.start!r}")
        if self.start == "safety_tuned" and self.safety_tuned is None:
            raise SafesubError(f"family '{self.name}': start is safety_tuned but no safety_tuned checkpoint is given")
        clash = set(self.variants) & set(ROLES)
        if clash:
            raise SafesubError(f"family '{self.name}': variant name {sorted(clash)[0]!r} is reserved for a role")

    @classmethod
    def from_file(cls, path: str | os.PathLike, allow_pickle: bool = False, confined: bool = False) -> "Family":
        """Read a family file (YAML or JSON); relative checkpoint paths are relative to the file.

        With `confined`, the file and every checkpoint must resolve inside the allowed roots (safesub_core.paths).
        """
        p = confine(path, "family file") if confined else Path(path).expanduser()
        if not p.is_file():
            raise SafesubError(f"family file {p}: does not exist")
        try:
            spec = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise SafesubError(f"family file {p}: is not valid YAML/JSON ({type(err).__name__})") from None
        if not isinstance(spec, dict):
            raise SafesubError(f"family file {p}: must be a mapping with base, aligned and variants")
        root = p.resolve().parent
        missing = [k for k in ("base", "aligned") if not spec.get(k)]
        if missing:
            raise SafesubError(f"family file {p}: missing required key {missing[0]!r}")

        def at(x):
            return root / x

        behaviour = {}
        if spec.get("behaviour") and at(spec["behaviour"]).is_file():
            behaviour = json.loads(at(spec["behaviour"]).read_text())
        card = at(spec["card"]).read_text() if spec.get("card") and at(spec["card"]).is_file() else ""
        return cls.from_paths(
            name=str(spec.get("name", p.stem)),
            base=at(spec["base"]),
            aligned=at(spec["aligned"]),
            safety_tuned=at(spec["safety_tuned"]) if spec.get("safety_tuned") else None,
            variants={k: at(v) for k, v in (spec.get("variants") or {}).items()},
            start=spec.get("start", "aligned"),
            allow_pickle=allow_pickle,
            confined=confined,
            root=root,
            card=card,
            behaviour=behaviour,
        )

    @classmethod
    def from_paths(cls, name, base, aligned, variants, safety_tuned=None, start="aligned", allow_pickle=False,
                   confined=False, **kw):
        """A family from paths; each is resolved and its kind detected (and confined to the roots if asked)."""

        def ck(role, path):
            return Checkpoint.resolve(role, confine(path, f"checkpoint '{role}'") if confined else path, allow_pickle)

        return cls(
            name=name,
            base=ck("base", base),
            aligned=ck("aligned", aligned),
            safety_tuned=ck("safety_tuned", safety_tuned) if safety_tuned else None,
            variants={k: ck(k, v) for k, v in variants.items()},
            start=start,
            **kw,
        )

    @property
    def start_checkpoint(self) -> Checkpoint:
        return self.safety_tuned if self.start == "safety_tuned" else self.aligned

    def checkpoints(self) -> dict[str, Checkpoint]:
        out = {"base": self.base, "aligned": self.aligned}
        if self.safety_tuned:
            out["safety_tuned"] = self.safety_tuned
        return out | self.variants

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


def paths_spec(base: str, aligned: str, safety_tuned: str | None, start: str, variants: dict[str, str]) -> str:
    """The "paths:{json}" spec of entered checkpoint paths (what `resolve_family` reads back)."""
    return PATHS_PREFIX + json.dumps(dict(base=base, aligned=aligned, safety_tuned=safety_tuned or None, start=start,
                                          variants=variants), sort_keys=True)


def _from_entered_paths(text: str, confined: bool) -> Family:
    """The family 'entered' from the JSON of a "paths:" spec."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        raise SafesubError("family paths: the link's family parameter is malformed") from None
    if not isinstance(d, dict):
        raise SafesubError("family paths: the link's family parameter is malformed")
    for role in ("base", "aligned"):
        if not d.get(role):
            raise SafesubError(f"checkpoint '{role}': no path given")
    if not d.get("variants") or not isinstance(d["variants"], dict):
        raise SafesubError("family: give at least one fine-tuned variant (name = path)")
    return Family.from_paths(name="entered", base=d["base"], aligned=d["aligned"], variants=d["variants"],
                             safety_tuned=d.get("safety_tuned"), start=d.get("start") or "aligned",
                             confined=confined)
