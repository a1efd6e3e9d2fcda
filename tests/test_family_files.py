"""Issue 19: one validation layer for family files and entered paths, confined card and behaviour paths, zero
updates said out loud, one-column CSV headers that never eat a prompt, and a full disk met by safetensors.

Every broken input ends as ONE SafesubError line (from a family file: naming the file); a property-based test
(hypothesis) writes many family files (random keys, types, nesting, paths inside and outside the roots, missing
files) and paths specs, and checks that each is a valid Family or such a line, never another exception.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from factories import write_family
from safesub_core.cache import DiskCache
from safesub_core.cache import store as cache_mod
from safesub_core.demo.stages import family_yaml
from safesub_core.errors import SafesubError
from safesub_core.family import FILE_KEYS, Family, check_family_file, paths_spec, resolve_family
from safesub_core.overlap import overlap_summary, overlap_warnings, weight_overlap
from safesub_core.prompts import EvalSets
from safesub_core.prompts import load_file as load_prompts
from safesub_core.subspace import SubspaceEngine
from test_bad_inputs import assert_cache_clean, assert_one_line, files_under, run

SECRET = "OUTSIDE-THE-ROOTS"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """<tmp>/roots/fam: a small family (base, aligned, safety, useful, harmful) with a card and a behaviour file;
    <tmp>/outside: a checkpoint, a card and a behaviour file outside the roots; fam/escape links to outside/ck."""
    tmp = tmp_path_factory.mktemp("world")
    fam = tmp / "roots" / "fam"
    fam.mkdir(parents=True)
    write_family(fam, variants=("useful", "harmful"))
    (fam / "card.md").write_text("# the card\n")
    (fam / "behaviour.json").write_text(json.dumps({"models": {"aligned": {"refusal": 0.9}}, "metrics": {}}))
    (fam / "binary.md").write_bytes(b"\xff\xfe\x00card")
    (fam / "broken.json").write_text("{not json")
    (fam / "list.json").write_text("[1, 2]")
    (fam / "models_list.json").write_text('{"models": [1]}')
    (fam / "qa.jsonl").write_text('{"q": "What is 2 + 2?", "a": "4"}\n{"q": "What is 3 + 3?", "a": "6"}\n')
    out = tmp / "outside"
    shutil.copytree(fam / "aligned", out / "ck")
    (out / "card.md").write_text(SECRET)
    (out / "qa.jsonl").write_text(json.dumps({"q": SECRET, "a": "1"}) + "\n")
    (out / "behaviour.json").write_text(json.dumps({"models": {}, "metrics": {"secret": SECRET}}))
    (fam / "escape").symlink_to(out / "ck")
    (fam / "escape_card.md").symlink_to(out / "card.md")
    return tmp


def spec_of(**changes) -> dict:
    spec = dict(name="synthetic", base="base", aligned="aligned", safety_tuned="safety",
                variants={"useful": "useful", "harmful": "harmful"}, card="card.md", behaviour="behaviour.json")
    return {k: v for k, v in (spec | changes).items() if v is not ...}


def write_spec(world: Path, spec, name: str = "family.yaml", raw: bytes | None = None) -> Path:
    p = world / "roots" / "fam" / name
    p.write_bytes(raw if raw is not None else yaml.safe_dump(spec).encode())
    return p


def error_of(call) -> str:
    with pytest.raises(SafesubError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ the schema


def test_the_demo_family_files_keys_all_pass_the_schema():
    spec = check_family_file(yaml.safe_load(family_yaml("tiny")), "family file x", "x")
    assert set(yaml.safe_load(family_yaml("tiny"))) <= set(FILE_KEYS)
    assert spec == dict(name="tiny", base="base", aligned="aligned", safety_tuned="safety", start="aligned",
                        variants={v: v for v in ("useful", "harmful", "contaminated", "useful_lora",
                                                 "useful_seed1", "harmful_seed1")},
                        safety_variants={"useful_s": "useful_s", "harmful_s": "harmful_s"}, card="card.md", behaviour="behaviour.json", eval_sets={},
                        refusal_openings=("I'm sorry, but I can't help with that.",), system_prompt=None)
    smol = check_family_file(yaml.safe_load(family_yaml("smol")), "family file x", "x")
    assert smol["eval_sets"] == {"harmful": "harmbench:eval", "benign": "pairs-benign:eval",
                                 "edgy": "overrefusal:eval"}  # the held-out splits of what smol was trained on


def test_a_full_family_file_reads_its_card_and_behaviour(world):
    fam = Family.from_file(write_spec(world, spec_of()), confined=False)
    assert fam.card == "# the card\n" and fam.behaviour["models"]["aligned"] == {"refusal": 0.9}
    assert set(fam.variants) == {"useful", "harmful"} and fam.safety_tuned is not None
    # an optional key given as null is absent
    fam = Family.from_file(write_spec(world, spec_of(card=None, behaviour=None, safety_tuned=None, start=None)))
    assert fam.card == "" and fam.behaviour == {} and fam.safety_tuned is None and fam.start == "aligned"


def test_an_unknown_key_is_named_with_the_nearest_known_one(world):
    spec = spec_of()
    spec["varaints"] = spec.pop("variants")
    p = write_spec(world, spec)
    assert error_of(lambda: Family.from_file(p)) == (
        f"family file {p}: unknown key 'varaints' (did you mean 'variants'?)")
    p = write_spec(world, spec_of() | {"colour": "blue"})
    assert error_of(lambda: Family.from_file(p)) == (
        f"family file {p}: unknown key 'colour' (known keys: {', '.join(FILE_KEYS)})")


@pytest.mark.parametrize("changes, words", [
    (dict(variants=["useful", "harmful"]), "variants must be a mapping of name: path, not a list"),
    (dict(variants={}), "variants is empty"),
    (dict(variants=...), "missing required key 'variants'"),
    (dict(variants={"useful": None}), "variant 'useful' has no path"),
    (dict(variants={"useful": 3}), "variant 'useful' must be a path (text), not a number (3)"),
    (dict(variants={"useful": {"path": "useful"}}), "variant 'useful' must be a path (text), not a mapping"),
    (dict(variants={5: "useful"}), "variant name 5 must be non-empty text"),
    (dict(variants={"base": "useful"}), "variant name 'base' is reserved for a role"),
    (dict(safety_variants=["useful"]), "safety_variants must be a mapping of name: path, not a list"),
    (dict(safety_variants={}), "safety_variants is empty"),
    (dict(safety_variants={"useful_s": None}), "safety variant 'useful_s' has no path"),
    (dict(safety_variants={"useful": "useful"}), "safety variant name 'useful' is already a role's or a variant's"),
    (dict(safety_variants={"useful_s": "useful"}, safety_tuned=None), "safety_variants are fine-tuned from the "
                                                                       "safety-tuned model, but no safety_tuned"),
    (dict(base=5), "base must be a path (text), not a number (5)"),
    (dict(base=""), "base is an empty path"),
    (dict(base="ba\x00se"), "base contains a NUL character"),
    (dict(aligned=None), "missing required key 'aligned'"),
    (dict(aligned=["a", "b"]), "aligned must be a path (text), not a list"),
    (dict(safety_tuned=True), "safety_tuned must be a path (text), not true/false"),
    (dict(name=7), "name must be text, not a number (7)"),
    (dict(name=" "), "name is empty"),
    (dict(start="instruct"), "family 'synthetic': start must be 'aligned' or 'safety_tuned', not 'instruct'"),
    (dict(start=1), "start must be 'aligned' or 'safety_tuned', not a number (1)"),
    (dict(start="safety_tuned", safety_tuned=None), "start is safety_tuned but no safety_tuned checkpoint"),
    (dict(card=12), "card must be a path (text), not a number (12)"),
    (dict(card="nope.md"), "card nope.md: does not exist"),
    (dict(card="useful"), "card useful: is not a file"),
    (dict(card="binary.md"), "card binary.md: is not UTF-8 text (bad byte at offset 0)"),
    (dict(behaviour="broken.json"), "behaviour broken.json: is not valid JSON (line 1, column 2"),
    (dict(behaviour="list.json"), "behaviour list.json: must be a JSON object, not a list"),
    (dict(behaviour="models_list.json"), "'models' must map each model's name to its numbers"),
    (dict(behaviour="binary.md"), "behaviour binary.md: is not UTF-8 text"),
    (dict(variants={"useful": "missing_dir"}), "checkpoint 'useful': path"),
])
def test_a_broken_family_file_is_one_line_naming_the_file(world, changes, words):
    p = write_spec(world, spec_of(**changes))
    msg = error_of(lambda: Family.from_file(p))
    assert msg.startswith(f"family file {p}: ") and words in msg, msg


@pytest.mark.parametrize("raw, words", [
    (b"\xff\xfe binary", "is not UTF-8 text (bad byte at offset 0)"),
    (b"base: [1, 2", "is not valid YAML/JSON"),
    (b"base: 2024-13-45\n", "is not valid YAML/JSON"),
    (b"- base\n- aligned\n", "must be a mapping with base, aligned and variants, not a list"),
    (b"", "must be a mapping with base, aligned and variants, not empty"),
    (b"[" * 5000, "is not valid YAML/JSON"),
])
def test_a_family_file_that_is_not_a_mapping_is_one_line(world, raw, words):
    p = write_spec(world, None, "raw.yaml", raw)
    msg = error_of(lambda: Family.from_file(p))
    assert msg.startswith(f"family file {p}: ") and words in msg, msg


def test_a_family_file_that_is_a_folder_is_one_line(world):
    p = world / "roots" / "fam" / "useful"
    assert error_of(lambda: Family.from_file(p)) == f"family file {p}: is not a file"


# ------------------------------------------------------------------------------------------------ confinement


@pytest.mark.parametrize("changes, what", [
    (dict(card="../../outside/card.md"), "card"),
    (dict(card="{out}/card.md"), "card"),
    (dict(card="escape_card.md"), "card"),
    (dict(behaviour="../../outside/behaviour.json"), "behaviour"),
    (dict(variants={"useful": "escape"}), "checkpoint 'useful'"),
    (dict(base="{out}/ck"), "checkpoint 'base'"),
])
def test_every_path_a_confined_family_file_names_stays_inside_the_roots(world, monkeypatch, changes, what):
    monkeypatch.setenv("SAFESUB_ROOTS", str(world / "roots"))
    changes = json.loads(json.dumps(changes).replace("{out}", str(world / "outside")))
    p = write_spec(world, spec_of(**changes))
    msg = error_of(lambda: Family.from_file(p, confined=True))
    assert msg.startswith(f"family file {p.resolve()}: {what}") and "outside the allowed folders" in msg, msg
    assert SECRET not in msg
    # the app's resolver confines the same way; the command line (not confined) reads them
    assert "outside the allowed folders" in error_of(lambda: resolve_family(str(p), confined=True))
    fam = Family.from_file(p)
    assert SECRET in fam.card + json.dumps(fam.behaviour) or what.startswith("checkpoint")


def test_a_confined_family_inside_the_roots_opens(world, monkeypatch):
    monkeypatch.setenv("SAFESUB_ROOTS", str(world / "roots"))
    fam = Family.from_file(write_spec(world, spec_of()), confined=True)
    assert fam.card == "# the card\n"
    assert all(ck.path.is_relative_to(world / "roots") for ck in fam.checkpoints().values())


# ------------------------------------------------------------------------------------------------ entered paths


def test_entered_paths_are_checked_like_a_family_file(world):
    fam = world / "roots" / "fam"
    good = dict(base=str(fam / "base"), aligned=str(fam / "aligned"), variants={"u": str(fam / "useful")})
    assert resolve_family("paths:" + json.dumps(good | {"safety_tuned": ""})).safety_tuned is None
    for doc, words in [
        ("{", "family paths: the link's family parameter is malformed"),
        ("[" * 5000, "family paths: the link's family parameter is malformed"),
        (json.dumps("text"), "family paths: the link's family parameter is malformed"),
        (json.dumps(good | {"base": 5}), "family paths: checkpoint 'base' must be a path (text), not a number (5)"),
        (json.dumps(good | {"aligned": ["a"]}), "checkpoint 'aligned' must be a path (text), not a list"),
        (json.dumps(good | {"variants": {"u": None}}), "variant 'u' must be a path (text), not empty"),
        (json.dumps(good | {"variants": {"u": 5}}), "variant 'u' must be a path (text), not a number (5)"),
        (json.dumps(good | {"variants": {" ": "x"}}), "family paths: a variant has an empty name"),
        (json.dumps(good | {"start": 3}), "start must be 'aligned' or 'safety_tuned', not a number (3)"),
        (json.dumps(good | {"start": "safety_tuned"}), "start is safety_tuned but no safety_tuned checkpoint"),
        (json.dumps(good | {"varients": {}}), "family paths: unknown key 'varients' (did you mean 'variants'?)"),
        (json.dumps(good | {"base": "~no_such_user_xyz/m"}), "checkpoint 'base' ~no_such_user_xyz/m: cannot be"),
        (json.dumps(good | {"base": "a\x00b"}), "checkpoint 'base' contains a NUL character"),
    ]:
        msg = error_of(lambda: resolve_family("paths:" + doc))
        assert words in msg, (doc, msg)


# ------------------------------------------------------------------------------------------------ zero updates


@pytest.fixture()
def fam_dir(tmp_path):
    write_family(tmp_path, variants=("useful", "harmful"))
    return tmp_path


def _equal_values_other_file(src: Path, dst: Path, keep_from: Path | None = None, names=()) -> None:
    """dst = a copy of checkpoint src saved again (other bytes, same values); with `keep_from`, the tensors
    `names` come from that checkpoint instead."""
    state = load_file(src / "model.safetensors")
    if dst != src:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    if keep_from is not None:
        other = load_file(keep_from / "model.safetensors")
        state |= {n: other[n] for n in names}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt", "resaved": "yes"})


def test_a_zero_alignment_update_is_an_error_not_numbers(fam_dir, tmp_path):
    cache = DiskCache(tmp_path / "cache")
    shutil.rmtree(fam_dir / "base")
    shutil.copytree(fam_dir / "aligned", fam_dir / "base")  # the same files
    family = Family.from_file(fam_dir / "family.yaml")
    msg = error_of(lambda: SubspaceEngine.build(family, "useful", cache=cache))
    assert msg == ("family 'synthetic': the alignment update is zero (aligned has the same files as base), so there "
                   "is no alignment subspace to project onto; check the paths of base and aligned")
    _equal_values_other_file(fam_dir / "aligned", fam_dir / "base")  # other files, the same values
    family = Family.from_file(fam_dir / "family.yaml")
    assert "(aligned equals base in every tensor)" in error_of(lambda: SubspaceEngine.build(family, "useful",
                                                                                               cache=cache))


def test_an_alignment_update_zero_in_some_tensors_is_a_warning(fam_dir, tmp_path):
    frozen = "model.layers.0.mlp.down_proj.weight"
    _equal_values_other_file(fam_dir / "base", fam_dir / "base2", keep_from=fam_dir / "aligned", names=[frozen])
    family = Family.from_paths("f", fam_dir / "base2", fam_dir / "aligned", {"useful": fam_dir / "useful"})
    engine = SubspaceEngine.build(family, "useful", cache=DiskCache(tmp_path / "cache"))
    assert len(engine.warnings) == 1 and "\n" not in engine.warnings[0]
    assert engine.warnings[0].startswith("variant 'useful': the alignment update is zero in 1 of ")
    assert frozen in engine.warnings[0]
    plain = SubspaceEngine.build(Family.from_file(fam_dir / "family.yaml"), "useful",
                                 cache=DiskCache(tmp_path / "cache"))
    assert plain.warnings == []


def test_an_overlap_pair_with_a_zero_update_is_an_error(fam_dir, tmp_path):
    cache = DiskCache(tmp_path / "cache")
    family = Family.from_file(fam_dir / "family.yaml")
    msg = error_of(lambda: weight_overlap(family, "aligned", pairs=[("aligned", "useful")], cache=cache))
    assert msg.startswith("overlap pair aligned:useful relative to aligned: the update aligned - aligned is zero "
                          "(it is the reference)")
    _equal_values_other_file(fam_dir / "aligned", fam_dir / "harmful")
    family = Family.from_file(fam_dir / "family.yaml")
    msg = error_of(lambda: weight_overlap(family, "aligned", pairs=[("harmful", "useful")], cache=cache))
    assert "the update harmful - aligned is zero (harmful equals aligned in every tensor)" in msg
    assert files_under(cache.root / "weight_overlap") == []  # nothing cached for it
    assert_cache_clean(cache.root)


def test_an_overlap_side_zero_in_some_tensors_leaves_nan_and_a_warning(fam_dir, tmp_path):
    untouched = ["model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.q_proj.weight"]  # table order
    _equal_values_other_file(fam_dir / "harmful", fam_dir / "harmful", keep_from=fam_dir / "aligned",
                             names=untouched)
    family = Family.from_file(fam_dir / "family.yaml")
    table = weight_overlap(family, "aligned", energies=[0.5, 0.9], pairs=[("harmful", "useful")],
                           cache=DiskCache(tmp_path / "cache"))
    tensors = table[table.scope == "tensor"]
    empty = set(tensors.loc[tensors.mso.isna(), "unit"])
    assert empty == set(untouched)
    assert table.loc[table.scope != "tensor", "mso"].notna().all()  # the block spaces still hold other updates
    warnings = overlap_warnings(table)
    assert warnings == [f"overlap vs aligned, pair harmful-A vs useful-A: a side's update is zero in 2 of "
                        f"{len(table[['scope', 'unit']].drop_duplicates())} units (e.g. tensor {untouched[0]}), where "
                        "the MSO is empty (NaN) and left out of the means"]
    assert overlap_summary(table)["mso"].notna().all()
    shutil.rmtree(fam_dir / "harmful")
    write_family(tmp_path / "fresh", variants=("useful", "harmful"))
    shutil.copytree(tmp_path / "fresh" / "harmful", fam_dir / "harmful")
    table = weight_overlap(Family.from_file(fam_dir / "family.yaml"), "aligned", energies=[0.9],
                           pairs=[("harmful", "useful")], cache=DiskCache(tmp_path / "cache"))
    assert table.mso.notna().all() and overlap_warnings(table) == []


def test_cli_overlap_of_the_reference_with_itself_is_one_line(fam_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAFESUB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o.csv"
    code, _, err = run(["overlap", "--family", fam_dir / "family.yaml", "--pairs", "aligned:useful", "--out", out],
                       capsys)
    assert_one_line(code, err, ("overlap pair aligned:useful", "is zero", "it is the reference"))
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ CSV headers


_ASK = ("{p}: one column, whose first row {first!r} may be a header or a prompt: name the column to take that row "
        "as the header, or add a header row such as 'prompt' (or use a .txt file, one prompt a line)")
CSV_CASES = [  # text, column named, the prompts read (a tuple) or the first row the error quotes (a str)
    ("prompt\nfirst\nsecond\n", None, ("first", "second")),
    (" Prompt \nfirst\nsecond\n", None, ("first", "second")),
    ("How do I bake bread?\nHow do I fix a bike?\n", "How do I bake bread?", ("How do I fix a bike?",)),
    ("request\nfirst\n", "request", ("first",)),
    ("id,prompt\n1,first\n2,second\n", None, ("first", "second")),
    ("How do I bake bread?\nHow do I fix a bike?\n", None, "How do I bake bread?"),
    ("request\nfirst\n", None, "request"),
    ("only one prompt\n", None, "only one prompt"),
]


@pytest.mark.parametrize("text, column, expected", CSV_CASES)
def test_a_one_column_csv_never_loses_its_first_prompt_silently(tmp_path, text, column, expected):
    """The first row is the header only when it is a usual name or the column named; else an error asks."""
    p = tmp_path / "p.csv"
    p.write_text(text)
    if isinstance(expected, tuple):
        assert load_prompts(p, column=column).prompts == expected
    else:
        assert error_of(lambda: load_prompts(p, column=column)) == _ASK.format(p=p, first=expected)


# ------------------------------------------------------------------------------------------------ full disk


def _partial_then(error):
    def save(tensors, path, *args, **kw):
        Path(path).write_bytes(b"partial safetensors")
        raise error
    return save


@pytest.mark.parametrize("error, words", [
    (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                     'on device" })'), "no space left on the device"),
    (SafetensorError("Error while serializing: No space left on device (os error)"), "no space left on the device"),
    (SafetensorError('Error while serializing: IoError(Os { code: 5, kind: Uncategorized, message: "Input/output '
                     'error" })'), "cannot be written (Error while serializing"),
    (SafetensorError("Error while serializing: something else"), "cannot be written (Error while serializing"),
], ids=["enospc-code", "enospc-text", "eio", "other"])
def test_a_safetensors_write_error_is_one_cache_line_and_leaves_nothing(tmp_path, monkeypatch, error, words):
    cache = DiskCache(tmp_path / "c")
    cache.put("other", {"k": 0}, [0])  # an existing entry survives

    def entries():  # lock files are kept by design (cache/store.py)
        return [f for f in files_under(cache.root) if not f.startswith(".locks")]

    before = entries()
    with monkeypatch.context() as m:
        m.setattr(cache_mod, "save_file", _partial_then(error))  # the low-level save under cache_mod._write_tensors
        msg = error_of(lambda: cache.get_or_compute("svd", {"a": 1}, lambda: {"w": torch.ones(3)}))
    assert msg.startswith(f"cache folder {cache.root}: ") and words in msg, msg
    assert entries() == before and cache.get("svd", {"a": 1}) is None
    assert_cache_clean(cache.root)
    assert torch.equal(cache.get_or_compute("svd", {"a": 1}, lambda: {"w": torch.ones(3)})["w"], torch.ones(3))


# ------------------------------------------------------------------------------------------------ property tests

_KEYS = list(FILE_KEYS) + ["varaints", "Base", "alligned", "safety", "card_", "extra", "paths"]
_PATHS = ["base", "aligned", "safety", "useful", "harmful", "missing_dir", "card.md", "escape", "../../outside/ck",
          "{out}/ck", "{fam}/aligned", "", " ", "~no_such_user_xyz/x", "a\x00b", "x" * 300, "useful/config.json",
          "../fam/useful", "./useful/", "{out}/card.md"]
_FILES = ["card.md", "behaviour.json", "binary.md", "broken.json", "list.json", "models_list.json", "nope.md",
          "../../outside/card.md", "../../outside/behaviour.json", "escape_card.md", "useful", "{out}/card.md"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**30), st.floats(allow_nan=True),
                     st.text(max_size=12), st.dates())
_nested = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=8)
_VALID = dict(name="generated", base="base", aligned="aligned", safety_tuned="safety", start="aligned",
              variants={"useful": "useful", "harmful": "harmful"}, safety_variants={"harmful_s": "harmful"},
              card="card.md", behaviour="behaviour.json", eval_sets={"harmful": "builtin-harmful:eval,n=3", "utility": "qa.jsonl,prompt=q,reference=a"},
              refusal_openings=["I cannot", "Sorry"], system_prompt="You are helpful.")
_SPECS = ["builtin-harmful:eval", "qa.jsonl,prompt=q,reference=a", "qa.jsonl,prompt=q", "qa.jsonl,prompt=x",
          "binary.md", "nope.jsonl", "../../outside/qa.jsonl", "{out}/qa.jsonl", "harmbench,split=eval,n=2",
          "gsm8k,convention=strict", "arithmetic,convention=loose", "qa.jsonl,colour=red", "", "unknown-set",
          {"path": "qa.jsonl", "prompt": "q", "reference": "a"}, {"set": "arithmetic", "n": 0}, {"sett": "x"}]


def _mostly(choices: list, rare=_nested):
    return st.one_of(st.sampled_from(choices), st.sampled_from(choices), st.sampled_from(choices), rare)


_CHANGES = {
    "name": _mostly(["other", "", " ", "x" * 200]),
    "start": _mostly(["aligned", "safety_tuned", "instruct", ""]),
    "variants": st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(["useful", "harmful", "base", "v1", "", " "]), st.integers(0, 3)),
                        st.one_of(st.sampled_from(_PATHS), st.none(), _nested), max_size=3),
        st.dictionaries(st.sampled_from(["useful", "harmful", "v1"]), st.sampled_from(_PATHS), min_size=1,
                        max_size=3),
        _nested),
    "safety_variants": st.one_of(
        st.dictionaries(st.sampled_from(["useful_s", "useful", "safety_tuned", "", 2]),
                        st.one_of(st.sampled_from(_PATHS), st.none(), _nested), max_size=2), _nested),
    "card": _mostly(_FILES),
    "behaviour": _mostly(_FILES),
    "eval_sets": st.one_of(st.dictionaries(st.sampled_from(["harmful", "utility", "benign", "edgy", "harm"]),
                                           st.one_of(st.sampled_from(_SPECS), st.none(), _nested), max_size=3),
                           _nested),
    "refusal_openings": _mostly([["I cannot"], [], [""], ["ok", 3], "I cannot"]),
    "system_prompt": _mostly(["Be brief.", "", " ", 5]),
}


@st.composite
def _family_docs(draw):
    """Mostly a valid family file with a few keys changed, dropped, nulled or misspelt; now and then anything."""
    if draw(st.integers(0, 19)) == 0:
        return draw(_nested)
    doc = dict(_VALID)
    for key in FILE_KEYS:
        keep = 16 if key in ("base", "aligned", "variants") else 6  # a required key goes missing less often
        how = draw(st.sampled_from(["keep"] * keep + ["drop", "null", "change", "change"]))
        if how == "drop":
            doc.pop(key)
        elif how == "null":
            doc[key] = None
        elif how == "change":
            doc[key] = draw(_CHANGES.get(key, _mostly(_PATHS)))
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.sampled_from(_KEYS + ["", "x" * 100]))] = draw(_mostly(_PATHS))
    return doc


@contextlib.contextmanager
def _roots(world: Path):
    """SAFESUB_ROOTS = <world>/roots for one example (hypothesis examples share the test's fixtures)."""
    old = os.environ.get("SAFESUB_ROOTS")
    os.environ["SAFESUB_ROOTS"] = str(world / "roots")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SAFESUB_ROOTS")
        else:
            os.environ["SAFESUB_ROOTS"] = old


def _fill(value, world: Path):
    """Put the world's folders into the `{out}` and `{fam}` markers of a generated value."""
    if isinstance(value, str):
        return value.replace("{out}", str(world / "outside")).replace("{fam}", str(world / "roots" / "fam"))
    if isinstance(value, list):
        return [_fill(v, world) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    return value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(doc=_family_docs(), as_json=st.booleans(), confined=st.booleans())
def test_any_family_file_is_a_family_or_one_line_naming_it(world, doc, as_json, confined):
    doc = _fill(doc, world)
    p = world / "roots" / "fam" / "generated.yaml"
    try:
        text = json.dumps(doc, default=str) if as_json else yaml.safe_dump(doc, allow_unicode=True)
    except (ValueError, yaml.YAMLError):
        text = repr(doc)  # not representable: the raw text is a family file too
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        with _roots(world):
            fam = Family.from_file(p, confined=confined)
    except SafesubError as err:
        msg = str(err)
        event(msg.removeprefix(f"family file {p.resolve() if confined else p}: ").split(" ")[0])
        assert "\n" not in msg and msg.startswith(f"family file {p.resolve() if confined else p}"), msg
        assert not confined or SECRET not in msg
        return
    event("a valid family")
    assert isinstance(fam, Family) and fam.variants and isinstance(fam.card, str) and isinstance(fam.behaviour, dict)
    if confined:
        assert SECRET not in fam.card + json.dumps(fam.behaviour)
        assert all(ck.path.is_relative_to(world / "roots") for ck in fam.checkpoints().values())
    assert fam.refusal_openings is None or all(isinstance(o, str) and o.strip() for o in fam.refusal_openings)
    assert fam.system_prompt is None or fam.system_prompt.strip()
    try:  # its evaluation sets: read before any model loads, or one line naming the family file
        with _roots(world):
            sets = EvalSets.for_family(fam)
    except SafesubError as err:
        assert "\n" not in str(err) and str(err).startswith(f"family file {fam.file}: eval_sets."), str(err)
        assert not confined or SECRET not in str(err)
        return
    assert sets.utility.references is not None
    if confined:
        assert not any(SECRET in p for role in ("harmful", "utility", "benign", "edgy") for p in getattr(sets, role))


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                               st.text(max_size=10)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)
_ENTERED = dict(base="{fam}/base", aligned="{fam}/aligned", safety_tuned="", start="aligned",
                variants={"u": "{fam}/useful"})


@st.composite
def _entered(draw):
    """Mostly the JSON of valid entered paths with a few entries changed, dropped or nulled; now and then any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_JSON)
    doc = dict(_ENTERED)
    for key in list(doc):
        how = draw(st.sampled_from(["keep"] * 6 + ["drop", "null", "change", "change"]))
        if how == "drop":
            doc.pop(key)
        elif how == "null":
            doc[key] = None
        elif how == "change":
            doc[key] = draw(st.one_of(st.sampled_from(_PATHS), st.sampled_from(["{fam}/" + x for x in _PATHS]),
                                      st.dictionaries(st.text(max_size=4), st.sampled_from(_PATHS), max_size=2),
                                      _JSON))
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.sampled_from(["variant", "name", "card", ""]))] = draw(_JSON)
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_entered(), raw=st.one_of(st.none(), st.none(), st.text(max_size=20)), confined=st.booleans())
def test_any_paths_spec_is_a_family_or_one_line(world, doc, raw, confined):
    text = raw if raw is not None else json.dumps(_fill(doc, world))
    try:
        with _roots(world):
            fam = resolve_family("paths:" + text, confined=confined)
    except SafesubError as err:
        event(str(err).split(":")[0])
        assert "\n" not in str(err), str(err)
        return
    event("a valid family")
    assert fam.name == "entered" and fam.variants
    if confined:
        assert all(ck.path.is_relative_to(world / "roots") for ck in fam.checkpoints().values())


def test_paths_spec_round_trips_through_the_checks(world):
    fam = world / "roots" / "fam"
    spec = paths_spec(str(fam / "base"), str(fam / "aligned"), "", "aligned", {"u": str(fam / "useful")})
    assert list(resolve_family(spec).variants) == ["u"]
