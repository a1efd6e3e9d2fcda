"""Benchmark: `activations.last_token_states` against a bare batched forward with output_hidden_states=True.

Same prompts, same batch size, same model (a ~1M-parameter Llama built from a config, random weights, with a
word-level tokenizer built here and a small chat template). Baselines:
  bare forward      the batches tokenised beforehand (left padding, in prompt order); only
                    `model(**batch, output_hidden_states=True)` is timed: the strictest reference.
  bare tok+forward  chat formatting, tokenisation and the same forward, all timed.
Two prompt sets: mixed lengths (8..60 words, where batching by length saves padding) and equal lengths (where
it cannot, so the ratio shows the function's own overhead). Runs are interleaved, and the median of
`--repeats` runs after one warm-up is reported, as wall time and as process CPU time (steadier on a shared
machine). Target: last_token_states <= 1.25x the bare forward.

    OMP_NUM_THREADS=1 python benchmarks/bench_activations.py [--prompts 64] [--repeats 7] [--batch-size 16]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from safesub_core.activations import last_token_states  # noqa: E402
from safesub_core.generation import format_prompt  # noqa: E402

TARGET = 1.25


def build(vocab_words: int = 1000):
    words = [f"w{i}" for i in range(vocab_words)]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", "<user>", "<assistant>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    tokenizer.chat_template = (
        "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, tokenizer, words


def prompt_sets(words, n: int, seed: int = 0):
    rng = random.Random(seed)
    mixed = [" ".join(rng.choices(words, k=rng.randint(8, 60))) for _ in range(n)]
    equal = [" ".join(rng.choices(words, k=34)) for _ in range(n)]
    return {"mixed lengths (8-60 words)": mixed, "equal lengths (34 words)": equal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    model, tok, words = build()
    n_params = sum(p.numel() for p in model.parameters())
    bs = args.batch_size
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, cpu_count={os.cpu_count()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, torch threads={torch.get_num_threads()}")
    print(f"model: Llama, {n_params / 1e6:.2f}M params, {model.config.num_hidden_layers} layers, hidden "
          f"{model.config.hidden_size}, attn={model.config._attn_implementation}; {args.prompts} prompts, "
          f"batch size {bs}, chat template on; median of {args.repeats} runs after 1 warm-up")

    worst = 0.0
    for name, prompts in prompt_sets(words, args.prompts).items():
        texts = [format_prompt(tok, p, chat=True) for p in prompts]
        batches = [tok(texts[i : i + bs], padding=True, add_special_tokens=False, return_tensors="pt")
                   for i in range(0, len(texts), bs)]

        def bare_forward():
            with torch.inference_mode():
                for b in batches:
                    model(**b, output_hidden_states=True)

        def bare_tok_forward():
            with torch.inference_mode():
                for i in range(0, len(prompts), bs):
                    t = [format_prompt(tok, p, chat=True) for p in prompts[i : i + bs]]
                    b = tok(t, padding=True, add_special_tokens=False, return_tensors="pt")
                    model(**b, output_hidden_states=True)

        def ours():
            last_token_states(model, tok, prompts, chat=True, batch_size=bs)

        fns = {"bare forward": bare_forward, "bare tok+forward": bare_tok_forward, "last_token_states": ours}
        wall = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        for rep in range(args.repeats + 1):
            for k, f in fns.items():
                w0, c0 = time.perf_counter(), time.process_time()
                f()
                w1, c1 = time.perf_counter(), time.process_time()
                if rep > 0:
                    wall[k].append(w1 - w0)
                    cpu[k].append(c1 - c0)
        med = {k: statistics.median(v) for k, v in wall.items()}
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["input_ids"].numel() for b in batches)
        print(f"\n[{name}] {tokens} real tokens, {padded} positions in prompt-order batches")
        for k in fns:
            print(f"  {k:18s} wall {med[k] * 1e3:7.1f} ms (min {min(wall[k]) * 1e3:6.1f})   "
                  f"cpu {cmed[k] * 1e3:7.1f} ms (min {min(cpu[k]) * 1e3:6.1f})")
        r = med["last_token_states"] / med["bare forward"]
        rc = cmed["last_token_states"] / cmed["bare forward"]
        r2 = med["last_token_states"] / med["bare tok+forward"]
        worst = max(worst, r)
        print(f"  ratio last_token_states / bare forward     = {r:.3f}x wall, {rc:.3f}x cpu")
        print(f"  ratio last_token_states / bare tok+forward = {r2:.3f}x wall")
    verdict = "PASS" if worst <= TARGET else "FAIL"
    print(f"\ntarget: last_token_states <= {TARGET:.2f}x the bare forward (median wall time); "
          f"worst ratio {worst:.3f}x: {verdict}")
    print(f"load average now: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes inflate wall times)")


if __name__ == "__main__":
    main()
