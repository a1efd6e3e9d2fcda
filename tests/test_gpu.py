"""The CUDA path on the test-size tiny family: the engine on the GPU agrees with the CPU, and the session scores in
float32, bfloat16 and float16. Marked gpu; skipped cleanly on machines without CUDA (benchmarks/bench_gpu.py
times the same paths at the smol and Llama-3.2-1B shapes)."""
import math

import pytest
import torch

from safesub_core.cache import DiskCache
from safesub_core.loading import load_model
from safesub_core.family import Family
from safesub_core.projection import ProjectionConfig
from safesub_core.prompts import EvalSets
from safesub_core.session import FamilySession
from safesub_core.subspace import SubspaceEngine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

POINTS = [ProjectionConfig(s, m, f) for s in ("topk", "randomk", "random") for m in ("parallel", "orthogonal")
          for f in (0.01, 0.5, 0.99)]


@pytest.fixture(scope="module")
def family(tiny_family):
    return Family.from_file(tiny_family)


def test_engine_on_cuda_matches_the_cpu_engine(family, tmp_path):
    cpu = SubspaceEngine.build(family, "useful", device="cpu", cache=DiskCache(tmp_path / "cpu"))
    gpu = SubspaceEngine.build(family, "useful", device="cuda", cache=DiskCache(tmp_path / "gpu"))
    for p in POINTS:
        assert gpu.diagnostics(p).energy_kept == pytest.approx(cpu.diagnostics(p).energy_kept, abs=1e-4), p.label
    model_cpu, _ = load_model(family.start_checkpoint, family, "cpu", torch.float32, tokenizer=False)
    ref_cpu, _ = load_model(family.start_checkpoint, family, "cpu", torch.float32, tokenizer=False)
    model_gpu, _ = load_model(family.start_checkpoint, family, "cuda", torch.float32, tokenizer=False)
    ref_gpu, _ = load_model(family.start_checkpoint, family, "cuda", torch.float32, tokenizer=False)
    cfg = ProjectionConfig("topk", "parallel", 0.5)
    cpu.apply(model_cpu, ref_cpu, cfg)
    gpu.apply(model_gpu, ref_gpu, cfg)
    for (name, a), (_, b) in zip(model_cpu.state_dict().items(), model_gpu.state_dict().items()):
        assert torch.allclose(a, b.cpu(), atol=1e-4), name


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.25), (torch.float16, 0.05)])
def test_session_scores_on_cuda_in_each_dtype_agree_with_the_cpu(family, tmp_path, dtype, tol):
    sets = EvalSets.default(8)
    cfg = ProjectionConfig("topk", "parallel", 0.5)
    cpu = FamilySession(family, sets=sets, cache=DiskCache(tmp_path / "cpu")).point_scores("harmful", cfg)
    session = FamilySession(family, device="cuda", dtype=dtype, sets=sets, cache=DiskCache(tmp_path / "gpu"))
    assert next(session.working.parameters()).device.type == "cuda"
    assert next(session.working.parameters()).dtype == dtype
    gpu = session.point_scores("harmful", cfg)
    assert all(math.isfinite(v) for v in gpu.values() if isinstance(v, float))
    assert gpu["energy_kept"] == pytest.approx(cpu["energy_kept"], abs=1e-4)
    assert gpu["margin_mean"] == pytest.approx(cpu["margin_mean"], abs=tol)
    summary, table = session.generation_scores("harmful", cfg, max_new_tokens=8)
    assert len(table) == len(sets.harmful) + len(sets.utility) + len(sets.edgy)
    assert 0.0 <= summary["refusal_rate"] <= 1.0
