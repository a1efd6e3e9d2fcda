"""The session on the trained tiny family: live scores follow the projection, and the study's starting behaviour."""
import copy
import math

import pytest
import torch

from safesub_core import scoring
from safesub_core.cache import DiskCache
from safesub_core.family import Family
from safesub_core.errors import SafesubError
from safesub_core.compute import CPU_LIVE_PROMPTS, live_prompts, resident_budget
from safesub_core.projection import ProjectionConfig
from safesub_core.prompts import EvalSets
from safesub_core.session import FamilySession
from safesub_core.sweeps import P_PREFIX, sweep
from safesub_core.waves import summarise
from safesub_core.subspace import DEFAULT_RESIDENT_BYTES

pytestmark = pytest.mark.slow
SETS, BATCH = EvalSets.default(16), 16  # one wave of the first 16 prompts of each eval split


@pytest.fixture(scope="module")
def session(tiny_family, tmp_path_factory):
    return FamilySession(Family.from_file(tiny_family), sets=SETS, batch=BATCH,
                         cache=DiskCache(tmp_path_factory.mktemp("cache")))


def test_refusal_log_odds_sign_aligned_refuses_and_harmful_complies(session):
    prompts = session.sets.harmful.prompts
    aligned = scoring.refusal_logodds(session.model("aligned"), session.tokenizer, prompts, session.openings)
    harmful = scoring.refusal_logodds(session.model("harmful"), session.tokenizer, prompts, session.openings)
    assert aligned.mean() > 0, "the aligned model should lean to a refusal opening on harmful prompts"
    assert harmful.mean() < 0, "the harmful fine-tune should lean away from every refusal opening"


def test_point_at_alpha_zero_is_the_start_model_and_full_orthogonal_rank_one_is_nearly_the_fine_tune(session):
    start = session.checkpoint_scores("aligned")
    zero = session.point_scores("harmful", ProjectionConfig("topk", "parallel", 0.5, alpha=0.0))
    for key in ("margin_mean", "nll_mean", "arith_exact_match"):
        assert zero[key] == pytest.approx(start[key], abs=1e-5)
    assert zero["kl_to_start"] == pytest.approx(0.0, abs=1e-6)
    ft = session.checkpoint_scores("harmful")
    # orthogonal at the smallest rank keeps almost all of the task update, so behaves almost like the fine-tune
    low = session.point_scores("harmful", ProjectionConfig("topk", "orthogonal", 0.01))
    assert low["energy_kept"] > 0.5
    assert abs(low["margin_mean"] - ft["margin_mean"]) < abs(zero["margin_mean"] - ft["margin_mean"])


def test_live_scores_move_with_the_rank_and_are_cached(session):
    a = session.point_scores("harmful", ProjectionConfig("topk", "parallel", 0.05))
    b = session.point_scores("harmful", ProjectionConfig("topk", "parallel", 0.75))
    assert b["energy_kept"] > a["energy_kept"]
    assert a["margin_mean"] != b["margin_mean"]
    again = session.point_scores("harmful", ProjectionConfig("topk", "parallel", 0.05))
    assert again == a
    entries = session.cache.info().set_index("namespace")["entries"]
    assert entries["live_forward"] >= 2 and entries["live_decoded"] >= 2


def test_working_model_matches_an_explicit_composition(session):
    cfg = ProjectionConfig("random", "opposite", 0.3, alpha=2.0)
    model = session.projected("useful", cfg)
    engine = session.engine("useful")
    ref = dict(session.reference.named_parameters())
    for t, k in list(zip(engine.tensors, engine.ranks(cfg).tolist()))[:5]:
        expected = ref[t.name] + 2.0 * t.kept_update(cfg, k)
        assert torch.allclose(dict(model.named_parameters())[t.name], expected, atol=1e-6)


def test_generation_scores_give_a_per_prompt_table(session):
    summary, table = session.generation_scores("aligned", max_new_tokens=16)
    assert set(table["set"]) == {s.name for s in (session.sets.harmful, session.sets.utility, session.sets.edgy)}
    assert set(table["role"]) == {"harmful", "utility", "edgy"}
    harm = table[table["role"] == "harmful"]
    assert summary["refusal_rate"] == pytest.approx(harm["refused"].mean())
    assert summary["refusal_rate_n"] == len(session.sets.harmful)
    assert summary["refusal_rate_lo"] <= summary["refusal_rate"] <= summary["refusal_rate_hi"]
    assert summary["attack_success_rate"] == pytest.approx(1 - summary["refusal_rate"])
    assert 0 <= summary["exact_match"] <= 1 and 0 <= summary["overrefusal_rate"] <= 1
    again = session.generation_scores("aligned", max_new_tokens=16)
    assert again[0] == summary


