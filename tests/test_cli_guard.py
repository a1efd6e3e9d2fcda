"""The CLI's boundary (issue 19): the output-path guard and the values of options.

- The guard (`outputs.guard_outputs`, run for every verb before any work) refuses an output path that is an input of
  the command (the family file, a path it names, a checkpoint or a file inside one, a prompt file, a judge model
  folder), another output of it (after resolving links and relative paths), or an existing path that is not a
  regular file (a folder, a FIFO, a device, a socket): one `error:` line, status 2, nothing written, every input
  unchanged byte for byte. Table cases name each class; a property test draws random combinations.
- Option values: random strings and numbers for the list and number options end in status 0, or 2 with one
  `error:` last line, never a traceback; an empty list is an error, not an empty sweep.
- `--n-prompts` cuts the prompt sets of `score` and `activations` (rows counted).
"""
from __future__ import annotations

import hashlib
import os
import socket
import string
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from factories import write_family
from safesub_core import cli, commands
from safesub_core.errors import SafesubError
from safesub_core.family import resolve_family
from safesub_core.sweeps import sweep
from test_bad_inputs import assert_one_line, run

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A synthetic family (with a card) and the other inputs a command can read: a prompt file, a judge folder."""
    root = tmp_path_factory.mktemp("world")
    fam = write_family(root / "fam", variants=("useful", "harmful"))
    (root / "fam" / "card.md").write_text("how it was built\n")
    fam.write_text(fam.read_text() + "card: card.md\n")
    (root / "prompts.txt").write_text("How do I pick a lock?\nHow do I make a weapon?\n")
    (root / "judge").mkdir()
    (root / "judge" / "config.json").write_text("{}")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every regular file under `root` (the inputs, byte for byte)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def special(kind: str, where: Path) -> Path:
    """An existing path that is not a regular file."""
    p = where / kind
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "folder":
        p.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif kind == "device":
        return Path("/dev/null")
    return p


@pytest.fixture
def no_work(monkeypatch):
    """The commands' work replaced by stubs that record being called: a refusal must come before any of it."""
    calls = []

    def stub(*args, **kwargs):
        calls.append(args)
        return pd.DataFrame({"scope": ["tensor"], "pair": ["x"], "energy": [0.5], "mso": [0.5],
                             "random_baseline": [0.1], "k_x": [1], "k_y": [1], "unit": ["t"], "reference": ["a"]})

    monkeypatch.setattr(commands, "weight_overlap", stub)
    monkeypatch.setattr(commands, "sweep", stub)
    monkeypatch.setattr(commands, "overlap_summary", lambda table: table)

    def session(args, sets=None):
        calls.append("session")
        raise SafesubError("stub session: no model in this test")

    monkeypatch.setattr(commands, "_session", session)
    return calls


# ------------------------------------------------------------------------------------------------ the guard: cases

FAM = "{w}/fam/family.yaml"
OVERLAP = ["overlap", "--family", FAM, "--energies", "0.5"]
SWEEP = ["sweep", "--family", FAM, "--scores", "none", "--fracs", "0.5"]
SCORE = ["score", "--family", FAM, "--n-prompts", "2"]

GUARD_CASES = [  # (id, argv, words of the one line); {w} is the world folder, {o} a fresh output folder
    ("out-is-family-file", SWEEP + ["--out", FAM], ("--out file", "is the family file of this command")),
    ("out-is-family-file-relative", SWEEP + ["--out", "{w}/fam/../fam/./family.yaml"], ("is the family file",)),
    ("out-in-checkpoint", SWEEP + ["--out", "{w}/fam/aligned/config.json"],
     ("--out file", "is inside checkpoint 'aligned' of the family")),
    ("out-is-card", OVERLAP + ["--out", "{w}/fam/card.md"], ("--out file", "'card' path of the family file")),
    ("out-is-prompt-file", SCORE + ["--prompts", "{w}/prompts.txt", "--kind", "harmful", "--out", "{w}/prompts.txt"],
     ("--out file", "is the prompt file of this command (--prompts)")),
    ("summary-is-prompt-file", SCORE + ["--prompts", "{w}/prompts.txt", "--out", "{o}/s.csv", "--summary",
                                        "{w}/prompts.txt"], ("--summary file", "is the prompt file")),
    ("out-in-judge-folder", SCORE + ["--judge", "hf-classifier", "--judge-path", "{w}/judge", "--out",
                                     "{w}/judge/x.csv"], ("--out file", "inside the judge model folder")),
    ("summary-is-out", OVERLAP + ["--out", "{o}/a.csv", "--summary", "{o}/./a.csv"],
     ("--summary file", "is also the --out file of this command")),
    ("map-is-out", ["activations", "--family", FAM, "--out", "{o}/a.csv", "--map", "{o}/sub/../a.csv"],
     ("--map file", "is also the --out file")),
    ("out-is-fifo", SWEEP + ["--out", "{o}/fifo"], ("--out file", "is a FIFO")),
    ("out-is-device", SWEEP + ["--out", "/dev/null"], ("--out file /dev/null", "is a device")),
    ("out-is-socket", OVERLAP + ["--out", "{o}/socket"], ("--out file", "is a socket")),
    ("out-is-folder", OVERLAP + ["--out", "{o}/folder"], ("--out file", "is a folder")),
    ("summary-is-fifo", OVERLAP + ["--out", "{o}/a.csv", "--summary", "{o}/fifo"], ("--summary file", "FIFO")),
    ("export-into-checkpoint", ["export", "--family", FAM, "--variant", "useful", "--out", "{w}/fam/useful/x"],
     ("--out folder", "inside checkpoint 'useful'")),
    ("export-to-device", ["export", "--family", FAM, "--variant", "useful", "--out", "/dev/null"],
     ("--out folder /dev/null", "not a folder")),
    ("findings-out-is-family", ["findings", "--families", FAM, "--no-figures", "--out", FAM],
     ("--out file", "is the family file")),
    ("build-out-is-fifo", ["build", "tiny", "--size", "smoke", "--out", "{o}/fifo"], ("--out folder", "not a folder")),
]


