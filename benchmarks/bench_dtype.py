"""The update a projected point applies in bfloat16: the naive composition against the float32 side path.

Issue 17, item 1. Shapes of SmolLM2-135M (hidden 576, intermediate 1536, 9 heads, 3 kv heads, vocab 49152, tied
embeddings); random weights N(0, 0.03) (norms 1), a rank-8 alignment update of s.d. 1e-3 and a dense task update of
s.d. `--update` (2e-4 and 5e-5: the issue's two regimes). Every block has the same shapes, so `--layers` (default 2
of the 30) keeps the run short on 2 cores; the embedding (49152 x 576, the largest tensor) is always there.
Printed per mode at rho = 0.25: the applied update's relative Frobenius error (the effective float32 weight minus
W_start, against alpha X), worst and median over tensors, naive (W_start + alpha X rounded to bfloat16, the old
path) and exact (`ExactUpdates`), and the float32 model's own worst (its rounding floor: a norm's parallel
part, on the line of dA, is tiny against weights of 1); the time of one apply and of one forward (4 x 64
tokens) each way, and the side path's bytes. Run: `python benchmarks/bench_dtype.py [--layers 2] [--update 2e-4,5e-5]`.
"""
import argparse
import statistics
import time

import common  # noqa: F401  (threads, offline)
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safesub_core.linalg import as_matrix
from safesub_core.precision import ExactUpdates, composed_state_dict
from safesub_core.projection import ProjectionConfig
from safesub_core.subspace import SubspaceEngine, TensorProjection, alignment_basis


def smol_config(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True, initializer_range=0.03)


@torch.no_grad()
def engine_for(model: LlamaForCausalLM, update: float) -> SubspaceEngine:
    """A one-variant engine over the model's tensors: dA rank 8 (s.d. 1e-3), dT dense (s.d. `update`)."""
    g = torch.Generator().manual_seed(1)
    tensors = []
    for name, p in model.named_parameters():
        W = as_matrix(p.detach().float())
        M, N = W.shape
        dA = (torch.randn(M, 8, generator=g) @ torch.randn(8, N, generator=g)) * (1e-3 / 8 ** 0.5)
        dT = torch.randn(M, N, generator=g) * update
        b = alignment_basis(dA, name)
        tensors.append(TensorProjection(
            name=name, shape=tuple(p.shape), U=b["U"], s=b["s"], Ur=b["Ur"], perm=b["perm"], C=b["U"].T @ dT,
            Cr=b["Ur"].T @ dT, dT=dT, task_sq=float(dT.double().pow(2).sum()),
            align_sq=float(dA.double().pow(2).sum()), dot_align=float((dT.double() * dA.double()).sum())))
    return SubspaceEngine("smol-shapes", "random", tensors)


def errors(engine: SubspaceEngine, model, reference, cfg) -> list[float]:
    composed, ref = composed_state_dict(model), dict(reference.named_parameters())
    out = []
    for t, k in zip(engine.tensors, engine.ranks(cfg).tolist()):
        target = cfg.alpha * t.kept_update(cfg, k).double()
        if target.norm() > 0:
            out.append(float((composed[t.name].double() - ref[t.name].detach().double() - target).norm()
                             / target.norm()))
    return out


@torch.no_grad()
def naive(engine: SubspaceEngine, model, reference, cfg):
    params, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    for t, k in zip(engine.tensors, engine.ranks(cfg).tolist()):
        t.compose(params[t.name], ref[t.name], cfg, k)
    return model


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--update", default="2e-4,5e-5")
    args = ap.parse_args()
    print(f"machine: {common.machine()}")
    print(f"model: SmolLM2-135M shapes, {args.layers} of 30 blocks, random weights s.d. 0.03, bfloat16")
    torch.manual_seed(0)
    start = LlamaForCausalLM(smol_config(args.layers)).eval()
    tokens = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(2))
    for update in (float(u) for u in args.update.split(",")):
        engine = engine_for(start, update)
        print(f"\ntask update s.d. {update:g}")
        print(f"{'mode':<11} {'naive worst':>12} {'naive median':>13} {'exact worst':>12} {'exact median':>13} "
              f"{'f32 worst':>10} {'apply naive':>12} {'apply exact':>12} {'fwd naive':>10} {'fwd exact':>10} "
              f"{'side MB':>8}")
        for mode in ("parallel", "opposite", "orthogonal"):
            cfg = ProjectionConfig("topk", mode, 0.25)
            ref = start.to(torch.bfloat16)
            old, new = (LlamaForCausalLM(start.config).to(torch.bfloat16).eval() for _ in range(2))
            old.load_state_dict(ref.state_dict())
            new.load_state_dict(ref.state_dict())
            t_old = timed(lambda: naive(engine, old, ref, cfg))
            t_new = timed(lambda: engine.apply(new, ref, cfg))
            e_old, e_new = errors(engine, old, ref, cfg), errors(engine, new, ref, cfg)
            with torch.no_grad():
                old(tokens), new(tokens)  # warm
                f_old, f_new = timed(lambda: old(tokens)), timed(lambda: new(tokens))
            side = getattr(new, ExactUpdates.ATTR).nbytes / 2**20
            start.float()
            f32 = LlamaForCausalLM(start.config).eval()
            f32.load_state_dict(start.state_dict())
            e_f32 = max(errors(engine, engine.apply(f32, start, cfg), start, cfg))  # float32's own rounding
            print(f"{mode:<11} {max(e_old):>12.3e} {statistics.median(e_old):>13.3e} {max(e_new):>12.3e} "
                  f"{statistics.median(e_new):>13.3e} {e_f32:>10.3e} {t_old:>11.2f}s {t_new:>11.2f}s {f_old:>9.2f}s "
                  f"{f_new:>9.2f}s {side:>8.0f}")


if __name__ == "__main__":
    main()
