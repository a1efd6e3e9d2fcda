"""The command line: writes its CSVs, documents its options, and reports bad input in one line."""
import subprocess
import sys

import pandas as pd
import pytest

from factories import write_family
from safesub_core.cli import main


@pytest.fixture(scope="module")
def family_file(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("fam"))


def test_sweep_writes_one_row_per_point(family_file, tmp_path):
    out = tmp_path / "results.csv"
    assert main(["sweep", "--family", str(family_file), "--variant", "useful", "--subspace", "topk,randomk,random",
                 "--mode", "parallel,orthogonal", "--fracs", "0.01,0.25,0.5,0.75,0.99", "--scores", "none",
                 "--seeds", "2", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert len(df) == (1 + 2 + 2) * 2 * 5  # Top-K once, Random-K and Random once per draw
    assert df[df.subspace == "topk"].seed.isna().all() and set(df[df.subspace == "random"].seed) == {0, 1}
    assert {"subspace", "mode", "rank_fraction", "energy_kept", "cos_task_kept", "cos_task_align"} <= set(df.columns)
    par = df[df["mode"] == "parallel"].set_index(["subspace", "seed", "rank_fraction"]).energy_kept
    orth = df[df["mode"] == "orthogonal"].set_index(["subspace", "seed", "rank_fraction"]).energy_kept
    assert ((par + orth - 1).abs() < 1e-9).all()


def test_overlap_writes_the_mso_table_and_summary(family_file, tmp_path):
    out, summary = tmp_path / "mso.csv", tmp_path / "summary.csv"
    assert main(["overlap", "--family", str(family_file), "--reference", "aligned,safety_tuned",
                 "--energies", "0.5,0.9", "--out", str(out), "--summary", str(summary)]) == 0
    table = pd.read_csv(out)
    assert set(table.reference) == {"aligned", "safety_tuned"}
    assert len(pd.read_csv(summary)) == 2 * 3 * 3 * 2  # references x scopes x pairs x energies


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "--family", "/nonexistent/family.yaml", "--out", "x.csv"], "family file /nonexistent/family.yaml"),
        (["sweep", "--fracs", "0,0.5", "--scores", "none", "--out", "x.csv"], "rank fraction 0.0"),
        (["overlap", "--energies", "1.5", "--out", "x.csv"], "energy fraction 1.5"),
        (["sweep", "--variant", "nope", "--scores", "none", "--out", "x.csv"], "no fine-tuned variant 'nope'"),
        (["sweep", "--device", "cuda:7", "--out", "x.csv"], "device 'cuda:7': not available"),
        (["sweep", "--dtype", "int8", "--out", "x.csv"], "invalid choice: 'int8'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(family_file, tmp_path, argv, message, capsys):
    argv = [a if a != "x.csv" else str(tmp_path / "x.csv") for a in argv]
    if "--family" not in argv:
        argv[1:1] = ["--family", str(family_file)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "x.csv").exists()


def test_help_documents_every_command():
    out = subprocess.run([sys.executable, "-m", "safesub_core", "sweep", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--family", "--subspace", "--mode", "--fracs", "--alpha", "--scores", "--out"):
        assert option in out.stdout


def test_the_safesub_command_and_python_m_have_the_same_verbs():
    """The installed console script (`pip install -e .`, as the Makefile does) is the same CLI as `python -m`."""
    from pathlib import Path

    script = Path(sys.executable).with_name("safesub")
    assert script.is_file(), "the `safesub` console script is installed beside this Python (pip install -e .)"
    verbs = "{sweep,overlap,score,activations,export,build,findings,hypotheses,prompts,cache}"
    for cmd in ([str(script), "--help"], [sys.executable, "-m", "safesub_core", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and verbs in out.stdout, (cmd, out.stdout, out.stderr)


def test_findings_verb_refuses_bad_values_in_one_line(tmp_path, capsys):
    assert main(["findings", "--families", "tiny", "--n-prompts", "tiny=lots", "--out", str(tmp_path / "F.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: prompt counts 'tiny=lots'") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "F.md").exists()
    for flags, words in ((["--n-boot", "-1"], "n_boot -1 must be a whole number >= 0"),
                         (["--power-modes", "sideways"], "mode 'sideways'")):
        assert main(["findings", "--families", "tiny", *flags, "--out", str(tmp_path / "F.md")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert words in err[-1] and len(err) == 1, err
    assert not (tmp_path / "F.md").exists()


def test_score_help_points_to_the_prompts_verb_that_exists():
    out = subprocess.run([sys.executable, "-m", "safesub_core", "score", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "safesub prompts" in out.stdout
    for option in ("--harmful", "--utility", "--benign", "--edgy", "--convention", "reference=FIELD"):
        assert option in out.stdout, option
    out = subprocess.run([sys.executable, "-m", "safesub_core", "prompts", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--family" in out.stdout and "--csv" in out.stdout


def test_a_device_map_and_a_judge_reach_the_commands_and_bad_ones_are_one_line(tiny_family, tmp_path, capsys):
    from test_judges import make_classifier  # noqa: I001 (a test helper)
    from transformers import AutoTokenizer

    from safesub_core.family import Family

    family = str(tiny_family)
    base = ["--family", family, "--n-prompts", "3", "--variant", "harmful", "--subspace", "topk", "--mode",
            "parallel", "--fracs", "0.5", "--seeds", "1"]
    out = tmp_path / "placed.csv"
    assert main(["sweep", *base, "--device-map", '{"": "cpu"}', "--out", str(out)]) == 0
    whole = tmp_path / "whole.csv"
    assert main(["sweep", *base, "--out", str(whole)]) == 0
    a, b = pd.read_csv(out).iloc[0], pd.read_csv(whole).iloc[0]
    assert a["margin_mean"] == pytest.approx(b["margin_mean"], abs=1e-4)
    capsys.readouterr()
    for extra, message in ((["--device-map", '{"": "cuda:7"}'], "names cuda:7, but this machine has"),
                           (["--device-map", "auto", "--max-memory", "cpu=1KiB"], "max_memory: 0.00 GiB in all"),
                           (["--max-memory", "cpu=1GiB"], "max_memory: needs a device map")):
        assert main(["sweep", *base, *extra, "--out", str(tmp_path / "x.csv")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    tok = AutoTokenizer.from_pretrained(str(Family.from_file(tiny_family).start_checkpoint.path))
    judge = make_classifier(tmp_path / "judge", tok, id2label={0: "safe", 1: "unsafe"},
                            label2id={"safe": 0, "unsafe": 1})
    assert main(["sweep", *base, "--judge", "hf-classifier", "--judge-path", judge, "--out", str(out)]) == 2
    assert "needs --scores generate" in capsys.readouterr().err
    assert main(["sweep", *base, "--scores", "generate", "--judge", "hf-classifier", "--judge-path", judge,
                 "--out", str(out)]) == 0
    row = pd.read_csv(out).iloc[0]
    assert 1 <= row["gen_judge_mean"] <= 5 and row["gen_judge_mean_n"] == 3
    assert main(["sweep", *base, "--scores", "generate", "--judge", "hf-classifier", "--judge-path", judge,
                 "--out", str(tmp_path / "judge" / "config.json")]) == 2
    assert "judge model folder" in capsys.readouterr().err


def test_findings_pass_the_judge_to_the_generation_scores(tiny_family, tmp_path):
    from test_judges import make_classifier  # noqa: I001
    from transformers import AutoTokenizer

    from safesub_core.cache import DiskCache
    from safesub_core.family import Family
    from safesub_core.findings import experiments
    from safesub_core.prompts import EvalSets
    from safesub_core.scoring import Judge
    from safesub_core.session import FamilySession

    family = Family.from_file(tiny_family)
    tok = AutoTokenizer.from_pretrained(str(family.start_checkpoint.path))
    judge = Judge(kind="hf-classifier", path=make_classifier(tmp_path / "judge", tok, id2label={0: "safe", 1: "unsafe"},
                                                             label2id={"safe": 0, "unsafe": 1}))
    S = FamilySession(family, sets=EvalSets.default(3), batch=3, cache=DiskCache(tmp_path / "cache"))
    refs = experiments.reference_scores(S, 8, judge=judge)
    assert (refs["gen_judge_mean_n"] == 3).all() and refs["gen_judge_mean"].between(1, 5).all()
    assert "gen_judge_mean" not in experiments.reference_scores(S, 8)
