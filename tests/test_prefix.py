"""Shared prompt prefixes: the layout, agreement with plain batches, and the cache following the weights."""
import copy

import pytest
import torch

import safesub_core.generation as G
from safesub_core.generation import format_prompt, generate, template_header
from safesub_core.prefix import MIN_PREFIX, PromptBatch, prefix_cache, prefix_length, supports_branches
from test_scoring import CHAT, PROMPTS, make_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama whose chat template opens with a system line, as SmolLM2's does."""
    tok = make_tokenizer()
    tok.chat_template = "<|user|> How do I stay safe?\n" + CHAT
    return make_model(tok), tok


def rows_of(tok, prompts=PROMPTS):
    return [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]


def test_prefix_length_is_the_common_prefix_with_the_header_capped_per_row():
    header = [1, 2, 3, 4]
    assert prefix_length([[1, 2, 3, 4, 9], [1, 2, 3, 4, 8, 7]], header) == 4
    assert prefix_length([[1, 2, 3, 9], [1, 2, 3, 4, 8]], header) == 3  # a row leaves the header early
    assert prefix_length([[1, 2, 3, 4], [1, 2, 3, 4, 8]], header) == 3  # each row keeps a token of its own
    assert prefix_length([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 8, 7]], header, keep=3) == 3
    assert prefix_length([[1, 2, 3, 4, 5]], []) == 0  # raw prompts: no header, no sharing
    assert prefix_length([[1, 9, 9], [1, 8, 8]], header) == 0  # under MIN_PREFIX
    assert MIN_PREFIX == 2


def test_batch_layout_puts_the_prefix_once_then_left_padded_suffixes():
    b = PromptBatch.build([[5, 6, 7, 8], [5, 6, 9]], pad_id=0, prefix_len=2)
    assert b.prefix == (5, 6)
    assert b.ids.tolist() == [[5, 6, 7, 8], [5, 6, 0, 9]]
    assert b.mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]
    assert b.positions[:, -1].tolist() == [3, 2]  # the last real token's position counts real tokens only
    assert b.lengths.tolist() == [4, 3]


def test_branches_follow_their_row_with_positions_continuing_from_its_end():
    b = PromptBatch.build([[5, 6, 7, 8], [5, 6, 9]], pad_id=0, prefix_len=2, branches=[[[1, 2], [3]], [[], [4]]])
    assert b.ids.tolist() == [[5, 6, 7, 8, 1, 2, 3], [5, 6, 0, 0, 0, 9, 4]]
    assert b.branch.tolist() == [[0, 0, 0, 0, 1, 1, 2], [0, 0, -1, -1, -1, 0, 2]]
    assert b.positions.tolist()[0] == [0, 1, 2, 3, 4, 5, 4]  # both branches start at the row's end
    assert b.positions.tolist()[1][-2:] == [2, 3]
    assert b.tail == 4  # row 0: its last token and three branch tokens
    seen = b.attention(torch.float32)[0, 0] == 0  # row 0's queries (its 5 suffix positions) over 7 keys
    assert seen[2].tolist() == [True] * 4 + [True, False, False]  # branch 1's first token: prefix, row, itself
    assert seen[4].tolist() == [True] * 4 + [False, False, True]  # branch 2 does not see branch 1
    assert seen[1].tolist() == [True] * 4 + [False] * 3  # the row's last token sees no branch
    pad = b.attention(torch.float32)[1, 0] == 0
    assert pad[0].tolist() == [True, True, True, False, False, False, False]  # padding: the prefix and itself


def test_each_branch_scores_as_it_would_appended_to_its_row_alone(tiny):
    model, tok = tiny
    rows = rows_of(tok)
    assert supports_branches(model)
    P = prefix_length(rows, template_header(tok))
    branches = [[[11, 12, 13], [14]], [[], [15, 16]], [[17, 18]]]
    batch = PromptBatch.build(rows, 0, P, branches=branches)
    got = batch.branch_logits(batch.forward(model, logits_to_keep=batch.tail).logits)
    for r, bs, spans in zip(rows, branches, got):
        for b, logits in zip(bs, spans):
            alone = PromptBatch.build([r + b], 0, 0).forward(model, logits_to_keep=len(b) + 1).logits[0]
            assert logits.shape == alone.shape
            assert torch.allclose(logits, alone, atol=1e-4)
    monkey = copy.copy(model.config)
    monkey._attn_implementation = "flash_attention_2"
    assert not supports_branches(type("M", (), {"forward": model.forward, "config": monkey})())


def test_prefix_forward_matches_the_plain_batch(tiny):
    model, tok = tiny
    rows = rows_of(tok)
    P = prefix_length(rows, template_header(tok))
    assert P >= MIN_PREFIX  # the test template has a header to share
    shared = PromptBatch.build(rows, 0, P).forward(model, logits_to_keep=2).logits
    plain = PromptBatch.build(rows, 0, 0).forward(model, logits_to_keep=2).logits
    assert torch.allclose(shared, plain, atol=1e-4)
    alone = PromptBatch.build(rows[1:2], 0, 0).forward(model, logits_to_keep=2).logits
    assert torch.allclose(shared[1], alone[0], atol=1e-4)


def test_prefix_cache_follows_in_place_writes_to_the_weights(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    rows = rows_of(tok)
    P = prefix_length(rows, template_header(tok))
    before = PromptBatch.build(rows, 0, P).forward(model, logits_to_keep=1).logits
    first = prefix_cache(model, rows[0][:P])
    with torch.no_grad():  # what a projection slider does: write into the parameters in place
        model.model.layers[0].self_attn.k_proj.weight.mul_(-1.5)
    second = prefix_cache(model, rows[0][:P])
    assert not torch.allclose(first.layers[0].keys, second.layers[0].keys)  # recomputed, not reused
    after = PromptBatch.build(rows, 0, P).forward(model, logits_to_keep=1).logits
    plain = PromptBatch.build(rows, 0, 0).forward(model, logits_to_keep=1).logits
    assert torch.allclose(after, plain, atol=1e-4)
    assert not torch.allclose(after, before, atol=1e-2)
    again = prefix_cache(model, rows[0][:P])  # unchanged weights: the same cache, as a copy
    assert torch.equal(again.layers[0].keys, second.layers[0].keys) and again is not second


def test_generation_with_and_without_the_prefix_is_identical(tiny, monkeypatch):
    model, tok = tiny
    shared = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=3).completions
    monkeypatch.setattr(G, "supports_prefix", lambda m: False)
    plain = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=3).completions
    assert shared == plain and any(c.strip() for c in shared)
