"""Tests for safesub_core.activations: last-real-token states, activation MSO per layer, 2-D maps."""
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safesub_core.activations import (
    DEPTH_BAND,
    TruncationWarning,
    activation_map,
    activation_overlap,
    band_mean,
    depth_band,
    depth_band_mean,
    embed_2d,
    last_token_states,
)
from safesub_core.errors import SafesubError
from safesub_core.generation import format_prompt
from safesub_core.linalg import DEFAULT_ENERGIES

SENTENCES = [
    "how do i bake a cake for my friend",
    "tell me about the weather today please",
    "write a short poem about the sea",
    "how can i steal a car without being seen",
    "explain how to make a dangerous weapon at home",
    "what is two plus three",
    "hello",
]
CONTEXT = 24  # max_position_embeddings of the tiny models, so truncation is easy to reach


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", "<user>", "<assistant>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    if chat_template:
        t.chat_template = (
            "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
        )
    t.padding_side = "right"  # last_token_states must switch it to left itself
    return t


def make_llama(vocab_size: int, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        pad_token_id=0,
        eos_token_id=2,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval()


def make_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    """Absolute position embeddings: wrong position ids under left padding would show at once."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT,
        pad_token_id=0, bos_token_id=2, eos_token_id=2,
    )
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    return make_llama(len(tok))


# ---------------------------------------------------------------------------------------------------- states


def test_states_shape_dtype_and_match_a_bare_forward(llama, tok):
    S = last_token_states(llama, tok, SENTENCES, chat=True)
    L = llama.config.num_hidden_layers
    assert S.shape == (L + 1, len(SENTENCES), llama.config.hidden_size)
    assert S.dtype == torch.float32 and S.device.type == "cpu"
    assert not S.is_inference() and not S.requires_grad
    S[0, 0, 0] += 0.0  # an ordinary tensor: in-place edits work outside inference mode
    assert torch.isfinite(S).all()
    # one prompt alone, no padding at all: the reference is a plain forward's hidden states at position -1
    for i, p in enumerate(SENTENCES):
        ids = tok(format_prompt(tok, p, chat=True), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = llama(ids, output_hidden_states=True).hidden_states
        ref = torch.stack([h[0, -1] for h in hs])
        torch.testing.assert_close(S[:, i], ref, atol=1e-5, rtol=0)
    # hidden_states[0] is the embedding output: the embedding row of the last token ("<assistant>")
    last_id = tok.convert_tokens_to_ids("<assistant>")
    torch.testing.assert_close(S[0], llama.model.embed_tokens.weight[last_id].expand_as(S[0]), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama-sdpa", "llama-eager", "gpt2"])
def test_left_padding_short_prompt_in_long_batch_equals_alone(tok, arch):
    model = make_gpt2(len(tok)) if arch == "gpt2" else make_llama(len(tok), attn=arch.split("-")[1])
    short = "hello"
    longs = [s for s in SENTENCES if len(s.split()) >= 7]
    batch = longs[:2] + [short] + longs[2:]
    together = last_token_states(model, tok, batch, chat=True, batch_size=16)
    alone = last_token_states(model, tok, [short], chat=True)
    assert together.shape[1] == len(batch)
    torch.testing.assert_close(together[:, 2], alone[:, 0], atol=1e-5, rtol=0)
    # and a long one too (it sits next to padded rows)
    torch.testing.assert_close(together[:, 0], last_token_states(model, tok, [batch[0]])[:, 0], atol=1e-5, rtol=0)
    # the padded row is not just the pad token's state: it differs from another prompt's state
    assert (together[-1, 2] - together[-1, 0]).abs().max() > 1e-3


def test_batch_size_and_order_do_not_matter(llama, tok):
    ref = last_token_states(llama, tok, SENTENCES, chat=False, batch_size=16)
    one = last_token_states(llama, tok, SENTENCES, chat=False, batch_size=1)
    torch.testing.assert_close(one, ref, atol=1e-5, rtol=0)
    perm = [3, 0, 6, 1, 5, 2, 4]
    shuffled = last_token_states(llama, tok, [SENTENCES[i] for i in perm], chat=False, batch_size=3)
    torch.testing.assert_close(shuffled, ref[:, perm], atol=1e-5, rtol=0)


def test_chat_formatting_changes_the_states(llama, tok):
    raw = last_token_states(llama, tok, SENTENCES[:3], chat=False)
    chat = last_token_states(llama, tok, SENTENCES[:3], chat=True)
    # raw text ends on the prompt's last word, chat on "<assistant>": different last tokens, different states
    assert (raw[0] - chat[0]).abs().max() > 1e-3


def test_truncation_is_warned_and_returned_and_keeps_the_end(llama, tok):
    long = " ".join(["tell me about the weather"] * 10)  # 50 words > CONTEXT
    prompts = ["hello", long]
    with pytest.warns(TruncationWarning, match="1 of 2 prompts"):
        S, cut = last_token_states(llama, tok, prompts, chat=False, return_truncated=True)
    assert cut == [False, True]
    kept = " ".join(long.split()[-CONTEXT:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for the prompt that fits
        ref = last_token_states(llama, tok, [kept], chat=False)
    torch.testing.assert_close(S[:, 1], ref[:, 0], atol=1e-5, rtol=0)


def test_states_progress_mode_and_errors(llama, tok):
    calls = []
    llama.train()
    try:
        S = last_token_states(llama, tok, SENTENCES, batch_size=3, progress=lambda d, t: calls.append((d, t)))
        assert llama.training, "the model's train/eval mode is restored"
    finally:
        llama.eval()
    assert calls == [(3, 7), (6, 7), (7, 7)]
    torch.testing.assert_close(S, last_token_states(llama, tok, SENTENCES), atol=1e-5, rtol=0)  # no dropout
    with pytest.raises(SafesubError, match="empty"):
        last_token_states(llama, tok, [])
    with pytest.raises(SafesubError, match="batch size"):
        last_token_states(llama, tok, ["hello"], batch_size=0)


# ---------------------------------------------------------------------------------------------- activation MSO


def _states(L: int, n: int, D: int, support: slice, seed: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.zeros(L + 1, n, D)
    X[:, :, support] = torch.randn(L + 1, n, support.stop - support.start, generator=g)
    if offset is not None:
        X = X + offset
    return X


def test_activation_overlap_self_is_one_and_columns():
    A = _states(3, 10, 32, slice(0, 32), seed=1)
    for center in (False, True):
        df = activation_overlap(A, A, center=center)
        assert list(df.columns) == ["layer", "depth", "energy", "k_x", "k_y", "mso", "random_baseline"]
        assert len(df) == 4 * len(DEFAULT_ENERGIES)
        assert sorted(df["layer"].unique()) == [0, 1, 2, 3]
        np.testing.assert_allclose(df["depth"], df["layer"] / 3)
        np.testing.assert_allclose(df["mso"], 1.0, atol=1e-9)
        assert (df["k_x"] == df["k_y"]).all()
        np.testing.assert_allclose(df["random_baseline"], df["k_x"] / 32)


def test_activation_overlap_in_unit_interval_and_orthogonal_supports_zero():
    A = _states(2, 12, 32, slice(0, 16), seed=2)
    B = _states(2, 9, 32, slice(16, 32), seed=3)
    df = activation_overlap(A, B)
    assert df["mso"].abs().max() < 1e-10
    R = _states(2, 9, 32, slice(0, 32), seed=4)
    df = activation_overlap(A, R)
    assert ((df["mso"] >= 0) & (df["mso"] <= 1 + 1e-12)).all()
    assert df["mso"].max() > 0.05  # random supports do overlap
    # the rank of A_l^T is at most n: k never exceeds the number of prompts
    assert (df["k_x"] <= 12).all() and (df["k_y"] <= 9).all()


def test_centering_removes_a_shared_constant_offset():
    offset = torch.zeros(32)
    offset[0] = 50.0  # every prompt of both sets carries the same large mean along e0
    A = _states(1, 10, 32, slice(1, 8), seed=5, offset=offset)
    B = _states(1, 10, 32, slice(16, 24), seed=6, offset=offset)
    raw = activation_overlap(A, B, energies=[0.5], center=False)
    cen = activation_overlap(A, B, energies=[0.5, 0.9, 0.99], center=True)
    assert (raw["k_x"] == 1).all() and (raw["k_y"] == 1).all()
    assert raw["mso"].min() > 0.99  # the shared mean direction is all either set spans at 50% energy
    assert cen["mso"].max() < 1e-8  # the centred sets live on disjoint coordinates
    # and different offsets on the same centred cloud: centering makes them identical
    other = torch.zeros(32)
    other[20] = -30.0
    X = _states(1, 10, 32, slice(0, 10), seed=7)
    same = activation_overlap(X + offset, X + other, energies=[0.5, 0.9], center=True)
    np.testing.assert_allclose(same["mso"], 1.0, atol=1e-9)
    diff = activation_overlap(X + offset, X + other, energies=[0.5], center=False)
    assert diff["mso"].max() < 0.5


def test_activation_overlap_layers_and_errors():
    A = _states(4, 6, 16, slice(0, 16), seed=8)
    df = activation_overlap(A, A, energies=[0.9], layers=[-1, 2])
    assert df["layer"].tolist() == [2, 4] and df["depth"].tolist() == [0.5, 1.0]
    with pytest.raises(SafesubError, match="hidden sizes"):
        activation_overlap(A, _states(4, 6, 8, slice(0, 8), seed=9))
    with pytest.raises(SafesubError, match="layers"):
        activation_overlap(A, _states(3, 6, 16, slice(0, 16), seed=9))
    with pytest.raises(SafesubError, match="out of range"):
        activation_overlap(A, A, layers=[5])
    with pytest.raises(SafesubError, match="shape"):
        activation_overlap(A[0], A)
    with pytest.raises(SafesubError, match="empty"):
        activation_overlap(A[:, :0], A)
    with pytest.raises(SafesubError, match="energy"):
        activation_overlap(A, A, energies=[1.5])
    with pytest.raises(SafesubError, match="centering"):
        activation_overlap(A[:, :1], A, center=True)


def test_depth_band_mean_picks_the_band_layers():
    A = _states(10, 8, 16, slice(0, 16), seed=10)
    B = _states(10, 8, 16, slice(0, 16), seed=11)
    df = activation_overlap(A, B, energies=[0.5, 0.9])
    band = depth_band_mean(df)  # 0.65..0.90 of 10 layers: 7, 8, 9
    assert list(band.columns) == ["energy", "mso", "random_baseline", "k_x", "k_y", "n_layers"]
    assert band["energy"].tolist() == [0.5, 0.9] and band["n_layers"].tolist() == [3, 3]
    for eta in (0.5, 0.9):
        sel = df[(df["energy"] == eta) & df["layer"].isin([7, 8, 9])]
        got = band.loc[band["energy"] == eta].iloc[0]
        assert got["mso"] == pytest.approx(sel["mso"].mean())
        assert got["k_x"] == pytest.approx(sel["k_x"].mean())
    # extra label columns are kept as keys
    df2 = pd.concat([df.assign(pair="u-h"), df.assign(pair="h-h")], ignore_index=True)
    b2 = depth_band_mean(df2, lo=0.0, hi=0.25)  # layers 0, 1, 2
    assert len(b2) == 4 and (b2["n_layers"] == 3).all() and set(b2["pair"]) == {"u-h", "h-h"}
    # a 2-layer model has depths 0, 0.5, 1: nothing in 0.65..0.90
    small = activation_overlap(A[:3], B[:3], energies=[0.9])
    with pytest.raises(SafesubError, match="no layer"):
        depth_band_mean(small)
    with pytest.raises(SafesubError, match="depth band"):
        depth_band_mean(df, lo=0.9, hi=0.1)


def test_depth_band_keeps_the_study_band_when_it_holds_layers_and_widens_it_otherwise():
    deep = [i / 10 for i in range(11)]
    assert depth_band(deep) == (*DEPTH_BAND, "")
    lo, hi, note = depth_band([0, 0.5, 1.0])  # 2 layers: the band holds none
    assert (lo, hi) == (0.5, 1.0) and "widened" in note and "holds 0" in note and "2-layer" in note
    assert depth_band([i / 30 for i in range(31)]) == (0.65, 0.90, ""), "a 30-layer model keeps the study's band"
    lo, hi, note = depth_band([0, 0.25, 0.5, 0.75, 1.0])  # 4 layers: the band holds one (0.75)
    assert (lo, hi) == (0.75, 1.0) and "holds 1" in note
    assert depth_band([0, 1.0])[:2] == (1.0, 1.0)  # one layer: as wide as the model allows


def test_band_mean_is_the_depth_band_mean_over_the_band_it_reports():
    A = _states(10, 8, 16, slice(0, 16), seed=10)
    B = _states(10, 8, 16, slice(0, 16), seed=11)
    deep = activation_overlap(A, B, energies=[0.5, 0.9]).assign(pair="x")
    got = band_mean(deep)
    assert (got.lo, got.hi, got.note) == (*DEPTH_BAND, "")
    assert got.table.equals(depth_band_mean(deep))
    shallow = activation_overlap(A[:3], B[:3], energies=[0.9])  # depths 0, 0.5, 1: the band holds no layer
    got = band_mean(shallow)
    assert (got.lo, got.hi) == (0.5, 1.0) and "widened" in got.note
    assert got.table.equals(depth_band_mean(shallow, 0.5, 1.0)) and got.table["n_layers"].tolist() == [2]
    with pytest.raises(SafesubError, match="lacks column"):
        band_mean(shallow.drop(columns="depth"))


def test_overlap_on_real_states(llama, tok):
    A = last_token_states(llama, tok, SENTENCES[:4])
    B = last_token_states(llama, tok, SENTENCES[3:])
    df = activation_overlap(A, B, center=True)
    assert len(df) == 3 * len(DEFAULT_ENERGIES)
    # layer 0 is the embedding of the last token, the same template token for every chat prompt: once
    # centred, nothing is left and the overlap is undefined (NaN), not an artefact of an arbitrary basis
    assert df.loc[df["layer"] == 0, "mso"].isna().all()
    assert df.loc[df["layer"] > 0, "mso"].between(0, 1 + 1e-9).all()
    raw = activation_overlap(A, B, center=False)
    np.testing.assert_allclose(raw.loc[raw["layer"] == 0, "mso"], 1.0, atol=1e-9)  # one shared direction


# ----------------------------------------------------------------------------------------------------- 2-D maps


def _clusters(n_per: int = 25, D: int = 20, gap: float = 12.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_per, D, generator=g)
    b = torch.randn(n_per, D, generator=g)
    b[:, 0] += gap
    return torch.cat([a, b]), np.array([0] * n_per + [1] * n_per)


def _separated(Z: np.ndarray, y: np.ndarray) -> bool:
    m0, m1 = Z[y == 0].mean(0), Z[y == 1].mean(0)
    spread = max(np.sqrt(((Z[y == k] - Z[y == k].mean(0)) ** 2).sum(1).mean()) for k in (0, 1))
    # nearest group mean classifies every point, and the means are far apart relative to the spread
    nearest = np.linalg.norm(Z - m1, axis=1) < np.linalg.norm(Z - m0, axis=1)
    return bool((nearest.astype(int) == y).all() and np.linalg.norm(m1 - m0) > 3 * spread)


@pytest.fixture(scope="module")
def umap_warm():
    """The first UMAP fit in a process compiles (about 9 s): pay it once per module."""
    embed_2d(torch.randn(20, 5), "umap", seed=0)
    return True


def _check_method(method: str):
    X, y = _clusters()
    Z1 = embed_2d(X, method, seed=3)
    Z2 = embed_2d(X.numpy(), method, seed=3)
    assert Z1.shape == (len(X), 2) and np.isfinite(Z1).all()
    np.testing.assert_allclose(Z1, Z2, rtol=0, atol=1e-6)
    assert _separated(Z1, y)


def test_embed_pca():
    _check_method("pca")
    Z = embed_2d(torch.randn(5, 1), "pca")  # one feature: second coordinate 0
    assert Z.shape == (5, 2) and (Z[:, 1] == 0).all()


@pytest.mark.slow
def test_embed_umap(umap_warm):
    _check_method("umap")
    Z = embed_2d(torch.randn(3, 4), "umap")  # the smallest allowed input
    assert Z.shape == (3, 2) and np.isfinite(Z).all()


@pytest.mark.slow
def test_embed_tsne():
    _check_method("tsne")
    Z = embed_2d(torch.randn(3, 4), "tsne")
    assert Z.shape == (3, 2) and np.isfinite(Z).all()


def test_embed_errors():
    with pytest.raises(SafesubError, match="unknown"):
        embed_2d(torch.randn(5, 3), "mds")
    with pytest.raises(SafesubError, match="at least 3"):
        embed_2d(torch.randn(2, 3), "pca")
    with pytest.raises(SafesubError, match="shape"):
        embed_2d(torch.randn(2, 3, 4), "pca")
    bad = torch.randn(5, 3)
    bad[1, 1] = float("nan")
    with pytest.raises(SafesubError, match="non-finite"):
        embed_2d(bad, "pca")
    try:
        embed_2d(torch.randn(1, 3), "tsne")
    except SafesubError as e:
        assert "\n" not in str(e)


def test_activation_map_joint_groups():
    X, y = _clusters(n_per=6, D=8)
    L1 = 3
    S0 = X[:6].expand(L1, 6, 8).clone()
    S1 = X[6:].expand(L1, 6, 8).clone()
    states = {("aligned", "harmful"): S0, "useful · benign": S1}
    prompts = {("aligned", "harmful"): [f"h{i}" for i in range(6)], "useful · benign": [f"b{i}" for i in range(6)]}
    df = activation_map(states, prompts, layer=2, method="pca", seed=0)
    assert list(df.columns) == ["x", "y", "label", "model", "set", "prompt", "index"]
    assert len(df) == 12
    assert df["label"].tolist() == ["aligned · harmful"] * 6 + ["useful · benign"] * 6
    assert df["model"].tolist() == ["aligned"] * 6 + ["useful"] * 6
    assert df["set"].tolist() == ["harmful"] * 6 + ["benign"] * 6
    assert df["prompt"].tolist()[:2] == ["h0", "h1"] and df["index"].tolist() == list(range(6)) * 2
    # embedded jointly: identical to embedding the concatenation
    np.testing.assert_allclose(df[["x", "y"]].to_numpy(), embed_2d(X, "pca"), atol=1e-9)
    assert _separated(df[["x", "y"]].to_numpy(), y)
    # no prompts: empty hover text
    assert (activation_map(states, None, layer=-1)["prompt"] == "").all()


def test_activation_map_errors():
    S = torch.randn(3, 4, 8)
    with pytest.raises(SafesubError, match="out of range"):
        activation_map({"a · x": S}, None, layer=3)
    with pytest.raises(SafesubError, match="hidden size"):
        activation_map({"a · x": S, "b · x": torch.randn(3, 4, 6)}, None, layer=0)
    with pytest.raises(SafesubError, match="layers"):
        activation_map({"a · x": S, "b · x": torch.randn(2, 4, 8)}, None, layer=0)
    with pytest.raises(SafesubError, match="2 prompts for 4"):
        activation_map({"a · x": S}, {"a · x": ["p", "q"]}, layer=0)
    with pytest.raises(SafesubError, match="no groups"):
        activation_map({}, None, layer=0)
    with pytest.raises(SafesubError, match="unknown"):
        activation_map({"a · x": S}, None, layer=0, method="isomap")
