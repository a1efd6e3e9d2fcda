"""Small synthetic checkpoints for tests: random Llama weights with known updates, saved as HF directories."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config(**kw) -> LlamaConfig:
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaConfig(**(cfg | kw))


def random_model(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**kw)).eval()


@torch.no_grad()
def perturbed(model: LlamaForCausalLM, seed: int, scale: float = 0.05, rank: int | None = 4) -> LlamaForCausalLM:
    """A copy of `model` plus a random update (low-rank for matrices when `rank` is set, dense for vectors)."""
    g = torch.Generator().manual_seed(seed)
    out = LlamaForCausalLM(model.config).eval()
    out.load_state_dict(model.state_dict())
    for _, p in out.named_parameters():
        if p.dim() == 2 and rank:
            p += scale * torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g) / rank
        else:
            p += scale * torch.randn(p.shape, generator=g)
    return out


def write_family(root: Path, variants=("useful", "harmful", "contaminated"), safety: bool = True,
                 safety_variants=("useful_s", "harmful_s"), **kw) -> Path:
    """base, aligned (base + update), optional safety (base + update) and variants (aligned + update), and with
    safety the S-started variants (safety + update); family.yaml."""
    root = Path(root)
    base = random_model(0, **kw)
    aligned = perturbed(base, 1)
    models = {"base": base, "aligned": aligned}
    if safety:
        models["safety"] = perturbed(base, 2)
    for i, v in enumerate(variants):
        models[v] = perturbed(aligned, 10 + i, rank=None if v == "useful" else 4)
    s_variants = safety_variants if safety else ()
    for i, v in enumerate(s_variants):
        models[v] = perturbed(models["safety"], 20 + i, rank=None if v.startswith("useful") else 4)
    for name, m in models.items():
        m.save_pretrained(root / name, safe_serialization=True)
    spec = dict(name="synthetic", base="base", aligned="aligned", variants={v: v for v in variants})
    if safety:
        spec["safety_tuned"] = "safety"
    if s_variants:
        spec["safety_variants"] = {v: v for v in s_variants}
    (root / "family.yaml").write_text(yaml.safe_dump(spec))
    return root / "family.yaml"
