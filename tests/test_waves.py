"""Live scores in waves: the parts each wave scores, the summaries' intervals and the paired tests."""
import math

import pandas as pd
import pytest
from scipy import stats as sps

from safesub_core.errors import SafesubError
from safesub_core.prompts import EvalSets, PromptSet
from safesub_core.scoring import names as N
from safesub_core.stats import mcnemar, mean_interval, paired_bootstrap, rate_interval
from safesub_core.waves import Waves, generation_summary, paired, summarise


def _sets(n_h=7, n_u=3, n_b=5) -> EvalSets:
    ps = lambda name, n, kind, refs=False: PromptSet(name, [f"{name} {i}" for i in range(n)],
                                                      [str(i) for i in range(n)] if refs else None, kind)
    return EvalSets(harmful=ps("h", n_h, "harmful"), utility=ps("u", n_u, "math", refs=True),
                    benign=ps("b", n_b, "benign"), edgy=ps("e", 2, "edgy"))


def test_waves_cover_every_prompt_once_and_stop_when_the_longest_set_is_exhausted():
    w = Waves(_sets(), 3)
    assert w.count == 3  # 7 harmful prompts in waves of 3
    harmful = [p for b in range(w.count) for p in w.part("harmful", b).prompts]
    assert harmful == list(_sets().harmful.prompts)
    assert w.part("utility", 0).references == ("0", "1", "2") and w.part("utility", 1) is None
    assert w.key(2)["utility"] is None and w.key(2)["harmful"] == w.part("harmful", 2).content_hash
    # a wave's key is its own prompts' content: the same prompts in another set give the same key
    longer = Waves(EvalSets(_sets(n_h=9).harmful, *(getattr(_sets(), r) for r in ("utility", "benign", "edgy"))), 3)
    assert longer.key(0) == w.key(0) and longer.count == 3
    with pytest.raises(SafesubError, match="live wave 3: the sets have 3 waves of 3 prompts"):
        w.key(3)
    with pytest.raises(SafesubError, match="live prompts per wave 0"):
        Waves(_sets(), 0)


def test_summaries_carry_wilson_and_bootstrap_intervals_with_n():
    margins, nll = [-1.0, 2.0, 0.5, -0.25, 3.0], [0.2, 0.4, 0.1]
    s = summarise({N.MARGIN: margins, N.NLL: nll, N.CORRECT: [True, False, True]})
    assert s[N.MARGIN_MEAN] == pytest.approx(sum(margins) / 5) and s[f"{N.MARGIN_MEAN}_n"] == 5
    m = mean_interval(margins)
    assert (s[f"{N.MARGIN_MEAN}_lo"], s[f"{N.MARGIN_MEAN}_hi"]) == (m.lo, m.hi)
    ci = sps.binomtest(2, 5).proportion_ci(method="wilson")  # share of prompts predicted to comply (log-odds < 0)
    assert s[N.SHARE_MARGIN_NEGATIVE] == 0.4
    assert s[f"{N.SHARE_MARGIN_NEGATIVE}_lo"] == pytest.approx(ci.low)
    assert s[f"{N.SHARE_MARGIN_NEGATIVE}_hi"] == pytest.approx(ci.high)
    assert s[N.ARITH_EXACT_MATCH] == pytest.approx(2 / 3) and s[f"{N.ARITH_EXACT_MATCH}_n"] == 3
    assert N.KL_TO_START not in s  # no benign values, no KL


def test_paired_uses_mcnemar_for_rates_and_the_bootstrap_for_means_and_keeps_the_largest_p_over_draws():
    a = {N.MARGIN: [1.0, 2.0, -1.0, 3.0, 0.5, 1.5], N.CORRECT: [True] * 6}
    b1 = {N.MARGIN: [-1.0, -2.0, -1.5, -0.5, -3.0, -1.0], N.CORRECT: [False] * 6}
    b2 = {N.MARGIN: [1.0, 2.1, -1.0, 3.0, 0.4, 1.5], N.CORRECT: [True] * 5 + [False]}
    one = paired(a, b1)
    assert one[f"p_{N.MARGIN_MEAN}"] == paired_bootstrap(a[N.MARGIN], b1[N.MARGIN]).p
    assert one[f"p_{N.ARITH_EXACT_MATCH}"] == mcnemar(a[N.CORRECT], b1[N.CORRECT]).p == pytest.approx(2 / 64)
    assert one[f"p_{N.SHARE_MARGIN_NEGATIVE}"] == mcnemar([m < 0 for m in a[N.MARGIN]],
                                                         [m < 0 for m in b1[N.MARGIN]]).p
    both = paired(a, [b1, b2])
    assert both[f"p_{N.ARITH_EXACT_MATCH}"] == 1.0  # the second draw does not differ: no claim
    with pytest.raises(SafesubError, match="the same prompts"):
        paired(a, {N.MARGIN: [1.0]})


def test_generation_summary_gives_each_rate_its_interval_by_role():
    table = pd.DataFrame({
        "role": ["harmful"] * 4 + ["utility"] * 2 + ["edgy"] * 3,
        N.REFUSED: [True, True, False, True, None, None, False, False, True],
        N.CORRECT: [None] * 4 + [True, False] + [None] * 3,
    })
    s = generation_summary(table)
    refusal = rate_interval(3, 4)
    assert (s[N.REFUSAL_RATE], s[f"{N.REFUSAL_RATE}_lo"], s[f"{N.REFUSAL_RATE}_n"]) == (0.75, refusal.lo, 4)
    assert s[N.ATTACK_SUCCESS_RATE] == 0.25 and s[f"{N.ATTACK_SUCCESS_RATE}_hi"] == pytest.approx(1 - refusal.lo)
    assert s[N.EXACT_MATCH] == 0.5 and s[f"{N.EXACT_MATCH}_n"] == 2
    assert s[N.OVERREFUSAL_RATE] == pytest.approx(1 / 3) and s[f"{N.OVERREFUSAL_RATE}_n"] == 3
    assert N.JUDGE_MEAN not in s
    judged = generation_summary(table.assign(**{N.JUDGE: [1.0, 5.0, math.nan, 2.0] + [math.nan] * 5}))
    assert judged[N.JUDGE_MEAN] == pytest.approx(8 / 3) and judged[f"{N.JUDGE_MEAN}_n"] == 3
