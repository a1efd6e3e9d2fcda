"""benchmarks/gpu_check.sh's logic without a GPU: its dry run (GPU_CHECK_DRY=1: the same stages on the CPU with tiny
shapes) prints the table with every row and writes it to $OUT with the JSON; a stage cut short by its time limit
still gets its rows, saying so. Slow (three Python processes that import torch and transformers)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SHAPE_ROWS = ("slider move, forward read-outs", "baseline, same run", "first point", "peak GPU memory",
              "applied-update error before", "applied-update error after", "alignment_basis of one")


def run_check(out: Path, timeout: int, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, GPU_CHECK_DRY="1", OUT=str(out), OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def shape_row(rows: dict, shape: str, what: str) -> list[str]:
    found = [v for k, v in rows.items() if k.startswith(f"{shape}-shaped") and what in k]
    assert len(found) == 1, (shape, what, list(rows))
    return found[0]


@pytest.mark.timeout(600)
def test_dry_run_prints_every_row_and_writes_the_results(tmp_path):
    done = run_check(tmp_path, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table_rows(done.stdout)
    assert (tmp_path / "table.md").read_text() in done.stdout
    for label in ("machine", "GPU", "torch", "`pytest -m gpu`", "stage `tests` wall", "stage `1b` wall",
                  "stage `8b` wall"):
        assert label in rows, (label, list(rows))
    assert rows["`pytest -m gpu`"][2] == "skipped (dry run)"
    for shape in ("1b", "8b"):
        for what in SHAPE_ROWS:
            figure, target, result = shape_row(rows, shape, what)
            assert "timed out" not in figure and "failed" not in figure and result != "FAIL", (shape, what, figure)
        assert shape_row(rows, shape, "applied-update error after")[2] == "pass"
    assert shape_row(rows, "8b", "slider move")[1] == "<= 1 s"
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["dry"] is True and set(results["stages"]) == {"tests", "1b", "8b"}
    move = results["benches"]["8b"]["tiny"]["move"]
    assert move["update_error_before_worst"] > 0.1 > move["update_error_after_median"]
    assert len(move["moves"]) == 2 and all(m["finite"] for m in move["moves"])


@pytest.mark.timeout(300)
def test_a_stage_out_of_time_still_gets_its_rows(tmp_path):
    done = run_check(tmp_path, timeout=240, GPU_CHECK_STAGES="8b", GPU_CHECK_T_8B="2")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table_rows(done.stdout)
    for what in SHAPE_ROWS:
        assert shape_row(rows, "8b", what)[0] == "timed out"
    assert shape_row(rows, "8b", "slider move")[2] == "FAIL"
    assert rows["`pytest -m gpu`"][0] == "not run" and rows["stage `1b` wall"][0] == "not run"
    assert rows["stage `8b` wall"][0].endswith("(exit 124)")
