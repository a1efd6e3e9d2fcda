"""Greedy answers as the fixed point of one batched pass: equal to incremental decoding, whatever the draft."""
import copy

import pytest
import torch

from safesub_core.generation import generate, greedy_answers
from test_scoring import CHAT, PROMPTS, make_model, make_tokenizer

T = 8


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama whose chat template opens with a shared header (the answers are gibberish but fixed)."""
    tok = make_tokenizer()
    tok.chat_template = "<|user|> How do I stay safe?\n" + CHAT
    return make_model(tok), tok


@pytest.fixture(scope="module")
def plain(tiny):
    model, tok = tiny
    return greedy_answers(model, tok, PROMPTS, T)


def test_greedy_answers_are_the_incremental_greedy_completions(tiny, plain):
    model, tok = tiny
    assert plain.completions == generate(model, tok, PROMPTS, max_new_tokens=T, batch_size=len(PROMPTS)).completions
    assert plain.tokens.shape == (len(PROMPTS), T) and plain.drafted == len(PROMPTS) and plain.passes == 1
    assert any(c.strip() for c in plain.completions)


def test_a_draft_that_holds_costs_one_pass_and_no_decoding(tiny, plain):
    again = greedy_answers(*tiny, PROMPTS, T, draft=plain.tokens)
    assert torch.equal(again.tokens, plain.tokens) and again.passes == 1 and again.drafted == 0


def test_a_check_run_elsewhere_replaces_the_first_pass(tiny, plain):
    model, tok = tiny
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = greedy_answers(model, tok, PROMPTS, T, draft=plain.tokens, checked=plain.tokens)
        assert not calls and again.passes == 1  # F(draft) = draft was given: the draft held, no pass ran
        wrong = greedy_answers(model, tok, PROMPTS, T, draft=plain.tokens, checked=plain.tokens[:, :3])
        assert len(calls) == 1 and wrong.passes == 1  # a check of the wrong shape is ignored: one pass of its own
    finally:
        hook.remove()
    assert torch.equal(again.tokens, plain.tokens) and torch.equal(wrong.tokens, plain.tokens)


@pytest.mark.parametrize("rows", [slice(1, None), slice(1, 2)])  # most rows wrong (decoded), one (F's tokens)
@pytest.mark.parametrize("wrong_from", [0, 3, T - 1])
def test_the_answers_do_not_depend_on_the_draft(tiny, plain, wrong_from, rows):
    model, tok = tiny
    draft = plain.tokens.clone()
    draft[rows, wrong_from:] = (draft[rows, wrong_from:] + 7) % len(tok)  # these rows go wrong from `wrong_from`
    got = greedy_answers(model, tok, PROMPTS, T, draft=draft)
    assert torch.equal(got.tokens, plain.tokens) and got.completions == plain.completions
    assert 2 <= got.passes <= T + 1 and got.drafted <= len(PROMPTS) - 1  # row 0 held from the start
    if wrong_from == T - 1:  # only the last token was wrong: F's own token mends it, with no decoding
        assert (got.passes, got.drafted) == (2, 0)
    junk = torch.randint(0, len(tok), plain.tokens.shape, generator=torch.Generator().manual_seed(wrong_from))
    assert torch.equal(greedy_answers(model, tok, PROMPTS, T, draft=junk).tokens, plain.tokens)


def test_later_checks_run_only_the_rows_that_have_not_held(tiny, plain):
    model, tok = tiny
    draft = plain.tokens.clone()
    draft[1, T - 1] = (draft[1, T - 1] + 7) % len(tok)  # row 1's last token is wrong
    batches = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: batches.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    try:
        got = greedy_answers(model, tok, PROMPTS, T, draft=draft)
    finally:
        hook.remove()
    assert torch.equal(got.tokens, plain.tokens) and (got.passes, got.drafted) == (2, 0)
    assert batches[-2:] == [len(PROMPTS), 1]  # all rows, then row 1 alone (after the header's own pass, if any)


def test_rows_stop_at_their_first_eos_as_generate_does(tiny, plain):
    model, tok = tiny
    tok = copy.deepcopy(tok)
    stop = int(plain.tokens[0, 2])  # make a token the model does produce the end of an answer
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    tok.pad_token = "<eos>"
    got = greedy_answers(model, tok, PROMPTS, T)
    assert got.completions == generate(model, tok, PROMPTS, max_new_tokens=T, batch_size=len(PROMPTS)).completions
    first = int((got.tokens[0] == stop).int().argmax())
    assert first <= 2 and (got.tokens[0, first + 1:] == tok.pad_token_id).all()  # padding after the stop
    drafted = got.tokens.clone()
    drafted[0, first + 1:] = 5  # what follows a row's EOS is never checked: the draft holds at once
    again = greedy_answers(model, tok, PROMPTS, T, draft=drafted)
    assert torch.equal(again.tokens, got.tokens) and (again.passes, again.drafted) == (1, 0)


def test_a_draft_of_the_wrong_shape_is_ignored(tiny, plain):
    got = greedy_answers(*tiny, PROMPTS, T, draft=plain.tokens[:, :3])
    assert torch.equal(got.tokens, plain.tokens) and got.drafted == len(PROMPTS)


# ---- prompt format: chat or raw, with an optional system prompt -------------------------------------------------

ROLES = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             "<|user|> {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def test_prompt_format_bool_or_dataclass():
    from safesub_core.errors import SafesubError
    from safesub_core.generation import PromptFormat, format_prompt, prompt_format, template_header

    tok = make_tokenizer()
    tok.chat_template = ROLES
    assert prompt_format(True) == PromptFormat() and prompt_format(False) == PromptFormat(False, None)
    fmt = PromptFormat(True, "Be safe.")
    assert prompt_format(fmt) is fmt
    assert format_prompt(tok, "Hi", True) == format_prompt(tok, "Hi", PromptFormat()) == "<|user|> Hi\n<|assistant|> "
    assert format_prompt(tok, "Hi", fmt) == "<|system|> Be safe.\n<|user|> Hi\n<|assistant|> "
    assert format_prompt(tok, "Hi", PromptFormat(False, "Be safe.")) == "Be safe.\nHi"
    assert format_prompt(tok, "Hi", False) == "Hi"
    assert template_header(tok, False) == []
    head = tok.decode(template_header(tok, fmt))
    assert head.startswith("<|system|> Be safe.") and "Hi" not in head
    tok.chat_template = NO_SYSTEM  # a template that rejects a system turn: the system text opens the user turn
    assert format_prompt(tok, "Hi", fmt) == "<|user|> Be safe.\n\nHi\n<|assistant|> "
    with pytest.raises(SafesubError, match="system prompt 3: is not a string"):
        PromptFormat(True, 3)


def test_generation_takes_a_prompt_format(tiny):
    from safesub_core.generation import PromptFormat

    model, tok = tiny
    same = generate(model, tok, PROMPTS, max_new_tokens=4, chat=PromptFormat())
    assert same.completions == generate(model, tok, PROMPTS, max_new_tokens=4).completions
    fmt = PromptFormat(True, "Be brief.")
    answers = greedy_answers(model, tok, PROMPTS, 4, chat=fmt)
    assert answers.completions == generate(model, tok, PROMPTS, max_new_tokens=4, chat=fmt).completions
