"""The competing hypotheses inside a session (safesub_core/hypotheses.py): method points scored on the models they
name, nothing left attached afterwards, the direction's prompts and cache, the bridge, SafeLoRA in a coarse dtype,
and the matched-utility verdicts."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from safesub_core import refusal, safelora, scoring
from safesub_core.cache import DiskCache
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.hypotheses import (MethodPoint, TradeoffGrid, direction_prompts, matched_utility, point_of,
                                     tradeoff)
from safesub_core.interventions import directional_ablation, orthogonalized, orthogonalized_weights
from safesub_core.projection import ProjectionConfig
from safesub_core.prompts import EvalSets
from safesub_core.session import FamilySession
from tests.factories import random_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(tiny_family, tmp_path_factory):
    sets = EvalSets.default(n=8)
    return FamilySession(Family.from_file(tiny_family), sets=sets, batch=8,
                         cache=DiskCache(tmp_path_factory.mktemp("hyp_cache")))


def _margins(S, model) -> list[float]:
    return scoring.refusal_logodds(model, S.tokenizer, S.sets.harmful.prompts, S.openings, chat=S.format).tolist()


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_method_points_are_validated_in_one_line():
    for bad in (lambda: MethodPoint("lobotomy", 1.0), lambda: MethodPoint("safelora", 1.5),
                lambda: MethodPoint("ablation", float("nan")), lambda: MethodPoint("safelora", 0.5, source="aligned")):
        with pytest.raises(SafesubError) as e:
            bad()
        assert "\n" not in str(e.value)
    assert MethodPoint("ablation", 1).value == 1.0 and isinstance(MethodPoint("ablation", 1).value, float)


def test_direction_prompts_are_train_splits_disjoint_from_the_scored_sets(session):
    dp = direction_prompts(EvalSets.default())
    scored = set(EvalSets.default().harmful.prompts) | set(EvalSets.default().benign.prompts)
    parts = [dp.fit_harmful, dp.fit_harmless, dp.val_harmful, dp.val_harmless]
    assert all(len(p) > 0 for p in parts)
    assert not scored & {q for p in parts for q in p.prompts}
    assert not set(dp.fit_harmful.prompts) & set(dp.val_harmful.prompts)
    assert dp.note == ""


def test_an_ablation_point_scores_the_target_under_ablation_and_leaves_no_hook(session):
    S = session
    sel = S.refusal_selection()
    got = S.live_values("harmful", MethodPoint("ablation", 0.8), waves=1)["margin"]
    model = S.model("harmful")
    assert _hooks(model) == 0
    with directional_ablation(model, sel.direction, 0.8):
        want = _margins(S, model)
    assert got == pytest.approx(want, abs=1e-4)
    plain = S.live_values("harmful", None, waves=1)["margin"]
    assert plain == pytest.approx(_margins(S, model), abs=1e-4)
    assert max(abs(a - b) for a, b in zip(plain, got)) > 1e-3  # the intervention did something


def test_orthogonalisation_on_the_start_model_restores_every_weight_and_scores_like_ablation(session):
    S = session
    before_ref, before_start = _params(S.reference), _params(S.model(S.family.start))
    orth = S.live_values(S.family.start, MethodPoint("orthogonalisation", 1.0), waves=1)["margin"]
    abl = S.live_values(S.family.start, MethodPoint("ablation", 1.0), waves=1)["margin"]
    assert orth == pytest.approx(abl, abs=1e-3)
    S.projected("harmful", ProjectionConfig("topk", "parallel", rank_fraction=0.5))  # releases what was attached
    for name, p in S.reference.named_parameters():
        assert torch.equal(p, before_ref[name]), name
    assert all(torch.equal(p, before_start[n]) for n, p in S.model(S.family.start).named_parameters())


def test_orthogonalized_context_restores_a_tied_model():
    model = random_model(3, tie_word_embeddings=True)
    before = _params(model)
    r = torch.randn(model.config.hidden_size)
    want = orthogonalized_weights(model, r, 0.7)
    with orthogonalized(model, r, 0.7):
        got = dict(model.named_parameters(remove_duplicate=False))
        for name, w in want.items():
            assert torch.allclose(got[name], w, atol=1e-6), name
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        assert not torch.equal(model.get_input_embeddings().weight, before["model.embed_tokens.weight"])
        assert torch.equal(model.get_output_embeddings().weight, before["model.embed_tokens.weight"])
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_safelora_point_composes_the_plan_and_a_projection_after_it_is_exact(session):
    S = session
    plan = S.safelora_plan("harmful", 0.6)
    S.point_scores("harmful", MethodPoint("safelora", 0.6), waves=1)
    ref = dict(S.reference.named_parameters())
    for name, p in S.working.named_parameters():
        assert torch.allclose(p, ref[name] + plan.update(name), atol=1e-6), name
    S.point_scores("harmful", MethodPoint("safelora", 0.2), waves=1)  # a move: only changed tensors rewritten
    plan2 = S.safelora_plan("harmful", 0.2)
    for name, p in S.working.named_parameters():
        assert torch.allclose(p, ref[name] + plan2.update(name), atol=1e-6), name
    cfg = ProjectionConfig("topk", "orthogonal", rank_fraction=0.25)
    fresh = FamilySession(S.family, sets=S.sets, batch=8, cache=DiskCache(S.cache.root))
    want = _params(fresh.projected("harmful", cfg))
    for name, p in S.projected("harmful", cfg).named_parameters():
        assert torch.allclose(p, want[name], atol=1e-6), name


def test_safelora_in_bfloat16_applies_the_update_exactly(session):
    S = session
    plan = S.safelora_plan("harmful", 0.6)
    from safesub_core.loading import load_model
    from safesub_core.precision import composed_state_dict
    ck = S.family.start_checkpoint
    work = load_model(ck, S.family, "cpu", torch.bfloat16, tokenizer=False)[0]
    start = load_model(ck, S.family, "cpu", torch.bfloat16, tokenizer=False)[0]
    safelora.apply(work, start, plan)
    composed = composed_state_dict(work)
    for name, p in start.named_parameters():
        want = plan.update(name)
        if want.norm() == 0:
            continue
        got = composed[name] - p.detach().float()
        assert float((got - want).norm() / want.norm()) < 1e-3, name


def test_method_scores_are_cached_under_the_direction_and_a_new_session_reads_them(session, monkeypatch):
    S = session
    point = MethodPoint("ablation", 0.5)
    first = S.point_scores("harmful", point, waves=1)
    again = FamilySession(S.family, sets=S.sets, batch=8, cache=DiskCache(S.cache.root))

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(refusal, "select_direction", boom)
    monkeypatch.setattr(refusal, "candidate_directions", boom)
    assert again.point_scores("harmful", point, waves=1, compute=False)["margin_mean"] == first["margin_mean"]
    assert again.refusal_selection().layer == S.refusal_selection().layer
    parts = S._key("harmful", point)
    assert parts["direction"][1:] == [S.refusal_selection().layer, S.refusal_selection().position]


def test_bridge_table_equals_a_direct_computation(session):
    S = session
    table = S.bridge_table("harmful")
    sel = S.refusal_selection()
    engine = S.engine("harmful")
    name = table["tensor"].iloc[0]
    U = engine.tensor(engine.names.index(name)).U.double()
    r = sel.direction.double()
    for _, row in table[table["tensor"] == name].iterrows():
        k = int(row["k"])
        assert row["captured"] == pytest.approx(float((U[:, :k].T @ r).pow(2).sum()), rel=1e-9)
        assert row["baseline"] == pytest.approx(k / r.numel())
    assert set(table["module"]) <= {"o", "down"}


def test_tradeoff_rows_and_matched_utility_on_the_session(session):
    S = session
    grid = TradeoffGrid(ranks=(0.5,), taus=(0.5,), strengths=(1.0,), seeds=(0,))
    table = tradeoff(S, "harmful", grid, waves=1)
    assert list(table["method"]) == ["Top-K", "Random (draw 0)", "SafeLoRA", "Refusal ablation", "Orthogonalisation",
                                     "aligned (reference)", "harmful (reference)"]
    assert (table["harm_n"] == len(S.sets.harmful)).all()
    assert ((table["harm_lo"] <= table["harm"]) & (table["harm"] <= table["harm_hi"])).all()
    assert isinstance(point_of(table.iloc[2]), MethodPoint) and point_of(table.iloc[5]) is None
    matched = matched_utility(S, "harmful", table, tolerance=1.0)
    assert set(matched["verdict"]) <= {"lowest harm", "higher harm", "inconclusive"}
    assert list(matched["harm"]) == sorted(matched["harm"])


class _Values:
    """A stand-in session for `matched_utility`'s paired tests: per-prompt harm outcomes per point."""

    def __init__(self, outcomes: dict, n_waves: int = 1):
        self.outcomes, self.waves = outcomes, type("W", (), {"count": n_waves})()

    def live_values(self, target, point, seed=None, waves=None):
        key = target if point is None else (point.method if isinstance(point, MethodPoint) else point.subspace)
        return {"margin": [(-1.0 if x else 1.0) for x in self.outcomes[key]]}


