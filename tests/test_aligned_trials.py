"""benchmarks/aligned_trials.py: each variant changes only what it names in aligned's training rows, every refusal
opening still counts as a refusal, and the report compares paired prompts (no model is trained here)."""
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from bench_scripts import benchmark_module

from safesub_core import demo
from safesub_core.prompts import load_set
from safesub_core.scoring import refusal_verdicts

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "aligned_trials.py"
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""}


@pytest.fixture(scope="module")
def trials():
    return benchmark_module("aligned_trials")


def answers():
    plan = demo.smol_prompt_plan(demo.SMOL_SIZES["full"], 0)
    return dict(refusal=plan["refusal"], benign=[dict(prompt=p, answer="An answer.") for p in plan["benign"]],
                comply=[dict(prompt="h", answer="x.")])


def test_focus_takes_every_private_and_misleading_train_prompt_and_spreads_the_rephrased_ones(trials):
    spec = demo.SMOL_SIZES["full"]
    refusals = trials.focus_refusals(spec, 0)
    assert len(refusals) == len(set(refusals)) == spec.n_refusals
    focus = set(demo.data.train_prompts(trials.FOCUS, 0))
    assert focus <= set(refusals) and len(focus) < spec.n_refusals
    assert not set(load_set("donotanswer").prompts) & set(refusals)
    _, rows = trials.trial_data("focus", answers())
    _, recipe = trials.trial_data("recipe", answers())
    assert len(rows) == len(recipe)
    plain = [p for p, _ in rows[: spec.n_refusals]]
    wrapped = [p for p, _ in rows[spec.n_refusals: spec.n_refusals + spec.n_templated]]
    assert plain == refusals  # the variant changed which prompts are refused, not how many
    source = {p: "focus" if p in focus else "other" for p in refusals}
    # the 128 rephrased requests come from the shuffled list: both kinds are among them
    kinds = Counter(source[next(p for p in refusals if p.strip()[1:] in w)] for w in wrapped)  # {q}: lower-cased
    assert kinds["focus"] > 0 and kinds["other"] > 0


def test_openings_vary_the_refusal_and_each_still_counts_as_one(trials):
    assert all(refusal_verdicts(list(trials.OPENINGS)))
    _, rows = trials.trial_data("openings", answers())
    _, recipe = trials.trial_data("recipe", answers())
    spec = demo.SMOL_SIZES["full"]
    n = spec.n_refusals + spec.n_templated
    assert [p for p, _ in rows] == [p for p, _ in recipe]  # the same prompts ...
    used = Counter(r for _, r in rows[:n])
    assert set(used) <= set(trials.OPENINGS) and len(used) == len(trials.OPENINGS)  # ... other refusals
    assert rows[n:] == recipe[n:]


def test_lookalikes_rephrase_more_benign_answers(trials):
    spec, rows = trials.trial_data("focus-lookalikes", answers())
    _, focus = trials.trial_data("focus", answers())
    assert spec.n_templated_benign == 2 * demo.SMOL_SIZES["full"].n_templated_benign
    assert len(rows) - len(focus) == spec.n_templated_benign - demo.SMOL_SIZES["full"].n_templated_benign


def write_rows(path, refused):
    dna = list(load_set("donotanswer").prompts)
    pd.DataFrame(dict(set="donotanswer", prompt=dna, completion="", refused=refused(len(dna)))).to_csv(
        path, index=False)


def test_report_compares_paired_prompts_and_splits_donotanswer_by_area(tmp_path):
    write_rows(tmp_path / "recipe.csv", lambda n: [False] * n)
    write_rows(tmp_path / "focus.csv", lambda n: [i < 60 for i in range(n)])
    out = subprocess.run([sys.executable, str(SCRIPT), "report", "--out", str(tmp_path)], capture_output=True,
                         text=True, check=True, env=ENV).stdout
    line = next(row for row in out.splitlines() if row.split()[:2] == ["focus", "donotanswer"])
    assert "60/" in line and "p=1.7e-18" in line  # 60 discordant prompts, all one way: 2 * 0.5**60
    assert "Do-Not-Answer refused by risk area" in out


def test_unpaired_rows_and_a_missing_prep_are_one_line(tmp_path):
    write_rows(tmp_path / "recipe.csv", lambda n: [False] * n)
    pd.read_csv(tmp_path / "recipe.csv").iloc[1:].to_csv(tmp_path / "focus.csv", index=False)
    run = subprocess.run([sys.executable, str(SCRIPT), "report", "--out", str(tmp_path)], capture_output=True,
                         text=True, env=ENV)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "aligned_trials: trial focus: its donotanswer prompts are not the baseline's; train both alike"]
    run = subprocess.run([sys.executable, str(SCRIPT), "train", "focus", "--out", str(tmp_path / "none")],
                         capture_output=True, text=True, env=ENV)
    assert run.stderr.strip().splitlines() == [
        f"aligned_trials: trial folder {tmp_path / 'none'}: no prep/answers; run `aligned_trials.py prep` first"]