def test_activation_states_are_cached_and_deterministic(session):
    s1 = session.states("aligned", session.sets.harmful)
    s2 = session.states("aligned", session.sets.harmful)
    assert torch.equal(s1, s2)
    layers = session.reference.config.num_hidden_layers
    assert s1.shape == (layers + 1, len(session.sets.harmful), session.reference.config.hidden_size)
    table = session.activation_overlap("aligned", session.sets.harmful, "aligned", session.sets.benign,
                                       energies=(0.9,))
    assert len(table) == layers + 1
    assert table["mso"].dropna().between(0, 1 + 1e-9).all()
    assert not math.isnan(table["mso"].iloc[-1])


def test_export_writes_the_projected_model_on_request(session, tmp_path):
    from safesub_core.cli import main
    from safesub_core.checkpoints import Checkpoint
    from safesub_core.loading import load_model

    cfg = ProjectionConfig("topk", "orthogonal", 0.5, alpha=0.5)
    session.export("useful", cfg, tmp_path / "point")
    exported, tok = load_model(Checkpoint.resolve("point", tmp_path / "point"))
    projected = dict(session.projected("useful", cfg).named_parameters())
    for n, p in exported.named_parameters():
        assert torch.equal(p, projected[n]), n
    assert tok.chat_template == session.tokenizer.chat_template
    assert main(["export", "--family", str(session.family.root / "family.yaml"), "--variant", "useful",
                 "--out", str(tmp_path / "point")]) == 2  # refuses to overwrite


def test_resident_budget_is_the_env_var_else_half_the_free_gpu_memory_else_4_gib(monkeypatch):
    monkeypatch.delenv("SAFESUB_RESIDENT_BYTES", raising=False)
    assert resident_budget("cpu") == DEFAULT_RESIDENT_BYTES == 4 << 30
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: asked.append(d) or (60 << 30, 80 << 30))
    assert resident_budget("cuda:0") == 30 << 30 and asked == [torch.device("cuda:0")]
    monkeypatch.setenv("SAFESUB_RESIDENT_BYTES", str(1 << 20))
    assert resident_budget("cuda:0") == resident_budget("cpu") == 1 << 20


def test_live_prompts_are_the_request_else_the_env_var_else_by_device_and_model_size(tiny_family, monkeypatch):
    fam = Family.from_file(tiny_family)  # under 20M parameters: 32 anywhere by default
    monkeypatch.delenv("SAFESUB_LIVE_PROMPTS", raising=False)
    assert live_prompts(fam) == live_prompts(fam, "cpu", "auto") == 32
    monkeypatch.setenv("SAFESUB_LIVE_PROMPTS", "6")
    assert live_prompts(fam) == live_prompts(fam, "cpu", None) == 6
    assert live_prompts(fam, "cpu", "4") == live_prompts(fam, "cpu", 4) == 4, "a request beats the variable"
    for requested, message in (("0", "live prompts 0: must be at least 1"),
                               ("a few", "live prompts 'a few': must be a whole number")):
        with pytest.raises(SafesubError, match=message):
            live_prompts(fam, "cpu", requested)
    monkeypatch.setenv("SAFESUB_LIVE_PROMPTS", "lots")
    with pytest.raises(SafesubError, match="SAFESUB_LIVE_PROMPTS 'lots': must be a whole number"):
        live_prompts(fam)
    monkeypatch.delenv("SAFESUB_LIVE_PROMPTS")
    for params, cpu in ((135_000_000, CPU_LIVE_PROMPTS), (1_200_000_000, 4)):  # smol's size, a 1B model's
        class Reader:
            names = staticmethod(lambda: ["w"])
            shape = staticmethod(lambda name, n=params: (n,))
        monkeypatch.setattr(fam, "reader", lambda name: Reader())
        assert live_prompts(fam) == cpu and live_prompts(fam, "cuda:0") == 32
    assert CPU_LIVE_PROMPTS == 6