def _table(rows):
    cols = ["method", "knob", "value", "seed", "kind", "subspace", "mode", "method_id", "utility_score", "harm",
            "utility"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows])


def test_matched_utility_calls_a_winner_only_when_every_paired_test_agrees():
    n = 60
    comply_ft, comply_a, comply_b = [1] * n, [1] * 10 + [0] * 50, [1] * 12 + [0] * 48
    rows = [("Top-K", "rank fraction", 0.5, None, "projection", "topk", "orthogonal", "", "arith_exact_match",
             10 / n, 0.5),
            ("SafeLoRA", "tau", 0.5, None, "method", "", "", "safelora", "arith_exact_match", 12 / n, 0.5),
            ("SafeLoRA", "tau", 0.9, None, "method", "", "", "safelora", "arith_exact_match", 0.0, 0.1),
            ("harmful (reference)", "", None, None, "checkpoint", "", "", "harmful", "arith_exact_match", 1.0, 0.5)]
    S = _Values({"topk": comply_a, "safelora": comply_b, "harmful": comply_ft})
    out = matched_utility(S, "harmful", _table(rows), tolerance=0.05)
    assert list(out["method"]) == ["Top-K", "SafeLoRA"]  # tau 0.9 lost too much utility
    assert out["value"].tolist() == [0.5, 0.5]
    assert out["verdict"].tolist() == ["inconclusive", "inconclusive"]  # two prompts apart: no claim
    S.outcomes["safelora"] = [1] * 40 + [0] * 20
    rows[1] = rows[1][:9] + (40 / n, 0.5)
    out = matched_utility(S, "harmful", _table(rows), tolerance=0.05)
    assert out["verdict"].tolist() == ["lowest harm", "higher harm"] and out["p_vs_best"].iloc[1] < 0.05
    with pytest.raises(SafesubError):
        matched_utility(S, "useful", _table(rows))


def test_direction_prompts_follow_the_sources_of_sets_built_without_specs():
    from safesub_core.prompts import load_set

    sets = EvalSets(harmful=load_set("harmbench:eval").head(8), utility=EvalSets.default().utility,
                    benign=load_set("pairs-benign:eval").head(8), edgy=EvalSets.default().edgy)
    dp = direction_prompts(sets)
    assert dp.fit_harmful.name.startswith("harmbench:train") and dp.fit_harmless.name.startswith("pairs-benign:train")
    assert dp.note == ""
    own = EvalSets(harmful=sets.harmful.__class__(name="mine.jsonl", prompts=("a b c d",) * 4, kind="harmful"),
                   utility=sets.utility, benign=sets.benign, edgy=sets.edgy)
    assert "builtin-harmful:train" in direction_prompts(own).note
