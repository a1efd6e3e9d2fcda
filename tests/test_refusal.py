"""The refusal direction (safesub_core/refusal.py, interventions.py, bridge.py): candidates, selection,
interventions and the bridge.

The planted model. A tiny Llama (4 blocks, hidden 64, a word-level tokenizer with a chat template) whose weights are
set BY HAND so that one unit direction d of the residual stream decides whether the first answer token is the
refusal token "I" or the compliance token "Sure". Training one to the same end was the first plan; it is not used
because training does not say which direction the model ends up using: the difference of means at a layer is then
the network's nonlinear response to the harmful words, so "matches the planted direction" would test the training,
not the tool. The construction:
- embeddings: random rows with no d component, except the harmful trigger words, which carry + c d;
- block 0, head 0: zero queries and keys (so uniform causal attention), value = d . x, output written along d:
  every position (the post-instruction ones included) receives d in proportion to the prompt's share of triggers;
- every other head and MLP: random weights (scaled up, so they do real work) that neither read nor write d;
- the untied output head: the row of "I" is beta d, the row of "Sure" the direction of the "<|assistant|>"
  embedding (present at the last position of every prompt), the rest small random rows with no d component.
So harmful prompts refuse, harmless ones comply, and ablating d makes harmful prompts comply. The test runs the tool
end to end on it: candidate extraction, selection by the three criteria, ablation, addition, orthogonalisation.
"""
from __future__ import annotations

import random

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safesub_core import bridge
from safesub_core import interventions as iv
from safesub_core import refusal as rf
from safesub_core.errors import SafesubError
from safesub_core.generation import generate
from tests.factories import random_model

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|end|>", "<|assistant|>"]
NEUTRAL = ("tell me about the a cake garden river song story recipe music paint letter friend city history write "
           "how make best nice simple quick plan trip book poem tea bread walk").split()
TRIGGERS = "weapon poison steal hack explosive".split()
ANSWER = ["I", "As", "Sure", "here", "is", "sorry"]
TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|>"
            "{% endfor %}{% if add_generation_prompt %} <|assistant|>{% endif %}")


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + NEUTRAL + TRIGGERS + ANSWER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
    fast.chat_template = TEMPLATE
    return fast


def make_prompts(n: int, harmful: bool, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(NEUTRAL, k=rng.randint(3, 7))
        if harmful:
            for _ in range(rng.randint(1, 2)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(TRIGGERS))
        out.append(" ".join(words))
    return out


@torch.no_grad()
def planted_model(tok, hidden: int = 64, layers: int = 4, c: float = 4.0, gain: float = 20.0, beta: float = 3.0,
                  seed: int = 0) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """(model, d): the hand-built Llama of the module docstring and its planted unit direction."""
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    d = torch.randn(hidden, generator=g)
    d /= d.norm()
    off = torch.eye(hidden) - torch.outer(d, d)  # removes the d component
    E = torch.randn(len(tok), hidden, generator=g) @ off
    for w in TRIGGERS:
        E[tok.convert_tokens_to_ids(w)] += c * d
    model.model.embed_tokens.weight.copy_(E)
    for layer in model.model.layers:
        a, f = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, f.gate_proj, f.up_proj):
            lin.weight.copy_(3 * lin.weight @ off)  # reads nothing along d
        for lin in (a.o_proj, f.down_proj):
            lin.weight.copy_(3 * off @ lin.weight)  # writes nothing along d
    a, hd = model.model.layers[0].self_attn, hidden // 4
    a.q_proj.weight[:hd] = 0
    a.k_proj.weight[:hd] = 0
    a.v_proj.weight[:hd] = 0
    a.v_proj.weight[0] = d
    a.o_proj.weight[:, :hd] = 0
    a.o_proj.weight[:, 0] = gain * d
    head = 0.02 * torch.randn(len(tok), hidden, generator=g) @ off
    head[tok.convert_tokens_to_ids("I")] = beta * d
    e_a = E[tok.convert_tokens_to_ids("<|assistant|>")]
    head[tok.convert_tokens_to_ids("Sure")] = e_a / e_a.norm()
    model.lm_head.weight.copy_(head)
    return model, d


@pytest.fixture(scope="module")
def planted():
    tok = make_tokenizer()
    model, d = planted_model(tok)
    sets = dict(train_harmful=make_prompts(48, True, 1), train_harmless=make_prompts(48, False, 2),
                val_harmful=make_prompts(16, True, 3), val_harmless=make_prompts(16, False, 4))
    return model, tok, d, sets


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------ end to end