def test_forward_scores_show_first_and_the_full_read_out_adds_the_exact_match(session):
    cfg = ProjectionConfig("topk", "parallel", 0.33)
    assert session.point_scores("useful", cfg, compute=False, decoded=False) is None
    forward = session.point_scores("useful", cfg, decoded=False)
    assert "arith_exact_match" not in forward and {"margin_mean", "nll_mean", "kl_to_start"} <= set(forward)
    assert session.point_scores("useful", cfg, compute=False) is None  # the decoded score is not there yet
    full = session.point_scores("useful", cfg)
    assert {k: full[k] for k in forward} == forward  # the forward scores are reused, not recomputed
    model = session.projected("useful", cfg)
    values = session.forward_values(model) | session.decoded_values(model)
    expected = session.engine("useful").diagnostics(cfg).summary() | summarise(values) | {
        "waves": 1, "waves_total": session.waves.count}
    assert full.keys() == expected.keys()
    numbers = [k for k, v in expected.items() if isinstance(v, float)]  # the draft's branch rounds a little apart
    assert {k: full[k] for k in numbers} == pytest.approx({k: expected[k] for k in numbers}, rel=1e-6)
    assert all(full[k] == expected[k] for k in expected.keys() - set(numbers))
    assert session.point_scores("useful", cfg, compute=False) == full


def test_scores_after_a_new_projection_see_the_new_weights(session, monkeypatch):
    """The chat header's cached keys/values follow each projection written into the working model."""
    prompts, tok = session.sets.harmful.prompts[:6], session.tokenizer
    score = lambda model: scoring.refusal_logodds(model, tok, prompts, session.openings)
    before = score(session.projected("harmful", ProjectionConfig("topk", "parallel", 0.2)))
    model = session.projected("harmful", ProjectionConfig("topk", "orthogonal", 0.9))
    shared = score(model)
    monkeypatch.setattr(scoring.logprobs, "supports_prefix", lambda m: False)
    monkeypatch.setattr(scoring.live, "_supports_shared_prefix", lambda m: False)
    monkeypatch.setattr(scoring.logprobs, "_supports_branch_rows", lambda m: False)
    monkeypatch.setattr(scoring.live, "_supports_branch_rows", lambda m: False)
    plain = score(model)
    assert torch.allclose(shared, plain, atol=1e-4)
    assert not torch.allclose(shared, before, atol=1e-2)


def test_rank_moves_of_the_working_model_are_composed_anew_now_and_then_and_for_an_export(session, monkeypatch,
                                                                                        tmp_path):
    import safesub_core.session as module

    applied = []
    engine = session.engine("useful")
    real = engine.apply
    monkeypatch.setattr(engine, "apply", lambda *a, **kw: applied.append(kw.get("applied")) or real(*a, **kw))
    monkeypatch.setattr(module, "MAX_MOVES", 2)
    cfgs = [ProjectionConfig("topk", "parallel", rho) for rho in (0.3, 0.31, 0.32, 0.33, 0.34)]
    session.projected("harmful", cfgs[0])  # another variant first: never moved from
    for cfg in cfgs:
        session.projected("useful", cfg)
    assert applied == [None, cfgs[0], cfgs[1], None, cfgs[3]]  # the third move in a row is a fresh composition
    session.export("useful", cfgs[-1], tmp_path / "point")
    assert applied[-1] is None  # composed anew, exactly, before it is written
    moved = dict(session.projected("useful", cfgs[-1]).named_parameters())
    fresh = engine.apply(copy.deepcopy(session.reference), session.reference, cfgs[-1])
    assert all(torch.equal(moved[n], p) for n, p in fresh.named_parameters())


def test_the_exact_match_reuses_the_check_of_the_forward_pass_at_the_same_point(session, monkeypatch):
    import safesub_core.waves as module

    seen, real = [], module.greedy_answers
    monkeypatch.setattr(module, "greedy_answers", lambda *a, **kw: seen.append(kw["checked"]) or real(*a, **kw))
    session.point_scores("useful", ProjectionConfig("topk", "parallel", 0.61))
    cfg = ProjectionConfig("topk", "parallel", 0.62)
    session.point_scores("useful", cfg, decoded=False)
    session.point_scores("useful", cfg)
    assert seen[-1] is not None and seen[-1].shape == (session.waves.size, module.LIVE_ARITH_TOKENS)
    other = ProjectionConfig("topk", "parallel", 0.63)
    session.decoded_values(session.projected("useful", other), ("useful", other, 0))
    assert seen[-1] is None  # another point: its own check


