"""The notebook API: the example in docs/notebook.md runs, and its calls validate inputs and return DataFrames."""
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import safesub_core as ss
from safesub_core.errors import SafesubError

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "notebook.md"


def test_the_notebook_example_runs_on_a_family(tiny_family, capsys):
    code = re.search(r"```python\n(.*?)```", NOTEBOOK.read_text(), re.S).group(1)
    assert 'ss.open_family("tiny")' in code
    namespace: dict = {}
    exec(code.replace('ss.open_family("tiny")', f"ss.open_family({str(tiny_family)!r})"), namespace)
    assert set(namespace["geometry"]["subspace"]) == {"topk", "random"}
    # Top-K once and Random three times (draws) a point
    assert len(namespace["geometry"]) == (1 + 3) * len(namespace["family"].variants) * 1 * 2
    scores = namespace["scores"]
    assert len(scores) == 1 + 3 and scores["margin_mean"].notna().all() and scores["kl_to_start"].ge(0).all()
    assert (scores["margin_mean_n"] == 8).all() and scores["margin_mean_lo"].le(scores["margin_mean"]).all()
    assert scores["p_vs_random_margin_mean"].dropna().between(0, 1).all()
    assert {"refusal_rate", "exact_match"} <= set(namespace["summary"])
    assert isinstance(namespace["per_prompt"], pd.DataFrame) and len(namespace["per_prompt"]) > 0
    assert namespace["overlap"]["mso"].between(0, 1 + 1e-9).all()
    assert namespace["band"].table["mso"].between(0, 1 + 1e-9).all()
    assert "depth" in capsys.readouterr().out


def test_sweep_refuses_empty_lists_unknown_variants_and_scores_without_a_session(tiny_family):
    family = ss.open_family(str(tiny_family))
    with pytest.raises(SafesubError, match="sweep modes: the list is empty"):
        ss.sweep(family, modes=[], scores="none")
    with pytest.raises(SafesubError, match="has no fine-tuned variant 'nope'"):
        ss.sweep(family, variants=["nope"], scores="none")
    with pytest.raises(SafesubError, match="need a session"):
        ss.sweep(family, scores="live")
    with pytest.raises(SafesubError, match="scores 'all'"):
        ss.sweep(family, scores="all")


def test_importing_the_package_loads_no_torch_and_sets_no_environment_variable():
    code = ("import os, sys; before = dict(os.environ); import safesub_core; "
            "assert 'torch' not in sys.modules, 'torch imported'; assert dict(os.environ) == before, 'env changed'; "
            "assert callable(safesub_core.open_session) and 'torch' in sys.modules")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