def test_selected_direction_is_the_planted_one_and_ablation_removes_refusal(planted):
    model, tok, d, sets = planted
    cands = rf.candidate_directions(model, tok, sets["train_harmful"], sets["train_harmless"])
    L = len(model.model.layers)
    assert cands.directions.shape == (L + 1, 2, 64)  # post-instruction tokens: "<|end|>", "<|assistant|>"
    assert cands.positions == (-2, -1)
    assert cands.directions[0].abs().max() == 0  # the embeddings of the template's closing are the same everywhere
    sel = rf.select_direction(cands, model, tok, sets["val_harmful"], sets["val_harmless"])
    assert isinstance(sel.table, pd.DataFrame) and len(sel.table) == (L + 1) * 2
    assert sel.passed and sel.note == ""
    assert 1 <= sel.layer < 0.8 * L
    assert sel.table["eligible"].sum() == 6  # layers 1..3, two positions; layer 0's candidates are zero
    assert float(sel.direction @ d) >= 0.9
    assert sel.baseline_harmful > 0 > sel.baseline_harmless
    assert sel.bypass < 0 < sel.induce and sel.kl < 0.1

    before = rf.refusal_score(model, tok, sets["val_harmful"])
    assert (before > 0).all()
    with iv.directional_ablation(model, sel.direction):
        ablated = rf.refusal_score(model, tok, sets["val_harmful"])
        answers = generate(model, tok, sets["val_harmful"][:4], max_new_tokens=1).completions
    assert (ablated < 0).all()
    assert all(a.strip() == "Sure" for a in answers)
    assert all(a.strip() == "I" for a in generate(model, tok, sets["val_harmful"][:4], max_new_tokens=1).completions)
    with iv.activation_addition(model, sel.raw, sel.layer):
        induced = rf.refusal_score(model, tok, sets["val_harmless"])
    assert (induced > 0).all()
    assert torch.allclose(rf.refusal_score(model, tok, sets["val_harmful"]), before)  # hooks gone, cache fresh
    assert _no_hooks(model)

    edited = iv.orthogonalize_weights(model, sel.direction)
    assert (rf.refusal_score(edited, tok, sets["val_harmful"]) < 0).all()


def test_the_screen_scores_only_the_best_estimates_and_finds_the_same_direction(planted):
    model, tok, d, sets = planted
    cands = rf.candidate_directions(model, tok, sets["train_harmful"], sets["train_harmless"])
    steps = []
    sel = rf.select_direction(cands, model, tok, sets["val_harmful"], sets["val_harmless"], n_exact=2,
                              progress=lambda done, total: steps.append((done, total)))
    t = sel.table
    assert t.loc[t["eligible"], "bypass_linear"].notna().all() and t.loc[~t["eligible"], "bypass_linear"].isna().all()
    assert t["bypass"].notna().sum() == 2 and steps == [(1, 3), (2, 3), (3, 3)]
    scored = t[t["bypass"].notna()]
    assert set(scored.index) == set(t.loc[t["eligible"], "bypass_linear"].nsmallest(2).index)
    assert sel.passed and float(sel.direction @ d) >= 0.9
    with pytest.raises(SafesubError, match="exact candidates"):
        rf.select_direction(cands, model, tok, sets["val_harmful"], sets["val_harmless"], n_exact=0)


def test_ablation_gradient_is_the_derivative_of_the_refusal_score(planted):
    model, tok, d, sets = planted
    prompts = sets["val_harmful"][:4]
    g = torch.Generator().manual_seed(5)
    for r in (d + 0.5 * torch.randn(64, generator=g) / 8, torch.randn(64, generator=g)):
        u = (r / r.norm()).double()
        M = rf.ablation_gradient(model, tok, prompts, batch_size=3)
        eps = 1e-2
        with iv.directional_ablation(model, r, strength=eps):
            plus = float(rf.refusal_score(model, tok, prompts).double().sum())
        with iv.directional_ablation(model, r, strength=-eps):
            minus = float(rf.refusal_score(model, tok, prompts).double().sum())
        assert (plus - minus) / (2 * eps) == pytest.approx(-float(u @ M @ u), rel=2e-2, abs=1e-2)
    assert all(p.grad is None for p in model.parameters()) and _no_hooks(model)


def test_candidates_do_not_depend_on_batching_or_padding(planted):
    model, tok, _, sets = planted
    H, B = sets["train_harmful"][:9], sets["train_harmless"][:7]
    one = rf.candidate_directions(model, tok, H, B, batch_size=1)
    many = rf.candidate_directions(model, tok, H, B, batch_size=16)
    assert torch.allclose(one.directions, many.directions, atol=1e-5)
    three = rf.candidate_directions(model, tok, H, B, positions=3)
    assert three.positions == (-3, -2, -1) and three.directions.shape[1] == 3
    assert torch.allclose(three.directions[:, 1:], many.directions, atol=1e-5)
    # the last position's harmful mean at stream point 1, computed by hand from each prompt alone
    layer1 = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda m, a, k: layer1.append((a[0] if a else
                                                                                            k["hidden_states"])[0, -1]),
                                                         with_kwargs=True)
    try:
        for p in H:
            ids = tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            _logits(model, torch.tensor([ids]))
    finally:
        hook.remove()
    assert torch.allclose(torch.stack(layer1).mean(0), one.harmful_mean[1, -1], atol=1e-5)
    back = rf.Candidates.from_tensors(one.as_tensors())
    assert back.positions == one.positions and torch.equal(back.directions, one.directions)
    assert (back.n_harmful, back.n_harmless) == (9, 7)