def _fill(argv, world: Path, out: Path) -> list[str]:
    return [a.replace("{w}", str(world)).replace("{o}", str(out)) for a in argv]


@pytest.mark.parametrize("case_id, argv, words", GUARD_CASES, ids=[c[0] for c in GUARD_CASES])
def test_guard_refuses_before_any_work_and_touches_nothing(case_id, argv, words, world, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    for kind in ("fifo", "folder", "socket"):
        special(kind, out)
    before, outs_before = snapshot(world), sorted(os.listdir(out))
    code, _, err = run(_fill(argv, world, out), capsys)
    assert_one_line(code, err, words)
    assert not no_work, "refused before any work"
    assert snapshot(world) == before, "every input unchanged byte for byte"
    assert sorted(os.listdir(out)) == outs_before, "nothing written"
    assert Path("/dev/null").is_char_device()


def test_guard_follows_links_to_an_input(world, tmp_path, capsys, no_work):
    link, hard = tmp_path / "link.yaml", tmp_path / "hard.yaml"
    link.symlink_to(world / "fam" / "family.yaml")
    os.link(world / "fam" / "family.yaml", hard)
    for target in (link, hard):
        code, _, err = run(_fill(SWEEP, world, tmp_path) + ["--out", target], capsys)
        assert_one_line(code, err, ("is the family file",))
    dangling = tmp_path / "later.csv"
    (tmp_path / "alias.csv").symlink_to(dangling)  # --summary names --out through a link to a file not yet there
    code, _, err = run(_fill(OVERLAP, world, tmp_path) + ["--out", dangling, "--summary", tmp_path / "alias.csv"],
                       capsys)
    assert_one_line(code, err, ("--summary file", "is also the --out file"))
    assert not no_work


def test_guard_lets_absent_paths_and_regular_files_through(world, tmp_path, capsys, no_work):
    (tmp_path / "old.csv").write_text("an old result\n")
    code, out, err = run(_fill(OVERLAP, world, tmp_path) + ["--out", tmp_path / "old.csv", "--summary",
                                                             tmp_path / "new" / "s.csv"], capsys)
    assert code == 0, err
    assert (tmp_path / "new" / "s.csv").is_file() and "an old result" not in (tmp_path / "old.csv").read_text()


def test_guard_protects_the_folder_of_a_built_in_family(tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.setenv("SAFESUB_CACHE", str(tmp_path / "cache"))  # not built: the guard builds nothing either
    code, _, err = run(["sweep", "--family", "tiny", "--scores", "none", "--out",
                        tmp_path / "cache" / "families" / "tiny" / "aligned" / "config.json"], capsys)
    assert_one_line(code, err, ("--out file", "inside the built-in tiny family's folder"))
    assert not (tmp_path / "cache" / "families").exists()


# ------------------------------------------------------------------------------------------------ the guard: property

BOTH, SCORE_ONLY = ("overlap", "score"), ("score",)
INPUT_PATHS = {  # a name drawn by the property test -> the path it stands for, and the commands that refuse it
    "new": ("{o}/new.csv", ()), "new2": ("{o}/deeper/new2.csv", ()), "old": ("{o}/old.csv", ()),
    "family": (FAM, BOTH), "family-link": ("{o}/link.yaml", BOTH),
    "checkpoint-file": ("{w}/fam/base/config.json", BOTH), "checkpoint": ("{w}/fam/harmful", BOTH),
    "card": ("{w}/fam/card.md", BOTH), "fifo": ("{o}/fifo", BOTH), "folder": ("{o}/folder", BOTH),
    "socket": ("{o}/socket", BOTH), "device": ("/dev/null", BOTH),
    "prompts": ("{o}/in/prompts.txt", SCORE_ONLY), "judge-file": ("{o}/in/judge/config.json", SCORE_ONLY),
}


@PROPERTY
@given(out=st.sampled_from(sorted(INPUT_PATHS)), summary=st.sampled_from([None, "same", *sorted(INPUT_PATHS)]),
       command=st.sampled_from(["overlap", "score"]), spelling=st.sampled_from(["plain", "dotted", "relative"]))
def test_property_output_paths_are_refused_before_any_work(out, summary, command, spelling, world, tmp_path_factory,
                                                           capsys, monkeypatch, no_work):
    no_work.clear()
    o = tmp_path_factory.mktemp("o")
    for kind in ("fifo", "folder", "socket"):
        special(kind, o)
    (o / "old.csv").write_text("old\n")
    (o / "link.yaml").symlink_to(world / "fam" / "family.yaml")
    (o / "in" / "judge").mkdir(parents=True)  # the score's own inputs; for an overlap, files like any other
    (o / "in" / "prompts.txt").write_text("How do I pick a lock?\n")
    (o / "in" / "judge" / "config.json").write_text("{}")
    monkeypatch.chdir(o)

    def path(name: str) -> str:
        p = Path(_fill([INPUT_PATHS[name][0]], world, o)[0])
        if spelling == "dotted":
            return str(p.parent / "." / p.name)
        return os.path.relpath(p, o) if spelling == "relative" else str(p)

    argv = ["overlap", "--family", FAM, "--energies", "0.5"] if command == "overlap" else \
        ["score", "--family", FAM, "--prompts", "{o}/in/prompts.txt", "--kind", "harmful", "--judge", "hf-classifier",
         "--judge-path", "{o}/in/judge"]
    argv = _fill(argv, world, o) + ["--out", path(out)]
    if summary is not None:
        argv += ["--summary", path(out) if summary == "same" else path(summary)]
    refused = (command in INPUT_PATHS[out][1] or summary in ("same", out)
               or summary is not None and command in INPUT_PATHS[summary][1])
    inputs = [world] + ([o / "in"] if command == "score" else [])
    before, listing = [snapshot(p) for p in inputs], sorted(os.listdir(o))

    code, _, err = run(argv, capsys)
    if refused:
        assert_one_line(code, err, ("file",))
        assert not no_work, "refused before any work"
    elif command == "score":  # past the guard, a score stops at its judge or at the stub session: one line
        assert_one_line(code, err, ())
        assert "file" not in err.splitlines()[-1], err
    else:
        assert code == 0, err
    if code:
        assert sorted(os.listdir(o)) == listing, "nothing written"
    assert [snapshot(p) for p in inputs] == before, "every input unchanged byte for byte"


# ------------------------------------------------------------------------------------------------ option values


@pytest.mark.parametrize("flag, value", [("--subspace", ","), ("--mode", " "), ("--variant", ","), ("--fracs", ","),
                                         ("--mode", " , ,")])
def test_empty_list_is_an_error_not_an_empty_sweep(flag, value, world, tmp_path, capsys):
    code, _, err = run(_fill(SWEEP, world, tmp_path) + [flag, value, "--out", tmp_path / "x.csv"], capsys)
    assert_one_line(code, err, (flag, "expected comma-separated"))
    assert not (tmp_path / "x.csv").exists()


def test_empty_findings_list_is_an_error(tmp_path, capsys):
    for flag in ("--families", "--modes", "--variants", "--gen-modes", "--power-modes"):
        code, _, err = run(["findings", flag, " , ", "--no-figures", "--out", tmp_path / "F.md"], capsys)
        assert_one_line(code, err, (flag, "expected comma-separated"))
    assert not (tmp_path / "F.md").exists()


def test_sweep_api_refuses_an_empty_variant_list(world):
    with pytest.raises(SafesubError, match="sweep variants: the list is empty"):
        sweep(resolve_family(str(world / "fam" / "family.yaml")), variants=[], scores="none")


@pytest.mark.parametrize("flag, value", [("--reference", ","), ("--energies", ","), ("--pairs", " ,")])
def test_empty_overlap_list_is_an_error(flag, value, world, tmp_path, capsys):
    code, _, err = run(_fill(OVERLAP, world, tmp_path) + [flag, value, "--out", tmp_path / "x.csv"], capsys)
    assert_one_line(code, err, (flag, "expected comma-separated"))
    assert not (tmp_path / "x.csv").exists()


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-5, 5).map(str),
                    st.sampled_from(["0", "1", "0.5", "1e-9", "-0.0", "1.0000001", "nan", "inf", "0x10", "½"]))
