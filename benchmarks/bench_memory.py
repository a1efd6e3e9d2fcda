"""Peak memory of the subspace and overlap computations on a three-checkpoint family (base, aligned, one fine-tune).

Target (issue "Bounded memory"): peak RSS <= 1.5 x one checkpoint + the largest tensor's workspace, where
  one checkpoint  = its parameters in float32, as held in memory (a tied lm_head counted once), and
  workspace       = an exact float32 SVD of the largest 2-D tensor (m x n, k = min(m, n)): the matrix and its
                    U, S, Vh, i.e. (m*n + m*k + k + k*n) * 4 bytes.
Each measurement runs in a fresh child process; its peak RSS is the child's VmHWM (/proc/self/status) read at
its end, so the import of Python + torch + safesub_core is inside every figure. Measurements:
  import    the bare child: Python + torch + safesub_core (+ transformers) imported, nothing computed (baseline);
  load      one checkpoint (the aligned model) loaded with transformers in float32 and every parameter read once
            (float32 files may be memory-mapped, counted once touched): the "one checkpoint" reference;
  engine    SubspaceEngine.build(family, 'useful', cache=DiskCache(<empty tmp>)) + a diagnostics sweep
            (3 subspaces x 2 modes x 5 rank fractions): cold (every SVD computed, cache written) and warm (a
            second child reading the bases back from that cache);
  overlap   overlap.weight_overlap(family, 'aligned', pairs=[('useful', 'base')]) on an empty cache.
Families:
  smol      cache/families/smol (SmolLM2-135M shapes, float32 safetensors), viewed as base, aligned, useful;
  llama1b   random checkpoints of Llama-3.2-1B's shapes (LlamaConfig written here: vocab 128256, hidden 2048,
            intermediate 8192, 32 heads, 8 kv heads, tied embeddings, rope_theta 500000), saved as bfloat16
            safetensors (as the released model is), one shard per block: base = a random init (N(0, 0.02),
            norms 1), aligned = base + a rank-8 update, useful = aligned + a rank-4 update, written tensor by
            tensor so no full model is ever held. `--layers L` keeps the first L of the 16 blocks (at all 16, with
            two threads, the cold engine took 35 min and the overlap 32 min); the embedding (128256 x 2048, the
            largest tensor) is always there, so the workspace term is the full model's.
Run: `python benchmarks/bench_memory.py [--families smol,llama1b] [--layers 1] [--workdir DIR]`.
The llama1b checkpoints (about 0.7 GB + 0.12 GB per block, each of three) are built once in --workdir and reused.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SUBSPACES, MODES, FRACS = ("topk", "randomk", "random"), ("parallel", "orthogonal"), (0.01, 0.25, 0.5, 0.75, 0.99)
GIB = 2**30


# ------------------------------------------------------------------------------------------------ the child


def peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(task: str, family_file: str, cache_dir: str) -> None:
    from common import machine  # noqa: F401  (sets threads the same way as every benchmark)

    import transformers  # noqa: F401

    from safesub_core.cache import DiskCache
    from safesub_core.loading import load_model
    from safesub_core.family import Family
    from safesub_core.overlap import weight_overlap
    from safesub_core.projection import ProjectionConfig
    from safesub_core.subspace import SubspaceEngine

    family = Family.from_file(family_file)
    extra = {}
    t0 = time.perf_counter()
    if task == "load":
        model, _ = load_model(family.checkpoint("aligned"), family, tokenizer=False)
        extra["params"] = sum(p.numel() for p in model.parameters())
        extra["checksum"] = sum(float(p.sum()) for p in model.parameters())  # every page resident
        del model
    elif task.startswith("engine"):
        engine = SubspaceEngine.build(family, "useful", cache=DiskCache(cache_dir, max_bytes=1 << 40))
        extra["energy_kept"] = {f"{s} {m} {f}": engine.diagnostics(ProjectionConfig(s, m, f)).energy_kept
                                for s in SUBSPACES for m in MODES for f in FRACS}["topk parallel 0.25"]
        extra["resident_tensors"] = sum(t.resident for t in engine.tensors)
        extra["tensors"] = len(engine.tensors)
    elif task == "overlap":
        table = weight_overlap(family, "aligned", pairs=[("useful", "base")], cache=DiskCache(cache_dir))
        extra["rows"] = len(table)
    elif task != "import":
        raise SystemExit(f"unknown task {task}")
    wall = time.perf_counter() - t0
    print("RESULT " + json.dumps(dict(task=task, peak=peak_rss(), wall=wall, **extra)), flush=True)


# ------------------------------------------------------------------------------------------------ families


def three_checkpoint_view(src: Path, out: Path) -> Path:
    """A family file naming only base, aligned and useful of the family at `src` (absolute paths)."""
    import yaml

    spec = yaml.safe_load(src.read_text())
    root = src.resolve().parent
    view = dict(name=f"{spec['name']}-3", base=str(root / spec["base"]), aligned=str(root / spec["aligned"]),
                start="aligned", variants=dict(useful=str(root / spec["variants"]["useful"])))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "family.yaml"
    path.write_text(yaml.safe_dump(view))
    return path


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                       rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
                       eos_token_id=128001, dtype="bfloat16")


def build_llama(workdir: Path, layers: int) -> Path:
    """Three bf16 safetensors checkpoints of Llama-3.2-1B's shapes (first `layers` blocks), written block by block."""
    import hashlib

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    out = workdir / f"llama1b-L{layers}"
    family_file = out / "family.yaml"
    if family_file.exists():
        return family_file
    if out.exists():
        shutil.rmtree(out)
    cfg = llama_config(layers)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items() if k != "lm_head.weight"}
    groups: dict[str, list[str]] = {}
    for n in shapes:
        groups.setdefault(n.split(".")[2] if ".layers." in n else "rest", []).append(n)
    order = ["rest"] + [g for g in groups if g != "rest"]
    roles = ("base", "aligned", "useful")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for role in roles:
        (tmp / role).mkdir(parents=True)
        cfg.to_json_file(str(tmp / role / "config.json"))
    files = {g: f"model-{i + 1:05d}-of-{len(order):05d}.safetensors" for i, g in enumerate(order)}

    def gen(name, *shape, scale=1.0):
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % 2**63
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale

    total = 0
    for g in order:
        shards = {r: {} for r in roles}
        for n in groups[g]:
            shape = shapes[n]
            w = torch.ones(shape) if len(shape) == 1 else gen(n, *shape, scale=0.02)
            shards["base"][n] = w.bfloat16()
            for role, rank, scale in (("aligned", 8, 2e-3), ("useful", 4, 1e-3)):
                if len(shape) == 1:
                    w += gen(f"{role}:{n}", *shape, scale=scale)
                else:  # B A with entries N(0, 1) / sqrt(rank): about `scale` per entry
                    w += gen(f"{role}:B:{n}", shape[0], rank, scale=scale / rank**0.5) @ gen(f"{role}:A:{n}", rank,
                                                                                           shape[1])
                shards[role][n] = w.bfloat16()
            total += w.numel() * 2
            del w
        for role in roles:
            save_file(shards[role], str(tmp / role / files[g]), metadata={"format": "pt"})
        del shards
    for role in roles:
        index = dict(metadata=dict(total_size=total), weight_map={n: files[g] for g in order for n in groups[g]})
        (tmp / role / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (tmp / "family.yaml").write_text(
        "name: llama1b-random\nbase: base\naligned: aligned\nstart: aligned\nvariants:\n  useful: useful\n")
    os.replace(tmp, out)
    return family_file


# ------------------------------------------------------------------------------------------------ the parent


def run_child(task: str, family_file: Path, cache_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", task, str(family_file), str(cache_dir)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{task} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def sizes(family_file: Path) -> tuple[int, int, tuple]:
    """(one checkpoint's float32 bytes, the largest 2-D tensor's SVD workspace bytes, its shape)."""
    import math

    from safesub_core.family import Family

    reader = Family.from_file(family_file).reader("aligned")
    numel = sum(math.prod(reader.shape(n)) for n in reader.names())
    m, n = max((reader.shape(x) for x in reader.names() if len(reader.shape(x)) == 2), key=math.prod)
    k = min(m, n)
    return 4 * numel, 4 * (m * n + m * k + k + k * n), (m, n)


def measure(label: str, family_file: Path, tasks: list[str]) -> list[dict]:
    ckpt, work, shape = sizes(family_file)
    target = 1.5 * ckpt + work
    print(f"\n== {label}: {family_file}")
    print(f"one checkpoint (float32) {ckpt / GIB:.3f} GiB; largest 2-D tensor {shape[0]}x{shape[1]}, "
          f"SVD workspace {work / GIB:.3f} GiB; target 1.5 x {ckpt / GIB:.3f} + {work / GIB:.3f} = "
          f"{target / GIB:.3f} GiB")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-cache-") as cache:
        base = None
        for task in tasks:
            kind = "engine" if task.startswith("engine") else task  # cold and warm share one cache folder
            r = run_child(kind, family_file, Path(cache) / kind)
            r["task"] = task
            base = r["peak"] if task == "import" else base
            ratio = r["peak"] / target
            extra = {k: v for k, v in r.items() if k not in ("task", "peak", "wall")}
            print(f"{task:13s} peak {r['peak'] / GIB:7.3f} GiB (above import {(r['peak'] - (base or 0)) / GIB:7.3f})"
                  f"  {ratio:5.2f} x target  wall {r['wall']:8.1f} s  {extra}", flush=True)
            rows.append(dict(r, family=label, target=target, checkpoint=ckpt, workspace=work, ratio=ratio))
    return rows


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="smol,llama1b")
    ap.add_argument("--layers", type=int, default=1, help="blocks of the Llama-3.2-1B-shaped checkpoints (of 16)")
    ap.add_argument("--workdir", default=None, help="where the llama1b checkpoints are built once and reused "
                                                    "(default: a temporary folder, deleted at the end)")
    ap.add_argument("--tasks", default="import,load,engine-cold,engine-warm,overlap")
    args = ap.parse_args()
    from common import machine

    print(machine())
    tasks = args.tasks.split(",")
    rows = []
    tmp = None
    for fam in args.families.split(","):
        if fam == "smol":
            view = Path(tempfile.mkdtemp(prefix="bench-memory-smol-"))
            try:
                rows += measure("smol", three_checkpoint_view(REPO / "cache/families/smol/family.yaml", view), tasks)
            finally:
                shutil.rmtree(view)
        elif fam == "llama1b":
            workdir = Path(args.workdir) if args.workdir else Path(tmp := tempfile.mkdtemp(prefix="bench-memory-"))
            t0 = time.perf_counter()
            family_file = build_llama(workdir, args.layers)
            print(f"\nllama1b checkpoints ({args.layers} of 16 blocks, bf16) ready in {time.perf_counter() - t0:.0f} s")
            rows += measure(f"llama1b-L{args.layers}", family_file, tasks)
        else:
            raise SystemExit(f"unknown family {fam}")
    if tmp:
        shutil.rmtree(tmp)
    worst = max((r for r in rows if r["task"] not in ("import", "load")), key=lambda r: r["ratio"], default=None)
    if worst:
        print(f"\nworst: {worst['family']} {worst['task']} at {worst['ratio']:.2f} x target (target: <= 1.00)")


if __name__ == "__main__":
    main()
