"""Complete cache keys (issue 19, "wrong results served"): an entry is keyed by everything that decides what it means,
so an edited chat template, tokenizer, generation config or start model never serves an old score, state or map,
and files that mean nothing (a README, a touch) never cost a recomputation. Also the broken-checkpoint one-liners.

The session tests run on copies of the test-size tiny family; each result after an edit is compared with the same
result from an empty cache (what a fresh run computes), both in the session that was open during the edit (it
reloads what changed) and in one opened afterwards on the old cache (the probe's case).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from factories import random_model
from safesub_core import scoring
from safesub_core.cache import DiskCache
from safesub_core.checkpoints import Checkpoint
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.fingerprints import model_fingerprint, tokenizer_fingerprint
from safesub_core.loading import check_shapes
from safesub_core.projection import ProjectionConfig
from safesub_core.prompts import EvalSets
from safesub_core.scoring import names
from safesub_core.session import FamilySession, judge_key
from test_bad_inputs import assert_one_line, run

pytestmark = pytest.mark.slow

SETS = EvalSets.default(4)
POINT = ProjectionConfig("topk", "parallel", 0.5)
TEMPLATE = ("{{ bos_token }}<|system|>\nAnswer in one word.\n{% for message in messages %}<|{{ message['role'] }}|>\n"
            "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture
def fam_dir(tiny_family, tmp_path) -> Path:
    """A private copy of the test-size tiny family (start model: aligned; useful_lora merges onto it)."""
    shutil.copytree(Path(tiny_family).parent, tmp_path / "tiny")
    return tmp_path / "tiny"


def open_session(fam_dir: Path, cache: Path) -> FamilySession:
    return FamilySession(Family.from_file(fam_dir / "family.yaml"), sets=SETS, cache=DiskCache(cache))


def perturb(path: Path, scale: float = 0.05, seed: int = 0, only: str | None = None) -> None:
    """Add noise to the float tensors of a safetensors file (those whose name contains `only`)."""
    state = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if v.is_floating_point() and (only is None or only in k):
            state[k] = v + scale * torch.randn(v.shape, generator=g).to(v.dtype)
    save_file(state, path, metadata={"format": "pt"})


def live(scores: dict) -> dict:
    return {k: scores[k] for k in names.LIVE}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


# ------------------------------------------------------------------------------------------------ fresh after edits


def test_an_edited_chat_template_gives_fresh_live_and_generation_scores(fam_dir, tmp_path):
    s = open_session(fam_dir, tmp_path / "cache")
    before = {n: live(s.checkpoint_scores(n)) for n in ("aligned", "harmful")}
    before["point"] = live(s.point_scores("harmful", POINT))
    gen_before = s.generation_scores("aligned", max_new_tokens=4)[0]

    (fam_dir / "aligned" / "chat_template.jinja").write_text(TEMPLATE)  # the start model's: the session's tokenizer
    after = {n: live(s.checkpoint_scores(n)) for n in ("aligned", "harmful")}
    after["point"] = live(s.point_scores("harmful", POINT))
    assert s.tokenizer.chat_template == TEMPLATE, "the open session reloaded the tokenizer"
    fresh = open_session(fam_dir, tmp_path / "fresh")
    want = {n: live(fresh.checkpoint_scores(n)) for n in ("aligned", "harmful")}
    want["point"] = live(fresh.point_scores("harmful", POINT))
    reopened = open_session(fam_dir, tmp_path / "cache")
    again = {n: live(reopened.checkpoint_scores(n)) for n in ("aligned", "harmful")}
    again["point"] = live(reopened.point_scores("harmful", POINT))
    for n in want:
        assert_same(after[n], want[n])
        assert_same(again[n], want[n])
        assert after[n][names.MARGIN_MEAN] != pytest.approx(before[n][names.MARGIN_MEAN], rel=1e-3), n
        assert after[n][names.NLL_MEAN] != pytest.approx(before[n][names.NLL_MEAN], rel=1e-3), n
    assert after["harmful"][names.KL_TO_START] != pytest.approx(before["harmful"][names.KL_TO_START], rel=1e-3)
    gen_after = s.generation_scores("aligned", max_new_tokens=4)[0]
    assert gen_after == fresh.generation_scores("aligned", max_new_tokens=4)[0]
    assert s.cache.info().set_index("namespace").loc["generation_scores", "entries"] == 2, (gen_before, gen_after)


def test_changed_start_weights_give_a_fresh_kl_to_start(fam_dir, tmp_path):
    s = open_session(fam_dir, tmp_path / "cache")
    before = live(s.checkpoint_scores("harmful"))
    perturb(fam_dir / "aligned" / "model.safetensors", only="layers.1.")
    after = live(s.checkpoint_scores("harmful"))  # harmful's own files did not change: its reference did
    want = live(open_session(fam_dir, tmp_path / "fresh").checkpoint_scores("harmful"))
    again = live(open_session(fam_dir, tmp_path / "cache").checkpoint_scores("harmful"))
    assert_same(after, want)
    assert_same(again, want)
    assert after[names.KL_TO_START] != pytest.approx(before[names.KL_TO_START], rel=1e-3)
    for k in (names.MARGIN_MEAN, names.NLL_MEAN):
        assert after[k] == before[k], "harmful's own scores do not depend on the start model"


def test_a_changed_start_model_gives_a_lora_variant_fresh_activations_and_map(fam_dir, tmp_path):
    s = open_session(fam_dir, tmp_path / "cache")
    ps = SETS.harmful
    before = s.states("useful_lora", ps)
    map_before = s.activation_map(["useful_lora", "harmful"], [ps], layer=-1)
    perturb(fam_dir / "aligned" / "model.safetensors")
    after = s.states("useful_lora", ps)
    fresh = open_session(fam_dir, tmp_path / "fresh")
    want = fresh.states("useful_lora", ps)
    assert torch.allclose(after, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(open_session(fam_dir, tmp_path / "cache").states("useful_lora", ps), want,
                          rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after, before, atol=1e-3), "the adapter merges onto the changed start model"
    map_after = s.activation_map(["useful_lora", "harmful"], [ps], layer=-1)
    map_want = fresh.activation_map(["useful_lora", "harmful"], [ps], layer=-1)
    assert map_after[["x", "y"]].to_numpy() == pytest.approx(map_want[["x", "y"]].to_numpy(), rel=1e-4, abs=1e-5)
    assert not map_after[["x", "y"]].equals(map_before[["x", "y"]])


def test_the_key_holds_the_settings_and_the_score_definitions(fam_dir, tmp_path, monkeypatch):
    s = open_session(fam_dir, tmp_path / "cache")
    key = s._key("harmful", None, reference=True)
    assert {"version", "definitions", "tokenizer", "format", "dtype", "device", "model", "reference"} <= set(key)
    assert s._key("harmful", None) != s._key("useful", None)
    s.chat = False
    assert s._key("harmful", None, reference=True) != key
    s.chat = True
    monkeypatch.setattr(s.family, "system_prompt", "You are a careful assistant.")
    assert s._key("harmful", None, reference=True) != key  # a system prompt changes what every score sees
    monkeypatch.undo()
    openings = s.openings
    s.openings = ("I will not",)
    assert s._key("harmful", None, reference=True) != key  # other refusal openings: another live score
    s.openings = openings
    monkeypatch.setattr(scoring, "REFUSAL_MARKERS", scoring.REFUSAL_MARKERS + ("I shall not",))
    assert s._key("harmful", None, reference=True) != key
    monkeypatch.undo()
    assert s._key("harmful", None, reference=True) == key
    point = s._key("harmful", POINT)
    assert {"start", "base", "point", "seed"} <= set(point)


def test_the_judge_key_holds_what_decides_a_local_judges_verdicts(fam_dir):
    """Every local judge kind (hf-chat, hf-classifier, llama-guard, harmbench) is keyed by its model's files and
    dtype, and the harmbench judge by its prompt: editing any of these gives fresh generation scores."""
    folder = str(fam_dir / "harmful")  # a causal LM folder with a tokenizer: a harmbench judge as far as keys go
    key = judge_key(scoring.Judge(kind="harmbench", path=folder))
    assert key["files"] and key["dtype"] == "float32"
    assert judge_key(scoring.Judge(kind="harmbench", path=folder, harmbench_prompt="B={behaviour} G={generation}")) \
        != key
    assert judge_key(scoring.Judge(kind="harmbench", path=folder, dtype="bfloat16")) != key
    perturb(fam_dir / "harmful" / "model.safetensors")
    assert judge_key(scoring.Judge(kind="harmbench", path=folder))["files"] != key["files"]
    assert judge_key(None) is None and judge_key(scoring.Judge()) is None


def test_a_same_size_edit_within_the_same_second_is_seen(tmp_path):
    """Timestamps are coarse: a file changed moments ago is hashed afresh, not trusted by size and mtime."""
    folder = tmp_path / "m"
    random_model(0).save_pretrained(folder)
    ck = Checkpoint.resolve("m", folder)
    gen = folder / "generation_config.json"
    text = gen.read_text()
    assert '"bos_token_id": 1' in text
    stat = gen.stat()
    first = model_fingerprint(ck)
    gen.write_text(text.replace('"bos_token_id": 1', '"bos_token_id": 7'))
    os.utime(gen, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same size and the same mtime
    assert model_fingerprint(ck) != first


# ------------------------------------------------------------------------------------------------ property: the key


def _edit_json(path: Path, **values) -> None:
    d = json.loads(path.read_text())
    d.update(values)
    path.write_text(json.dumps(d, indent=2))


def _set_template(folder: Path, text: str, where: str) -> None:
    """The chat template in chat_template.jinja or inside tokenizer_config.json (the other place cleared)."""
    jinja, config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    d = json.loads(config.read_text())
    d.pop("chat_template", None)
    if where == "jinja":
        jinja.write_text(text)
    else:
        jinja.unlink(missing_ok=True)
        d["chat_template"] = text
    config.write_text(json.dumps(d, indent=2))


def _nudge(path: Path, pick: int, delta: float) -> None:
    state = load_file(path)
    floats = sorted(k for k, v in state.items() if v.is_floating_point())
    name = floats[pick % len(floats)]
    flat = state[name].reshape(-1)
    flat[pick % flat.numel()] += delta
    save_file(state, path, metadata={"format": "pt"})


# which of `_keys` each edit must change: (useful_lora's live scores, a point of harmful, harmful's states)
MEANINGFUL = {
    "template": (True, True, True),  # the start model's tokenizer is every entry's
    "tokenizer_config": (True, True, True),
    "generation_config": (True, True, False),  # the start model's: the adapter's merged model and the reference
    "start_weights": (True, True, False),
    "variant_weights": (False, True, True),
    "adapter_weights": (True, False, False),
    "adapter_config": (True, False, False),
}
NEUTRAL = ("readme", "touch", "same_content", "variant_template", "card")
COUNT = itertools.count(1)


def _apply(fam: Path, kind: str, n: int, text: str, pick: int, delta: float) -> None:
    """One edit of the family copy; `n` (the example's number) makes every meaningful edit new content."""
    start, lora = fam / "aligned", fam / "useful_lora"
    if kind == "template":
        base = (start / "chat_template.jinja").read_text() if (start / "chat_template.jinja").exists() else TEMPLATE
        _set_template(start, base.split("{#")[0] + "{# " + text.replace("#", "") + f" {n} #}}",
                      "jinja" if pick % 2 else "config")
    elif kind == "tokenizer_config":
        _edit_json(start / "tokenizer_config.json", model_max_length=256 + n)
    elif kind == "generation_config":
        _edit_json(start / "generation_config.json", repetition_penalty=1.0 + n / 100)
    elif kind == "start_weights":
        _nudge(start / "model.safetensors", pick, delta)
    elif kind == "variant_weights":
        _nudge(fam / "harmful" / "model.safetensors", pick, delta)
    elif kind == "adapter_weights":
        _nudge(lora / "adapter_model.safetensors", pick, delta)
    elif kind == "adapter_config":
        _edit_json(lora / "adapter_config.json", lora_alpha=16 + n)
    elif kind == "readme":
        folder = [start, lora, fam / "harmful"][pick % 3]
        (folder / "README.md").write_text(text, encoding="utf-8")
    elif kind == "touch":
        files = sorted(p for p in fam.rglob("*") if p.is_file())
        f = files[pick % len(files)]
        t = time.time_ns() - (pick % 1000) * 86_400 * 10**9
        os.utime(f, ns=(t, t))
    elif kind == "same_content":
        files = sorted(p for p in (start.iterdir()) if p.is_file())
        f = files[pick % len(files)]
        tmp = f.with_name(f.name + ".new")
        tmp.write_bytes(f.read_bytes())
        os.replace(tmp, f)  # a new inode and ctime, the same bytes
    elif kind == "variant_template":  # the session formats prompts with the start model's tokenizer only
        (fam / "harmful" / "chat_template.jinja").write_text(TEMPLATE + text, encoding="utf-8")
    elif kind == "card":
        (fam / "card.md").write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def key_family(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("keys") / "tiny"
    shutil.copytree(Path(tiny_family).parent, root)
    return root, open_session(root, root.parent / "cache")


def _keys(s: FamilySession) -> tuple:
    return (s._key("useful_lora", None, reference=True, sets=SETS.key()),
            s._key("harmful", POINT, reference=True, sets=SETS.key()),
            s._key("harmful", None, prompts=SETS.harmful.content_hash))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(list(MEANINGFUL) + list(NEUTRAL)), text=st.text(min_size=1, max_size=40),
       pick=st.integers(0, 10**6), delta=st.floats(1e-3, 0.5) | st.floats(-0.5, -1e-3))
def test_the_key_changes_exactly_when_a_file_that_carries_meaning_does(key_family, kind, text, pick, delta):
    root, s = key_family
    event(kind)
    before = _keys(s)
    _apply(root, kind, next(COUNT), text, pick, delta)
    changed = tuple(a != b for a, b in zip(_keys(s), before))
    assert changed == MEANINGFUL.get(kind, (False, False, False)), kind


def test_key_fingerprints_ignore_what_loading_does_not_read(fam_dir):
    family = Family.from_file(fam_dir / "family.yaml")
    start = family.start_checkpoint
    prints = model_fingerprint(start, family), tokenizer_fingerprint(start, family)
    (fam_dir / "aligned" / "README.md").write_text("notes")
    (fam_dir / "aligned" / "training_args.json").write_text("{}")
    assert (model_fingerprint(start, family), tokenizer_fingerprint(start, family)) == prints
    (fam_dir / "aligned" / "special_tokens_map.json").write_text("{}")
    assert tokenizer_fingerprint(start, family) != prints[1]
    lora = family.checkpoint("useful_lora")
    assert lora.fingerprint(family) != lora.fingerprint(), "an adapter's tensors include its start model's"


# ------------------------------------------------------------------------------------------------ broken checkpoints


def _drop_lora_b(fam: Path) -> None:
    f = fam / "useful_lora" / "adapter_model.safetensors"
    state = load_file(f)
    state.pop(sorted(k for k in state if "lora_B" in k)[0])
    save_file(state, f)


def _lora_b_of_another_rank(fam: Path) -> None:
    f = fam / "useful_lora" / "adapter_model.safetensors"
    state = load_file(f)
    k = sorted(k for k in state if "lora_B" in k)[0]
    state[k] = torch.zeros(state[k].shape[0], state[k].shape[1] + 1)
    save_file(state, f)


def _config_of_another_size(fam: Path) -> None:
    f = fam / "useful" / "config.json"
    cfg = json.loads(f.read_text())
    f.write_text(json.dumps(cfg | {"hidden_size": cfg["hidden_size"] - 16}))


BROKEN = {
    "adapter-config-not-json": ("useful_lora", lambda fam: (fam / "useful_lora" / "adapter_config.json")
                                .write_text('{"r": 8,'), ("adapter 'useful_lora'", "adapter_config.json",
                                                          "not valid JSON")),
    "adapter-config-not-an-object": ("useful_lora", lambda fam: (fam / "useful_lora" / "adapter_config.json")
                                     .write_text("[1, 2]"), ("adapter 'useful_lora'", "JSON object")),
    "adapter-without-lora-b": ("useful_lora", _drop_lora_b, ("adapter 'useful_lora'", "has lora_A but no lora_B")),
    "adapter-ranks-differ": ("useful_lora", _lora_b_of_another_rank, ("adapter 'useful_lora'", "do not multiply")),
    "tokenizer-json-corrupt": ("useful", lambda fam: (fam / "aligned" / "tokenizer.json").write_text('{"model": '),
                               ("checkpoint 'aligned'", "tokenizer.json", "not valid JSON")),
    "tokenizer-json-not-a-tokenizer": ("useful", lambda fam: (fam / "aligned" / "tokenizer.json")
                                       .write_text('{"version": "1.0"}'),
                                       ("checkpoint 'aligned'", "tokenizer cannot be loaded")),
    "hidden-size-mismatch": ("useful", _config_of_another_size,
                             ("checkpoint 'useful'", "config.json does not match its weights",
                              "model.embed_tokens.weight", "in the weights", "by config.json")),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_checkpoint_is_one_line_naming_it_and_the_problem(case, fam_dir, tmp_path, capsys):
    model, brk, words = BROKEN[case]
    brk(fam_dir)
    out = tmp_path / "out" / "scores.csv"
    code, _, err = run(["score", "--family", fam_dir / "family.yaml", "--model", model, "--n-prompts", "2",
                        "--max-new-tokens", "2", "--out", out], capsys)
    line = assert_one_line(code, err, words)
    assert "look at the above report" not in err and "MISMATCH" not in err, err
    assert not out.exists(), line


def test_a_hidden_size_mismatch_names_both_shapes(fam_dir):
    _config_of_another_size(fam_dir)
    hidden = json.loads((fam_dir / "aligned" / "config.json").read_text())["hidden_size"]
    vocab = json.loads((fam_dir / "aligned" / "config.json").read_text())["vocab_size"]
    with pytest.raises(SafesubError) as err:
        check_shapes(Checkpoint.resolve("useful", fam_dir / "useful"))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"model.embed_tokens.weight is ({vocab}, {hidden}) in the weights, ({vocab}, {hidden - 16}) by config.json" \
        in msg, msg
