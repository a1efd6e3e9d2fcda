"""Device maps (safesub_core/placement.py): a model split over a map runs through accelerate's hooks and scores,
projects, generates and gives activations as the whole model does; bad maps are one line before any weight is read.

No GPU here, so the split is a map of the tiny family's blocks onto the CPU with the hooks forced on: every module
then runs through the same AlignDevicesHook path (inputs moved to the module's device, outputs back) as on a
multi-GPU host. tests/test_gpu.py covers CUDA."""
from __future__ import annotations

import pytest
import torch

from safesub_core.cache import DiskCache
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.loading import load_model
from safesub_core.placement import Placement, parse_device_map, parse_max_memory
from safesub_core.projection import ProjectionConfig
from safesub_core.prompts import EvalSets
from safesub_core.session import FamilySession

pytestmark = pytest.mark.slow
SETS = EvalSets.default(8)


def _split_map(family: Family) -> dict[str, str]:
    import json
    n = json.loads((family.start_checkpoint.path / "config.json").read_text())["num_hidden_layers"]
    return {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)}, "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _hooked(model) -> int:
    return sum(hasattr(m, "_hf_hook") for m in model.modules())


def test_a_placed_family_scores_projects_and_generates_like_the_whole_one(tiny_family, tmp_path):
    family = Family.from_file(tiny_family)
    whole = FamilySession(family, sets=SETS, batch=8, cache=DiskCache(tmp_path / "whole"))
    placed = FamilySession(family, sets=SETS, batch=8, cache=DiskCache(tmp_path / "placed"),
                           placement=Placement.parse(_split_map(family)))
    assert _hooked(placed.reference) > 2 and _hooked(placed.working) > 2 and _hooked(whole.reference) == 0
    assert placed.working is not placed.reference
    for name in ("aligned", "harmful"):
        a, b = whole.checkpoint_scores(name, waves=1), placed.checkpoint_scores(name, waves=1)
        assert b["margin_mean"] == pytest.approx(a["margin_mean"], abs=1e-4)
        assert b["kl_to_start"] == pytest.approx(a["kl_to_start"], abs=1e-5)
        assert b["arith_exact_match"] == a["arith_exact_match"]
    for rho in (0.5, 0.25):  # a fresh composition, then a rank move
        cfg = ProjectionConfig("topk", "orthogonal", rank_fraction=rho)
        a, b = whole.point_scores("harmful", cfg, waves=1), placed.point_scores("harmful", cfg, waves=1)
        assert b["margin_mean"] == pytest.approx(a["margin_mean"], abs=1e-4)
        assert b["nll_mean"] == pytest.approx(a["nll_mean"], abs=1e-4)
    wa = dict(whole.projected("harmful", cfg).named_parameters())
    for name, p in placed.projected("harmful", cfg).named_parameters():
        assert torch.allclose(p, wa[name], atol=1e-6), name
    prompt = SETS.harmful.prompts[0]
    assert placed.inspect("harmful", prompt)[0] == whole.inspect("harmful", prompt)[0]
    sa, sb = whole.states("useful", SETS.benign), placed.states("useful", SETS.benign)
    assert torch.allclose(sa, sb, atol=1e-4)
    assert placed._key("aligned")["placement"] != whole._key("aligned").get("placement")


def test_a_lora_variant_loads_onto_a_map(tiny_family):
    family = Family.from_file(tiny_family)
    lora = [v for v in family.variants if family.checkpoint(v).kind == "lora"]
    if not lora:
        pytest.skip("the test-size tiny family has no LoRA variant")
    whole = load_model(family.checkpoint(lora[0]), family, tokenizer=False)[0]
    placed = load_model(family.checkpoint(lora[0]), family, tokenizer=False,
                        placement=Placement.parse(_split_map(family)))[0]
    wp = dict(whole.named_parameters())
    assert all(torch.allclose(p, wp[n]) for n, p in placed.named_parameters())


@pytest.mark.parametrize("device_map, max_memory, message", [
    ('{"model.layers.0": "cuda:3", "": "cpu"}', None, "names cuda:3, but this machine has"),
    ('{"": "disk"}', None, "'disk' offload is not supported"),
    ('{"": "tpu"}', None, "unknown device 'tpu'"),
    ('{"model.layers.99": "cpu", "": "cpu"}', None, "module 'model.layers.99' is not in the model"),
    ('{"model.embed_tokens": "cpu"}', None, "device map: leaves out"),
    ("everywhere", None, "device map 'everywhere': expected one of auto"),
    ("{not json", None, "device map: not valid JSON"),
    ("~u= 9,mz\u202e\\@M/", None, "expected one of auto"),  # an unknown ~user (found by the link property test)
    ("~no-such-user-here/map.json", None, "expected one of auto"),
    ("m" * 5000, None, "expected one of auto"),  # a name too long for the system
    ("map\x00.json", None, "expected one of auto"),
    ("auto", "cpu=1KiB", "max_memory: 0.00 GiB in all, but the model needs about"),
    ("auto", "cpu=lots", "max_memory[cpu]: 'lots' is not a size"),
    (None, "cpu=1GiB", "max_memory: needs a device map"),
])
def test_bad_device_maps_are_one_line_before_any_weight_is_read(tiny_family, device_map, max_memory, message,
                                                                 monkeypatch):
    family = Family.from_file(tiny_family)
    import safesub_core.loading as loading

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(SafesubError) as err:
        load_model(family.start_checkpoint, family, tokenizer=False,
                   placement=Placement.parse(device_map, max_memory))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_max_memory_text_and_the_main_device():
    assert parse_max_memory("cpu=2GiB") == {"cpu": 2 * 2**30}
    assert parse_max_memory(None) is None
    assert parse_max_memory(" ") is None and parse_max_memory(" , ") is None  # blank text is no max_memory ...
    assert Placement.parse(None, " ") is None  # ... so it needs no device map (a link may carry it blank)
    assert Placement.parse('{"": "cpu"}').main_device == "cpu"
    assert Placement.parse("auto").main_device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert Placement.parse(None) is None


def test_a_device_map_file_is_read_and_a_broken_one_is_one_line(tmp_path, monkeypatch):
    good = tmp_path / "map.json"
    good.write_text('{"model.embed_tokens": "cpu", "": "cpu"}', encoding="utf-8")
    assert parse_device_map(str(good)) == {"model.embed_tokens": "cpu", "": "cpu"}
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_device_map("~/map.json") == {"model.embed_tokens": "cpu", "": "cpu"}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(SafesubError, match=r"device map file .*bad.json: not valid JSON") as err:
        parse_device_map(str(bad))
    assert "\n" not in str(err.value)