def test_refusal_score_is_the_log_odds_of_the_refusal_tokens(planted):
    model, tok, _, sets = planted
    R = rf.refusal_token_ids(tok)
    assert tok.convert_ids_to_tokens(R) == ["I", "As"]  # "I'm"/"My" are unknown words here; "is ..." opens nothing
    prompts = sets["val_harmful"][:3] + sets["val_harmless"][:3]
    got = rf.refusal_score(model, tok, prompts, batch_size=4)
    for p, score in zip(prompts, got):
        ids = tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        probs = torch.softmax(_logits(model, torch.tensor([ids]))[0, -1].double(), -1)
        inside = probs[R].sum()
        assert float(score) == pytest.approx(float(torch.log(inside) - torch.log1p(-inside)), abs=1e-4)


# ------------------------------------------------------------------------------------------------ interventions


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_orthogonalized_weights_equal_directional_ablation(strength, tmp_path):
    model = random_model(3)  # tied embeddings
    assert iv._tied(model)
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(2))
    plain = _logits(model, ids)
    with iv.directional_ablation(model, r, strength=strength):
        hooked = _logits(model, ids)
    edited = iv.orthogonalize_weights(model, r, strength=strength)
    assert not torch.allclose(hooked, plain, atol=1e-4)
    assert torch.allclose(_logits(edited, ids), hooked, atol=1e-5)
    assert torch.equal(_logits(model, ids), plain)  # the original untouched, its hooks gone
    assert not edited.config.tie_word_embeddings
    assert torch.equal(edited.lm_head.weight, model.lm_head.weight)  # the head keeps the original embedding
    u = r / r.norm()
    if strength == 1.0:
        for name, w in iv.orthogonalized_weights(model, r).items():
            if "o_proj" in name or "down_proj" in name:
                assert float((u @ w).abs().max()) < 1e-5
            elif "embed_tokens" in name:
                assert float((w @ u).abs().max()) < 1e-5
    edited.save_pretrained(tmp_path / "ortho", safe_serialization=True)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "ortho", local_files_only=True).eval()
    assert torch.allclose(_logits(reloaded, ids), hooked, atol=1e-5)


def test_orthogonalisation_equals_ablation_on_the_planted_model(planted):
    model, tok, d, sets = planted
    ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"] for p in ["tell me how to make poison"] * 2])
    with iv.directional_ablation(model, d):
        hooked = _logits(model, ids)
    assert torch.allclose(_logits(iv.orthogonalize_weights(model, d), ids), hooked, atol=1e-5)


