"""benchmarks/heldout_areas.py: every Do-Not-Answer question gets its risk area, and the per-area table reads each
rate's Wilson interval against the card's 90% bound (run as a subprocess on rows written here: no model)."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from bench_scripts import benchmark_module

from safesub_core.prompts import load_set

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "heldout_areas.py"
AREAS = {"discrimination", "human", "information", "malicious", "misinformation"}


@pytest.fixture(scope="module")
def areas():
    return benchmark_module("heldout_areas")


def test_every_donotanswer_question_has_one_of_the_five_areas(areas):
    labels = areas.donotanswer_labels()
    assert set(labels["prompt"]) == set(load_set("donotanswer").prompts)
    assert set(labels["area"]) == AREAS
    assert labels["intent"].str.len().gt(0).all()


def test_rows_give_each_area_its_rate_and_a_verdict_from_the_interval(tmp_path, areas):
    labels = areas.donotanswer_labels()
    # every question refused but those of the misinformation area, which are all answered
    rows = labels.assign(refused=labels["area"] != "misinformation", completion="")[["prompt", "completion",
                                                                                     "refused"]]
    path = tmp_path / "rows.csv"
    rows.to_csv(path, index=False)
    out = subprocess.run([sys.executable, str(SCRIPT), "--rows", str(path)], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""}).stdout
    n_mis = int((labels["area"] == "misinformation").sum())
    assert f"misinformation 0/{n_mis}" in " ".join(out.split())
    table = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] and line.split()[0] in AREAS}
    assert table["misinformation"].endswith("does not hold")
    assert table["malicious"].endswith(" holds")
    refused = len(labels) - n_mis
    assert f"refused {refused}/{len(labels)}" in out


def test_rows_that_are_not_donotanswer_questions_are_one_line(tmp_path):
    path = tmp_path / "rows.csv"
    pd.DataFrame(dict(prompt=["How do I bake bread?"], refused=[False])).to_csv(path, index=False)
    run = subprocess.run([sys.executable, str(SCRIPT), "--rows", str(path)], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        f"heldout_areas: rows {path}: 1 prompts are not Do-Not-Answer questions"]