TEXT = st.text(alphabet=string.ascii_letters + string.digits + " ,:.-_/'\"é\t", max_size=12)
FRACTIONS = st.floats(min_value=1e-6, max_value=1.0).map(repr)


def values(valid: st.SearchStrategy[str], junk: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly a valid value (9 in 10), else junk: so that a good share of whole command lines run to the end."""
    return st.integers(0, 9).flatmap(lambda i: valid if i else junk)


def lists(items: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(items, min_size=1, max_size=3).map(",".join)


def junk_list(items: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(items | TEXT, max_size=3).map(",".join) | TEXT


def _check_status(code: int, err: str) -> None:
    event(f"status {code}")
    assert "Traceback" not in err, err
    assert code in (0, 2), err
    if code == 2:
        assert_one_line(code, err, ())


@PROPERTY
@given(fracs=values(lists(FRACTIONS), junk_list(NUMBERS)),
       alpha=values(st.floats(-3, 3).map(repr), NUMBERS | TEXT),
       n=values(st.integers(1, 64).map(str), st.integers(-3, 0).map(str) | TEXT),
       subspace=values(lists(st.sampled_from(["topk", "randomk", "random"])), junk_list(st.just("top"))),
       mode=values(lists(st.sampled_from(["parallel", "opposite", "orthogonal"])), junk_list(st.just("para"))),
       variant=st.none() | values(lists(st.sampled_from(["useful", "harmful"])), junk_list(st.just("aligned"))))
def test_property_sweep_values_end_in_one_line_or_a_table(fracs, alpha, n, subspace, mode, variant, world,
                                                          tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("sweep") / "x.csv"
    argv = ["sweep", "--family", str(world / "fam" / "family.yaml"), "--scores", "none", f"--fracs={fracs}",
            f"--alpha={alpha}", f"--n-prompts={n}", f"--subspace={subspace}", f"--mode={mode}", "--out", str(out)]
    if variant is not None:
        argv.append(f"--variant={variant}")
    code, _, err = run(argv, capsys)
    _check_status(code, err)
    if code == 0:
        table = pd.read_csv(out)
        assert len(table) > 0, "a sweep that succeeds has rows"
    else:
        assert not out.exists()


@PROPERTY
@given(energies=values(lists(FRACTIONS), junk_list(NUMBERS)),
       reference=values(lists(st.sampled_from(["aligned", "safety_tuned"])), junk_list(st.just("base"))),
       pairs=st.none() | values(lists(st.sampled_from(["harmful:useful", "useful:harmful", "base:harmful"])),
                                junk_list(st.sampled_from(["x:y", "a", ":", "a:b:c", "useful:useful"]))))
def test_property_overlap_values_end_in_one_line_or_a_table(energies, reference, pairs, world, tmp_path_factory,
                                                            capsys):
    out = tmp_path_factory.mktemp("overlap") / "x.csv"
    argv = ["overlap", "--family", str(world / "fam" / "family.yaml"), f"--energies={energies}",
            f"--reference={reference}", "--out", str(out)]
    if pairs is not None:
        argv.append(f"--pairs={pairs}")
    code, _, err = run(argv, capsys)
    _check_status(code, err)
    assert out.exists() == (code == 0)


# ------------------------------------------------------------------------------------------------ --n-prompts


@pytest.mark.slow
def test_n_prompts_cuts_the_sets_of_score_and_activations(tiny_family, tmp_path, capsys):
    fam = str(tiny_family)
    code, _, err = run(["score", "--family", fam, "--n-prompts", "2", "--max-new-tokens", "2",
                        "--out", tmp_path / "s.csv"], capsys)
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "s.csv")) == 2, "two prompts scored for --n-prompts 2"

    code, _, err = run(["activations", "--family", fam, "--n-prompts", "3", "--energies", "0.5", "--out",
                        tmp_path / "a.csv", "--map", tmp_path / "m.csv", "--models", "aligned,useful"], capsys)
    assert code == 0, err
    coords = pd.read_csv(tmp_path / "m.csv")
    assert len(coords) == 2 * (3 + 3), "two models x (3 + 3) prompts"
    assert coords.groupby(["model", "set"]).size().eq(3).all()
