"""GPU path: the sweep and the scores on CUDA in float32, bfloat16 and float16, with timings.

Two families of random weights made from configs on the GPU (shapes, not behaviour, set the cost):
  smol  SmolLM2-135M's shapes (30 layers, hidden 576, vocab 49152), float32 on disk;
  1b    Llama-3.2-1B's shapes (16 layers, hidden 2048, MLP 8192, vocab 128256), bfloat16 on disk, as released.
Each is base, aligned = base + a rank-64 update + small dense noise, and fine-tunes = aligned + an update, all
saved as safetensors; the tokenizer is the one passed with --tokenizer (default: the smol demo family's).
The real smol family cannot travel to a device machine (538 MB a checkpoint), hence smol-shaped weights.

Per family:
  sweep    ours: SubspaceEngine.build on cuda (one exact SVD per tensor, bases cached) + the diagnostics of
           3 subspaces x 2 modes x 5 rank fractions; warm: the same from the disk cache. Baseline in the same
           run: torch.svd_lowrank(dA, q=k, niter=2) per tensor per point on cuda (the study's code), for the
           5 Top-K points (Random-K / Random cost the same or more, so 30 points would be 6x that).
  scores   per dtype: the session's live read-out of a point (projection applied + margins, answer NLL, 12-token
           greedy arithmetic, KL), the read-out after a slider move (all at once, and as the Subspaces page runs
           it: the forward-pass scores, then the exact match), and generation scores; baseline: a bare
           batched forward pass over the harmful prompts. Margins in bf16 / fp16 against fp32 (max |diff|).
CPU-only machines print one line and exit 0. Run: `python benchmarks/bench_gpu.py [--families smol,1b]
[--dtypes float32,bfloat16,float16] [--stages sweep,scores] [--out results.json]`; tests/test_gpu.py (marked gpu) checks the same paths for correctness.
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
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def sync():
    torch.cuda.synchronize()


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
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}

    def update(params, rank, scale):
        out = {}
        for k, w in params.items():
            if w.dim() == 2:
                m, n = w.shape
                a = torch.randn(m, rank, device="cuda", generator=g)
                b = torch.randn(rank, n, device="cuda", generator=g)
                step = (a @ b) / math.sqrt(rank * n) + 0.1 * torch.randn(m, n, device="cuda", generator=g) / math.sqrt(n)
            else:
                step = torch.randn(w.shape, device="cuda", generator=g)
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
    torch.cuda.empty_cache()
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
        engine = SubspaceEngine.build(family, variant, device="cuda", cache=DiskCache(cache_dir, max_bytes=1 << 36),
                                      progress=progress)
        return engine, {p: engine.diagnostics(p).energy_kept for p in points}

    torch.cuda.reset_peak_memory_stats()
    (engine, cold), t_cold = timed(ours)
    peak = torch.cuda.max_memory_allocated()
    (_, warm), t_warm = timed(ours)
    assert all(abs(cold[p] - warm[p]) < 1e-9 for p in points), "warm sweep differs from cold"
    assert all(abs(cold[ProjectionConfig(s, "parallel", f)] + cold[ProjectionConfig(s, "orthogonal", f)] - 1) < 1e-4
               for s in ("topk", "randomk", "random") for f in (0.01, 0.25, 0.5, 0.75, 0.99)), "E_par + E_orth != 1"

    base, start, ft = family.reader("base"), family.reader(family.start), family.reader(variant)
    pairs = []
    for n in start.names():
        wa = start.get(n).float()
        pairs.append((as_matrix(wa - base.get(n).float()).cuda(), as_matrix(ft.get(n).float() - wa).cuda()))

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
    torch.cuda.empty_cache()
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
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cache = DiskCache(cache_dir, max_bytes=1 << 36)  # the sweep's: the bases are read back, not recomputed
        session, t_load = timed(lambda: FamilySession(family, device="cuda", dtype=dtype, sets=sets, cache=cache))
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
                batch = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt").to("cuda")
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
                         peak_cuda_gib=torch.cuda.max_memory_allocated() / 2**30)
        session = model = None  # free this dtype's models before the next
    for name in ("bfloat16", "float16"):
        if name in margins and "float32" in margins:
            out[name]["margin_max_abs_diff_vs_fp32"] = float((margins[name] - margins["float32"]).abs().max())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="smol,1b")
    ap.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the smol family's base)")
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here too (after each stage)")
    ap.add_argument("--baseline-fracs", default="0.01,0.25,0.5,0.75,0.99",
                    help="rank fractions of the per-point SVD baseline (Top-K, parallel)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="dtypes of the scores stage (default: all three)")
    ap.add_argument("--stages", default="sweep,scores", help="sweep, scores or both (scores builds the bases "
                                                            "itself when the sweep did not run)")
    args = ap.parse_args()
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    if not set(dtypes) <= set(DTYPES) or not stages or not stages <= {"sweep", "scores"}:
        print(f"error: --dtypes must name some of {', '.join(DTYPES)} and --stages some of sweep, scores",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_gpu: skipped (no CUDA device on this machine)")
        return 0
    print(f"machine: {machine()}; gpu: {torch.cuda.get_device_name()}")
    repo = Path(__file__).resolve().parent.parent
    tokenizer = Path(args.tokenizer or repo / "cache" / "families" / "smol" / "base")
    if not (tokenizer / "tokenizer.json").is_file():
        print(f"error: tokenizer folder {tokenizer}: has no tokenizer.json", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="safesub_gpu_"))
    results = dict(machine=machine(), gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    from safesub_core.family import Family

    for shape in [s.strip() for s in args.families.split(",") if s.strip()]:
        path, t_make = timed(lambda: make_family(work / shape, shape, tokenizer))
        family = Family.from_file(path)
        print(f"== {family.name}: made in {t_make:.1f} s", flush=True)
        fracs = tuple(float(x) for x in args.baseline_fracs.split(","))
        results[shape] = dict(make_s=t_make)
        for stage, run in (("sweep", lambda: bench_sweep(family, "useful", work / f"{shape}_cache", fracs)),
                           ("scores", lambda: bench_scores(family, "useful", work / f"{shape}_cache", args.n_prompts,
                                                           dtypes))):
            if stage not in stages:
                continue
            results[shape][stage] = run()
            print(json.dumps({stage: results[shape][stage]}, indent=1), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1))
        shutil.rmtree(work / shape, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