def test_exact_match_checks_the_nearest_points_answers_first_and_does_not_depend_on_them(session, tiny_family,
                                                                                         tmp_path, monkeypatch):
    import safesub_core.waves as module

    drafts, real = [], module.greedy_answers
    monkeypatch.setattr(module, "greedy_answers", lambda *a, **kw: drafts.append(kw["draft"]) or real(*a, **kw))
    near, far, new = (ProjectionConfig("topk", "parallel", 0.41), ProjectionConfig("random", "orthogonal", 0.43),
                      ProjectionConfig("topk", "parallel", 0.44))
    for cfg in (near, far, new):
        session.point_scores("useful", cfg)
    key = lambda cfg: (("useful", cfg, 0), 0)  # (point, wave)
    assert torch.equal(drafts[-1], session._answers[key(near)])  # the nearest point's, not the latest
    fresh = FamilySession(Family.from_file(tiny_family), sets=SETS, batch=BATCH, cache=DiskCache(tmp_path))
    got, seen = fresh.point_scores("useful", new), session.point_scores("useful", new)
    assert torch.equal(fresh._answers[key(new)], session._answers[key(new)])
    assert got["arith_exact_match"] == seen["arith_exact_match"]
    # the forward scores agree to float rounding: a session with a history moved its weights from a nearby rank
    # and ran the draft's branch in the same pass; a fresh one composed them anew and had no draft to check
    numbers = {k for k, v in seen.items() if isinstance(v, float)}
    assert {"margin_mean", "nll_mean", "kl_to_start"} <= numbers and got.keys() == seen.keys()
    assert {k: got[k] for k in numbers} == pytest.approx({k: seen[k] for k in numbers}, rel=1e-5, abs=1e-7)
    assert all(got[k] == seen[k] for k in seen.keys() - numbers)


def test_live_scores_sharpen_wave_by_wave_and_a_new_session_resumes_where_the_last_one_stopped(tiny_family, tmp_path):
    sets = EvalSets.default(10)
    cfg = ProjectionConfig("topk", "parallel", 0.3)
    s = FamilySession(Family.from_file(tiny_family), sets=sets, batch=4, cache=DiskCache(tmp_path))
    assert s.waves.count == 3  # 10 prompts a set in waves of 4: 4 + 4 + 2
    first = s.point_scores("harmful", cfg)
    assert (first["waves"], first["waves_total"], first["margin_mean_n"], first["kl_to_start_n"]) == (1, 3, 4, 4)
    assert s.sharpen("harmful", cfg) is True
    second = s.point_scores("harmful", cfg, compute=False)
    assert second["waves"] == 2 and second["margin_mean_n"] == second["arith_exact_match_n"] == 8
    assert s.sharpen("harmful", cfg) and not s.sharpen("harmful", cfg)  # the third wave, then nothing left
    done = s.point_scores("harmful", cfg, compute=False)
    assert done["margin_mean_n"] == 10 and done["waves"] == 3
    every = s.live_values("harmful", cfg, waves=3)  # the three waves' per-prompt values, joined
    assert len(every["margin"]) == 10 and every["margin"][:4] == s.live_values("harmful", cfg, waves=1)["margin"]
    assert {k: done[k] for k in summarise(every)} == summarise(every)
    # a new session on the same cache resumes with the three waves; one wave of all ten agrees to rounding
    again = FamilySession(Family.from_file(tiny_family), sets=sets, batch=4, cache=DiskCache(tmp_path))
    assert again.point_scores("harmful", cfg, compute=False) == done
    whole = FamilySession(Family.from_file(tiny_family), sets=sets, batch=10, cache=DiskCache(tmp_path / "w"))
    one = whole.point_scores("harmful", cfg)
    for key in ("margin_mean", "nll_mean", "kl_to_start", "arith_exact_match"):
        assert one[key] == pytest.approx(done[key], rel=1e-4, abs=1e-6), key
    with pytest.raises(SafesubError, match="live waves 4: the sets have 3 waves of 4 prompts"):
        s.point_scores("harmful", cfg, waves=4)


def test_random_subspaces_are_drawn_per_seed_and_top_k_draws_nothing(session):
    rand = [session.point_scores("useful", ProjectionConfig("random", "parallel", 0.3), seed=k) for k in (0, 1)]
    assert rand[0]["energy_kept"] != rand[1]["energy_kept"]  # another draw, another subspace
    assert rand[0] == session.point_scores("useful", ProjectionConfig("random", "parallel", 0.3))  # seed 0: default
    top = ProjectionConfig("topk", "parallel", 0.3)
    assert session.point_scores("useful", top, seed=5) == session.point_scores("useful", top)
    assert session.engine("useful", seed=1) is not session.engine("useful")


