"""SafeLoRA (safesub_core/safelora.py): the formulas on random matrices, and the plan over a small synthetic family."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from safesub_core import safelora as sl
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from tests.factories import write_family


def test_projection_and_similarity_equal_the_formula():
    g = torch.Generator().manual_seed(0)
    V, dW = torch.randn(12, 7, generator=g), torch.randn(12, 7, generator=g)
    C = sl.projection_matrix(V)
    assert torch.allclose(C, V @ V.T / torch.linalg.matrix_norm(V), atol=1e-6)
    assert torch.allclose(sl.projected_update(V, dW), C @ dW, atol=1e-5)
    CdW = (C @ dW).double()
    expected = float((dW.double() * CdW).sum() / (dW.double().norm() * CdW.norm()))
    assert sl.similarity(dW, C) == pytest.approx(expected, abs=1e-6)
    assert 0 <= sl.similarity(dW, C) <= 1
    assert sl.similarity(dW, 5 * C) == pytest.approx(expected, abs=1e-6)  # C's scale does not matter ...
    assert not torch.allclose(C @ C, C, atol=1e-3)  # ... and C is no projector
    assert sl.similarity(V, C) > sl.similarity(dW, C)  # the alignment update itself lies in C's range
    # a 3-D tensor is taken as (shape[0], -1), like the rest of safesub
    V3, dW3 = V.reshape(12, 7, 1), dW.reshape(12, 7, 1)
    assert torch.allclose(sl.projected_update(V3, dW3).reshape(12, 7), C @ dW, atol=1e-5)
    # edge cases: no update, no alignment update
    assert math.isnan(sl.similarity(torch.zeros(12, 7), C))
    assert sl.similarity(dW, sl.projection_matrix(torch.zeros(12, 7))) == 0.0
    assert torch.equal(sl.projected_update(torch.zeros(12, 7), dW), torch.zeros(12, 7))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return Family.from_file(write_family(tmp_path_factory.mktemp("fam"), variants=("useful", "harmful")))


def _weights(family: Family, role: str) -> dict[str, torch.Tensor]:
    path = family.checkpoint(role).path
    return {k: v.float() for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_plan_projects_exactly_the_layers_under_tau(family):
    base, start, ft = _weights(family, "base"), _weights(family, "aligned"), _weights(family, "harmful")
    table = sl.safelora_similarities(family, "harmful")
    plan_rows = table[table["in_plan"]]
    assert set(plan_rows["tensor"]) == {n for n in table["tensor"] if start[n].dim() >= 2}
    assert "lm_head.weight" not in set(table["tensor"])  # tied: counted once, as the embedding
    for _, row in table.iterrows():
        n = row["tensor"]
        if row["in_plan"]:
            assert row["similarity"] == pytest.approx(
                sl.similarity(ft[n] - start[n], sl.projection_matrix(start[n] - base[n])), abs=1e-5)
        else:
            assert math.isnan(row["similarity"])
    tau = float(plan_rows["similarity"].median())
    plan = sl.safelora_plan(family, "harmful", tau, similarities=table)
    expected = set(plan_rows.loc[plan_rows["similarity"] < tau, "tensor"])
    assert set(plan.projected[plan.projected].index) == expected
    assert 0 < len(expected) < len(plan_rows)

    root = family.checkpoint("aligned").path
    working = LlamaForCausalLM.from_pretrained(root, local_files_only=True).eval()
    reference = LlamaForCausalLM.from_pretrained(root, local_files_only=True).eval()
    sl.apply(working, reference, plan)
    params = dict(working.named_parameters())
    for n in table["tensor"]:
        dW = ft[n] - start[n]
        want = start[n] + (sl.projection_matrix(start[n] - base[n]) @ dW if n in expected else dW)
        assert torch.allclose(params[n], want, atol=1e-5), n
    assert torch.equal(dict(reference.named_parameters())[n], start[n])  # the reference untouched

    # tau moves on the same table, reading nothing; an incremental apply equals a fresh one
    moved = plan.at(tau / 2)
    assert moved.table is table and moved.projected.sum() < plan.projected.sum()
    sl.apply(working, reference, moved, applied=plan)
    fresh = LlamaForCausalLM.from_pretrained(root, local_files_only=True).eval()
    sl.apply(fresh, reference, moved)
    for (n, p), (_, q) in zip(working.named_parameters(), fresh.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_summary_is_a_global_ratio(family):
    start, ft, base = _weights(family, "aligned"), _weights(family, "useful"), _weights(family, "base")
    plan = sl.safelora_plan(family, "useful", 0.0)
    assert plan.summary()["n_projected"] == 0
    assert plan.summary()["energy_kept"] == pytest.approx(1.0)
    assert plan.summary()["cos_task_kept"] == pytest.approx(1.0)
    everything = plan.at(2.0)
    s = everything.summary()
    assert s["n_projected"] == s["n_tensors"] and s["share_projected"] == 1.0
    task = kept = dot = 0.0
    for n in plan.table["tensor"]:
        dW = (ft[n] - start[n]).double()
        upd = (sl.projection_matrix(start[n] - base[n]).double() @ dW) if dW.dim() >= 2 else dW
        task, kept, dot = task + float(dW.pow(2).sum()), kept + float(upd.pow(2).sum()), dot + float((dW * upd).sum())
    assert s["energy_kept"] == pytest.approx(kept / task, rel=1e-4)
    assert s["cos_task_kept"] == pytest.approx(dot / math.sqrt(task * kept), rel=1e-4)
    frame = everything.frame()
    assert {"projected", "applied_norm", "dot_applied", "similarity", "block", "module"} <= set(frame.columns)


def test_modules_and_bad_inputs(family):
    table = sl.safelora_similarities(family, "useful", modules=("q", "v"))
    assert set(table.loc[table["in_plan"], "module"]) == {"q", "v"}
    assert table.loc[~table["in_plan"], "similarity"].isna().all()
    with pytest.raises(SafesubError, match="module type 'attn'"):
        sl.safelora_similarities(family, "useful", modules=("attn",))
    with pytest.raises(SafesubError, match="no fine-tuned variant"):
        sl.safelora_plan(family, "nope", 0.5)
    with pytest.raises(SafesubError, match="finite"):
        sl.safelora_plan(family, "useful", float("inf"), similarities=table)
    with pytest.raises(SafesubError, match="no tensor"):
        sl.safelora_plan(family, "useful", 0.5, similarities=table).update("missing.weight")