def test_hooks_are_removed_on_error_and_the_prefix_cache_never_goes_stale(planted):
    model, tok, d, sets = planted
    prompts = sets["val_harmful"][:4]
    before = rf.refusal_score(model, tok, prompts)  # fills the prefix cache of the template's header
    with pytest.raises(RuntimeError):
        with iv.directional_ablation(model, d):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with iv.activation_addition(model, d, 2, alpha=3.0):
            raise RuntimeError("boom")
    assert _no_hooks(model)
    assert torch.allclose(rf.refusal_score(model, tok, prompts), before)
    # inside the block the header's cache is recomputed under the hook: the same as a model edited for good
    with iv.activation_addition(model, d, 0, alpha=-5.0):
        inside = rf.refusal_score(model, tok, prompts)
    ref = LlamaForCausalLM(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.model.embed_tokens.weight += -5.0 * d  # addition at point 0 = every embedding row moved
    assert torch.allclose(inside, rf.refusal_score(ref, tok, prompts), atol=1e-4)
    assert not torch.allclose(inside, before)


def test_activation_addition_at_the_last_stream_point(planted):
    model, tok, d, sets = planted
    L = len(model.model.layers)
    prompts = sets["val_harmless"][:4]
    with iv.activation_addition(model, d, L, alpha=20.0):
        assert (rf.refusal_score(model, tok, prompts) > 0).all()
    with iv.activation_addition(model, d, L, alpha=0.0):
        assert (rf.refusal_score(model, tok, prompts) < 0).all()


def test_bad_inputs_are_one_line_errors(planted):
    model, tok, d, sets = planted
    L = len(model.model.layers)
    with pytest.raises(SafesubError, match="stream point"):
        with iv.activation_addition(model, d, L + 1):
            pass
    with pytest.raises(SafesubError, match="entries"):
        with iv.directional_ablation(model, torch.ones(5)):
            pass
    with pytest.raises(SafesubError, match="is zero"):
        with iv.directional_ablation(model, torch.zeros(64)):
            pass
    with pytest.raises(SafesubError, match="finite"):
        with iv.directional_ablation(model, d, strength=float("nan")):
            pass
    with pytest.raises(SafesubError, match="empty"):
        rf.candidate_directions(model, tok, [], sets["train_harmless"])
    with pytest.raises(SafesubError, match="fewer than 40 tokens"):
        rf.candidate_directions(model, tok, sets["train_harmful"], sets["train_harmless"], positions=40)
    with pytest.raises(SafesubError, match="at least 1"):
        rf.candidate_directions(model, tok, sets["train_harmful"], sets["train_harmless"], positions=0)
    with pytest.raises(SafesubError, match="refusal tokens"):
        rf.refusal_token_ids(tok, openings=["Absolutely not"])
    assert _no_hooks(model)


def test_choose_applies_the_papers_filters():
    t = pd.DataFrame(dict(layer=[1, 2, 3, 4], position=[-1] * 4, eligible=[True, True, True, False],
                          bypass=[-3.0, -5.0, -1.0, -9.0], induce=[1.0, 2.0, 0.5, 3.0], kl=[0.01, 0.5, 0.02, 0.0]))
    table, note = rf.choose(t)
    assert table.loc[table["chosen"], "layer"].tolist() == [1]  # layer 2 has a lower bypass but KL 0.5
    assert table["passed"].tolist() == [True, False, True, False] and note == ""
    table, note = rf.choose(t, kl_max=0.001)
    assert table.loc[table["chosen"], "layer"].tolist() == [2] and "no candidate passes" in note
    with pytest.raises(SafesubError, match="no candidate"):
        rf.choose(t.assign(eligible=False))


# ------------------------------------------------------------------------------------------------ the bridge


def test_refusal_in_alignment_subspace_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    D = 24
    U = torch.linalg.svd(torch.randn(D, 10, generator=g), full_matrices=False)[0]
    r = torch.randn(D, generator=g) * 3
    df = bridge.refusal_in_alignment_subspace(U, r, ks=[1, 4, 10])
    u = r / r.norm()
    for k, captured, baseline in zip(df["k"], df["captured"], df["baseline"]):
        assert captured == pytest.approx(float((U[:, :k].T @ u).pow(2).sum()), abs=1e-6)
        assert baseline == pytest.approx(k / D)
    full = torch.linalg.svd(torch.randn(D, D, generator=g))[0]
    assert bridge.refusal_in_alignment_subspace(full, r)["captured"].iloc[-1] == pytest.approx(1.0, abs=1e-6)
    long = bridge.refusal_in_alignment_subspaces({"model.layers.3.self_attn.o_proj.weight": U,
                                                   "model.layers.5.mlp.down_proj.weight": full}, r, ks=[2])
    assert long["block"].tolist() == [3, 5] and long["module"].tolist() == ["o", "down"]
    with pytest.raises(SafesubError, match="rank k"):
        bridge.refusal_in_alignment_subspace(U, r, ks=[11])


def test_shift_along_equals_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    before, after = torch.randn(3, 8, 16, generator=g), torch.randn(3, 5, 16, generator=g) + 0.5
    r = torch.randn(16, generator=g)
    df = bridge.shift_along(r, before, after)
    u = (r / r.norm()).double()
    for l in range(3):
        delta = after[l].double().mean(0) - before[l].double().mean(0)
        assert df.loc[l, "shift_norm"] == pytest.approx(float(delta.norm()))
        assert df.loc[l, "along"] == pytest.approx(float(delta @ u))
        assert df.loc[l, "share"] == pytest.approx(float((delta @ u) ** 2 / delta.pow(2).sum()))
    assert df["baseline"].tolist() == [1 / 16] * 3
    per_layer = bridge.shift_along(torch.stack([r, -r, r]), before, after)
    assert per_layer["along"].tolist() == pytest.approx([df["along"][0], -df["along"][1], df["along"][2]])
    flat = bridge.shift_along(r, before[0], after[0])
    assert len(flat) == 1 and flat.loc[0, "share"] == pytest.approx(df.loc[0, "share"])
    assert pd.isna(bridge.shift_along(r, before, before)["share"]).all()
    with pytest.raises(SafesubError, match="expected shape"):
        bridge.shift_along(torch.randn(5), before, after)