def test_a_sweep_draws_random_subspaces_with_several_seeds_and_tests_top_k_against_them(session):
    table = sweep(session, ["harmful"], ("topk", "random"), ("parallel",), (0.1, 0.9), seeds=2)
    assert len(table) == 2 + 2 * 2
    top, rand = table[table["subspace"] == "topk"], table[table["subspace"] == "random"]
    assert top["seed"].isna().all() and sorted(rand["seed"].unique()) == [0, 1]
    for key in ("margin_mean", "nll_mean", "arith_exact_match", "kl_to_start", "share_margin_negative"):
        assert (table[f"{key}_lo"] <= table[key] + 1e-12).all() and (table[key] <= table[f"{key}_hi"] + 1e-12).all()
        assert (table[f"{key}_n"] == 16).all()
        p = top[f"{P_PREFIX}{key}"]
        assert p.between(0, 1).all() and rand[f"{P_PREFIX}{key}"].isna().all()
    # the p-value is the larger of the two draws' paired tests
    a = session.live_values("harmful", ProjectionConfig("topk", "parallel", 0.1), waves=1)
    draws = [session.live_values("harmful", ProjectionConfig("random", "parallel", 0.1), seed=k, waves=1)
             for k in (0, 1)]
    from safesub_core.waves import paired
    assert top[f"{P_PREFIX}margin_mean"].iloc[0] == paired(a, draws)["p_margin_mean"]


def test_the_warm_up_scores_the_neighbouring_ranks_once_per_variant(session):
    cfg = ProjectionConfig("topk", "parallel", 0.5)
    near = [ProjectionConfig("topk", "parallel", rho) for rho in (0.48, 0.52)]
    assert all(session.point_scores("contaminated", c, compute=False) is None for c in near)
    assert session.warm("contaminated", cfg) is True
    assert all(session.point_scores("contaminated", c, compute=False)["waves"] == 1 for c in near)
    assert session.warm("contaminated", ProjectionConfig("topk", "parallel", 0.7)) is False  # warm already


def test_resident_checkpoints_stay_within_the_budget_least_recently_used_dropped_first(tiny_family, tmp_path,
                                                                                      monkeypatch):
    probe = FamilySession(Family.from_file(tiny_family), cache=DiskCache(tmp_path), batch=4)
    size = probe.in_memory()["bytes"] // 2  # the reference and its working copy
    monkeypatch.setenv("SAFESUB_MODEL_BYTES", str(int(2.5 * size)))
    S = FamilySession(Family.from_file(tiny_family), cache=DiskCache(tmp_path), batch=4)
    assert S.model_bytes == int(2.5 * size)
    harmful = S.model("harmful")
    S.model("useful")
    S.model("harmful")  # used again: now the most recent
    S.model("contaminated")  # room for two: the least recently used (useful) goes
    held = S.in_memory()
    assert held["models"] == [S.family.start, "harmful", "contaminated"] and held["evicted"] == 1
    assert S.model("harmful") is harmful
    before = S.checkpoint_scores("useful", waves=1)["margin_mean"]  # loaded again on use
    assert "useful" in S.in_memory()["models"] and S.evicted == 2
    assert S.model(S.family.start) is S.reference  # the start model is never dropped
    fresh = FamilySession(Family.from_file(tiny_family), cache=DiskCache(tmp_path / "other"), batch=4)
    assert fresh.checkpoint_scores("useful", waves=1)["margin_mean"] == pytest.approx(before, abs=1e-5)


def test_batch_sizes_shrink_after_out_of_memory_and_the_session_keeps_the_size_that_ran(session, monkeypatch):
    from safesub_core import compute
    from safesub_core import session as session_module

    tried = []

    def run(b):
        tried.append(b)
        if b > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return b * 10

    assert compute.executable_batch(run, 32, adaptive=True) == (40, 4)
    assert tried[0] == 32 and tried[-1] == 4 and tried == sorted(tried, reverse=True)
    assert compute.executable_batch(run, 3, "cpu") == (30, 3)  # the CPU: once, at the size asked
    with pytest.raises(RuntimeError):
        compute.executable_batch(run, 32, "cpu")
    sizes = []

    def fake(fn, start, device, adaptive=None):
        sizes.append(start)
        return fn(2), 2

    monkeypatch.setattr(session_module, "executable_batch", fake)
    first = session.score_set("aligned", SETS.harmful.head(3))[1]
    again = session.score_set("aligned", SETS.harmful.head(3))[1]
    assert sizes == [compute.CPU_BATCH["generation"], 2] and first["refusal_rate"] == again["refusal_rate"]
