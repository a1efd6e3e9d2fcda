"""The `hypotheses` verb (issue 18): the refusal direction, SafeLoRA, the bridge and the harm-utility trade-off of a
variant written as CSVs and a chart, bad input in one line, and the method's model exported."""
import pandas as pd
import pytest

from factories import write_family
from safesub_core.cli import main

SMALL = ["--ranks", "0.5", "--taus", "0.5", "--strengths", "1", "--seeds", "1", "--waves", "1"]
FILES = ("selection.csv", "safelora.csv", "bridge.csv", "shift.csv", "tradeoff.csv", "matched.csv", "tradeoff.html")


@pytest.fixture(scope="module")
def family_file(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("fam"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variant", "nope"], "no fine-tuned variant 'nope'"),
        (["--variant", "useful", "--taus", "2"], "SafeLoRA tau 2: must be in [0, 1]"),
        (["--variant", "useful", "--ranks", "1.5"], "rank fraction 1.5"),
        (["--variant", "useful", "--waves", "some"], "expected a whole number"),
        (["--variant", "useful", "--export-method", "safelora", "--value", "0.5"], "go together"),
        (["--variant", "useful", "--utility-score", "bleu"], "invalid choice: 'bleu'"),
    ],
)
def test_bad_input_is_one_line_with_status_2_and_writes_nothing(family_file, tmp_path, extra, message, capsys):
    out = tmp_path / "hyp"
    assert main(["hypotheses", "--family", str(family_file), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_out_inside_a_checkpoint_is_refused(family_file, capsys):
    out = family_file.parent / "aligned" / "hyp"
    assert main(["hypotheses", "--family", str(family_file), "--variant", "useful", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --out folder") and "an input of this command" in err[-1]
    assert not out.exists()


@pytest.mark.slow
def test_hypotheses_writes_every_table_with_intervals_and_verdicts(tiny_family, tmp_path, capsys):
    out, exported = tmp_path / "hyp", tmp_path / "model"
    assert main(["hypotheses", "--family", str(tiny_family), "--variant", "contaminated", "--out", str(out), *SMALL,
                 "--export-method", "orthogonalisation", "--value", "1", "--export-dir", str(exported)]) == 0
    printed = capsys.readouterr().out
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    trade = pd.read_csv(out / "tradeoff.csv")
    for score in ("harm", "utility"):
        assert {score, f"{score}_lo", f"{score}_hi", f"{score}_n"} <= set(trade.columns)
        assert (trade[f"{score}_lo"] <= trade[score] + 1e-12).all() and (trade[score] <= trade[f"{score}_hi"] + 1e-12).all()
        assert (trade[f"{score}_n"] > 0).all()
    # Top-K and one Random draw at one rank, SafeLoRA at one tau, ablation and orthogonalisation at one strength,
    # and the two reference models
    assert len(trade) == 2 + 1 + 2 + 2
    assert set(trade["method"]) >= {"Top-K", "Random (draw 0)", "SafeLoRA", "Refusal ablation", "Orthogonalisation",
                                    "aligned (reference)", "contaminated (reference)"}
    matched = pd.read_csv(out / "matched.csv")
    assert {"harm_lo", "harm_hi", "harm_n", "utility_lo", "utility_hi", "utility_n", "p_vs_best", "verdict",
            "utility_vs_floor"} <= set(matched.columns)
    assert len(matched) and set(matched["verdict"]) <= {"lowest harm", "higher harm", "inconclusive"}
    sel = pd.read_csv(out / "selection.csv")
    assert sel["chosen"].sum() == 1 and {"layer", "position", "bypass", "induce", "kl", "passed"} <= set(sel.columns)
    assert {"similarity", "tensor"} <= set(pd.read_csv(out / "safelora.csv").columns)
    assert {"k", "captured", "baseline"} <= set(pd.read_csv(out / "bridge.csv").columns)
    assert {"layer", "share", "baseline"} <= set(pd.read_csv(out / "shift.csv").columns)
    html = (out / "tradeoff.html").read_text()
    assert "Plotly.newPlot" in html and "error_y" in html.replace('"error_y"', "error_y")
    chosen = sel[sel["chosen"]].iloc[0]
    assert f"layer {int(chosen['layer'])}, position {int(chosen['position'])}" in printed
    assert "matched utility:" in printed and "[" in printed and "(n=" in printed
    assert any(p.suffix == ".safetensors" for p in exported.iterdir())
    assert (exported / "config.json").is_file()


@pytest.mark.slow
def test_export_folder_not_empty_is_refused_before_work(tiny_family, tmp_path, capsys):
    exported = tmp_path / "model"
    exported.mkdir()
    (exported / "x").write_text("x")
    out = tmp_path / "hyp"
    assert main(["hypotheses", "--family", str(tiny_family), "--variant", "contaminated", "--out", str(out), *SMALL,
                 "--export-method", "safelora", "--value", "0.5", "--export-dir", str(exported)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()
