"""The refusal direction's candidates and their selection on a family's start model, against one plain forward pass.

What the session runs for a family whose eval sets are named sets: the TRAIN splits of the harmful set's source and
of the benign set's source (smol: harmbench:train, pairs-benign:train), each split into a fit part (its first 3/4,
at most `--n-fit` prompts) for `refusal.candidate_directions` and a validation part (the rest, at most `--n-val`)
for `refusal.select_direction` with the screen (`--n-exact` candidates scored exactly); the chat template with the
family's system prompt, the refusal tokens from the family's refusal openings. Printed: the machine, the thread
count, the time of the candidates, of the selection (the screen, with the validation prompts' plain passes, then
the exact scoring), the total and its ratio to the 120 s target, the chosen (layer, position) with its bypass /
induce / kl, and the baseline measured in the same run: one plain batched forward pass (left-padded, no shared
header, last-position logits only) over the same fit prompts, so "selection / one forward pass" is printed too.

Run: `OMP_NUM_THREADS=2 python benchmarks/bench_refusal_direction.py [--family F] [--n-fit 64] [--n-val 32]
[--n-exact 8] [--batch B]` (default family: the built-in smol family, full size; `--batch`: both calls' batch size,
default each function's own).
"""
import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import time  # noqa: E402

from common import machine  # noqa: E402

import torch  # noqa: E402

from safesub_core import refusal  # noqa: E402
from safesub_core.family import Family  # noqa: E402
from safesub_core.generation import PromptFormat, format_prompt, prepare_tokenizer  # noqa: E402
from safesub_core.loading import load_model  # noqa: E402
from safesub_core.prompts.named import resolve  # noqa: E402

TARGET_S = 120.0


def train_source(spec: str) -> str:
    """The train split of a named set's source ("harmbench:eval" -> "harmbench:train")."""
    return spec.split(":", 1)[0] + ":train"


def split(prompts: list[str], n_fit: int, n_val: int) -> tuple[list[str], list[str]]:
    """(fit, validation): the first 3/4 (at most n_fit), and the rest after the 3/4 point (at most n_val)."""
    cut = (3 * len(prompts)) // 4
    return prompts[:cut][:n_fit], prompts[cut:][:n_val]


@torch.no_grad()
def plain_forward(model, tok, prompts: list[str], fmt: PromptFormat, batch: int) -> float:
    """Seconds of one plain batched forward pass (left-padded, shortest first, last-position logits only)."""
    prepare_tokenizer(tok)
    texts = sorted((format_prompt(tok, p, fmt) for p in prompts), key=lambda t: len(tok(t)["input_ids"]))
    t = time.perf_counter()
    for start in range(0, len(texts), batch):
        enc = tok(texts[start:start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        model(**enc, logits_to_keep=1)
    return time.perf_counter() - t


def main():
    from safesub_core import demo

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default=None, help="family file (default: the built-in smol family, full size)")
    ap.add_argument("--n-fit", type=int, default=64, help="at most this many fit prompts a set")
    ap.add_argument("--n-val", type=int, default=32, help="at most this many validation prompts a set")
    ap.add_argument("--n-exact", type=int, default=8, help="candidates scored exactly after the screen")
    ap.add_argument("--batch", type=int, default=None, help="batch size of both calls (default: each one's own)")
    args = ap.parse_args()
    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)

    family = Family.from_file(args.family or demo.family_file("smol"))
    sets = family.eval_sets
    harmful_spec, harmless_spec = train_source(sets["harmful"]), train_source(sets["benign"])
    fit_h, val_h = split(list(resolve(harmful_spec).prompts), args.n_fit, args.n_val)
    fit_b, val_b = split(list(resolve(harmless_spec).prompts), args.n_fit, args.n_val)
    fmt = PromptFormat(True, family.system_prompt)
    t = time.perf_counter()
    model, tok = load_model(family.start_checkpoint, family, "cpu", torch.float32)
    t_load = time.perf_counter() - t
    R = refusal.refusal_token_ids(tok, family.refusal_openings or refusal.REFUSAL_OPENINGS)
    L = len(refusal.decoder_layers(model))
    batch = {} if args.batch is None else {"batch_size": args.batch}
    print(f"family {family.name} ({family.file}), start model {family.start_checkpoint.name}, {L} layers "
          f"(loaded in {t_load:.1f} s)")
    print(f"prompts: fit {len(fit_h)} {harmful_spec} + {len(fit_b)} {harmless_spec}; validation {len(val_h)} + "
          f"{len(val_b)}; n_exact {args.n_exact}; batch {args.batch or 'defaults (16 / 32)'}; refusal tokens "
          f"{[tok.decode([i]) for i in R]}")
    print(f"machine: {machine()}")
    print(f"threads: torch.get_num_threads() = {torch.get_num_threads()}")

    plain_forward(model, tok, fit_h[:4], fmt, 4)  # warm-up (first-call costs), not timed
    t_plain = plain_forward(model, tok, fit_h + fit_b, fmt, args.batch or 16)

    load0, c0 = os.getloadavg()[0], time.process_time()
    t = time.perf_counter()
    cands = refusal.candidate_directions(model, tok, fit_h, fit_b, chat=fmt, **batch)
    t_cand = time.perf_counter() - t
    marks: list[float] = []
    t = time.perf_counter()
    sel = refusal.select_direction(cands, model, tok, val_h, val_b, chat=fmt, n_exact=args.n_exact, tokens=R,
                                   progress=lambda done, total: marks.append(time.perf_counter()), **batch)
    t_sel = time.perf_counter() - t
    t_screen = marks[0] - t if marks and args.n_exact else float("nan")
    total = t_cand + t_sel
    cpu, load1 = time.process_time() - c0, os.getloadavg()[0]

    n_cand = int(sel.table["eligible"].sum())
    print(f"\ncandidates ({cands.directions.shape[0]} stream points x {len(cands.positions)} positions): "
          f"{t_cand:.1f} s")
    print(f"selection: {t_sel:.1f} s = screen of {n_cand} eligible (with the plain validation passes) "
          f"{t_screen:.1f} s + exact scoring of {int(sel.table['bypass'].notna().sum())} {t_sel - t_screen:.1f} s")
    print(f"total: {total:.1f} s = {total / TARGET_S:.2f} x the {TARGET_S:.0f} s target (process CPU time {cpu:.1f} s; "
          f"1-min load average {load0:.2f} at the start, {load1:.2f} at the end; this run's own threads count for about "
          f"{threads}, more means other jobs shared the cores)")
    print(f"baseline, one plain batched forward pass over the {len(fit_h) + len(fit_b)} fit prompts: {t_plain:.2f} s;"
          f" candidates / it {t_cand / t_plain:.1f}x, selection / it {t_sel / t_plain:.1f}x, "
          f"total / it {total / t_plain:.1f}x")
    print(f"chosen: layer {sel.layer}, position {sel.position}; bypass {sel.bypass:.3f} (baseline harmful "
          f"{sel.baseline_harmful:.3f}), induce {sel.induce:.3f} (baseline harmless {sel.baseline_harmless:.3f}), "
          f"kl {sel.kl:.4f}; passed {sel.passed} {sel.note}")
    scored = sel.table[sel.table["bypass"].notna()]
    print(scored[["layer", "position", "bypass_linear", "bypass", "induce", "kl"]].to_string(index=False))


if __name__ == "__main__":
    main()
