#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool), from the repository root, with $OUT set:
# build _C for sm_90 (in the background, beside `warm`), then the chosen steps, each under its
# own time limit (SIGINT first, so pytest prints its summary and the benchmarks write the
# settings that finished) so that one slow step cannot eat the others' time:
#   warm    python -m fused_resnet compile: every Triton kernel the model benchmark launches
#           (ResNet-50 in WARM_DTYPES, batch 256 and 1, training in both operand modes, every
#           autotuner config) compiled in parallel into Triton's cache, so that model /
#           blocks do not compile one by one
#   profile torch.profiler's kernel table (and every Triton launch by kernel and variant,
#           with its achieved TFLOP/s, GB/s and % of the roofline) of fused Triton ResNet-50,
#           bf16 training at batch 256 and latency at batch 1 (where the time goes), and the
#           training step's trace
#   tests   pytest -m "gpu and not slow" (Triton compiled, _C CUDA, peak memory, compile),
#           over XDIST_WORKERS (16) pytest-xdist workers where xdist is installed (compiling is
#           the slow part); each failure is printed as it happens, so a cut-off run keeps them
#   slow    pytest -m slow: the exhaustive op grid on Triton (864 cases)
#   fuzz    pytest tests/test_fuzz.py --fuzz-long: hypothesis, 20x the CI examples, unseeded,
#           on CUDA tensors (the fuzz tests carry no gpu mark: `tests` does not run them)
#   model   bench_model.py: ResNet-50 fused Triton (operands on load, and written) / _C vs
#           eager channels_last vs compile, in MODEL_DTYPES
#   blocks  bench_blocks.py --write-table: every distinct block, and the per-shape auto table
#   graphs  the CUDA-graph gpu tests (captured training and inference against eager; they
#           may come late in `tests`), then bench_model.py --cuda-graphs: the model step's
#           settings with each column's step (training too) captured once and replayed (no
#           host launch costs); beside `model`'s rows these say how much of each column's
#           time is host-bound
#   replays graphs' benchmark alone (no tests): the second call of a 15-minute session, on
#           the machine the first call warmed (Triton's and inductor's caches, the build)
# The steps' logs, the training trace and the benchmark reports (<gpu>-<date>/{model,blocks,
# model-graphs}.
# {csv,json,md,png}) land under $OUT, at most 8 files (what the device tool brings back); build
# and warm log to a scratch folder and print their last lines; the last lines are the summary.
#
#   bash benchmarks/gpu_session.sh                 # warm tests profile model: one call, < 10 min
#   bash benchmarks/gpu_session.sh blocks          # the next call (the build is incremental)
#   bash benchmarks/gpu_session.sh warm graphs     # a fresh machine: CUDA-graph replays
#   WARM_DTYPES=fp16 MODEL_DTYPES=fp16 bash benchmarks/gpu_session.sh warm model   # fp16
#
# A session lent 15 minutes of device time (2026-12): the default call (timeout_s 600; with
# the machine's start about 11 minutes), then at once, before the machine's 30 s idle
# release, `GRAPHS_S=150 BENCH_COLUMNS="triton eager-cl compile" bash
# benchmarks/gpu_session.sh replays` (timeout_s 180), then give_back.
#
# Limits (seconds): BUILD_S 120 (beside WARM_S 115), TESTS_S 140, PROFILE_S 85, MODEL_S 205
# (the default call: at most 550 s and 40 s of kill margins, inside one 600 s device call),
# SLOW_S 500, FUZZ_S 300, BLOCKS_S 300, GRAPH_TESTS_S 150 + GRAPHS_S 240 (`warm graphs`: at
# most 510 s; the graph tests take fp16 too). Seen on an H200 (2026-12-04): build 57-64 s,
# warm 56 s (bf16) / 79 s (bf16 fp16: 825 kernels) beside it with 6 autotuner configs, the
# gpu tests 92% done in 100 s on 16 workers; the model step ran out of its 230 s in fp16.
# Since then 8 configs and the written-operand training (bf16 alone: 681 kernels to compile,
# 2026-12-05), so the default call is bf16 (WARM_DTYPES, MODEL_DTYPES) and fp16 takes its
# own call (above).
# The model run leaves out eager NCHW and compile max-autotune (minutes of autotuning);
# `BENCH_COLUMNS=...` changes that. Copy $OUT's <gpu>-<date>/ folder to benchmarks/results/
# to commit it.
set -uo pipefail
steps=${*:-warm tests profile model}
for name in $steps; do
    [[ $name =~ ^(warm|profile|tests|slow|fuzz|model|blocks|graphs|replays)$ ]] \
        || { echo "unknown step '$name' (warm, profile, tests, slow, fuzz, model, blocks," \
                  "graphs, replays)"
             exit 2; }
done
OUT=${OUT:-/tmp/fused_resnet_out}
mkdir -p "$OUT"
rm -f "$OUT"/*.log
scratch=$(mktemp -d)  # build / warm logs and the traces not brought back
summary=()
# Each step's summary line counts the Triton kernels it compiled (new cubins in Triton's
# cache); after `warm`, `model` should add next to none (with TRITON_CACHE_DIR unset,
# torch.compile keeps its kernels in inductor's own cache, not counted).
triton_cache=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
cached() { find "$triton_cache" -name '*.cubin' 2>/dev/null | wc -l; }
log_of() { [[ $1 == build || $1 == warm ]] && echo "$scratch/$1.log" || echo "$OUT/$1.log"; }
step() {  # step NAME SECONDS CMD...: run, log (log_of), record the exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS before log
    log=$(log_of "$name")
    before=$(cached)
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local compiled=$(($(cached) - before))
    summary+=("$name: exit $rc in $((SECONDS - start)) s (limit $limit), $compiled Triton kernels compiled")
    tail -n "$([[ $rc == 0 ]] && echo 3 || echo 15)" "$log"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# _C builds in the background beside `warm` (both keep the CPUs busy, neither needs the
# other); the steps after `warm` wait for it. A failed build is reported, not fatal: the
# Triton tests and columns still run, the `_C` ones fail with the loader's message.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
build_summary=$(mktemp)
( step build "${BUILD_S:-120}" python3 -m pip install --no-build-isolation --no-deps -e . \
      >/dev/null
  printf '%s\n' "${summary[@]}" >"$build_summary" ) &
build_pid=$!
wait_for_build() {
    [[ -n $build_pid ]] || return 0
    wait "$build_pid"
    build_pid=
    mapfile -t -O "${#summary[@]}" summary <"$build_summary"
    tail -n 3 "$(log_of build)"
}

xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n "${XDIST_WORKERS:-16}")
export FUSED_RESNET_FAILURES_NOW=1
# The autotuner's choices go to Triton's cache on disk (Triton >= 3.3), so that `model`
# reuses what `profile` tuned for the same shapes instead of timing 8 configs per conv shape
# and variant again (~0.25 s each, ~150 of them for ResNet-50 training at batch 256 and
# inference at batch 1).
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
for name in $steps; do
    [[ $name == warm ]] || wait_for_build
    case $name in
        warm) step warm "${WARM_S:-115}" python3 -m fused_resnet compile --arch 90 \
                  --dtype ${WARM_DTYPES:-bf16} --workload resnet50 --jobs "$(nproc)" ;;
        profile) step profile "${PROFILE_S:-85}" python3 -m fused_resnet bench --arch resnet50 \
                     --dtypes bf16 --modes train latency --batch-sizes 256 --latency-batch 1 \
                     --profile triton --trace "$scratch/trace_triton" --no-progress
                 cp "$scratch"/trace_triton-*-train-*.json.gz "$OUT/" 2>/dev/null ;;
        tests) step tests_gpu "${TESTS_S:-140}" python3 -m pytest -m "gpu and not slow" -q \
                   -p no:cacheprovider "${xdist[@]}" ;;
        slow) step tests_slow "${SLOW_S:-500}" python3 -m pytest -m slow -q \
                  -p no:cacheprovider "${xdist[@]}" ;;
        fuzz) step tests_fuzz "${FUZZ_S:-300}" python3 -m pytest tests/test_fuzz.py --fuzz-long \
                  -q -p no:cacheprovider "${xdist[@]}" ;;
        model) step bench_model "${MODEL_S:-205}" python3 benchmarks/bench_model.py \
                   --no-progress --out "$OUT" --dtypes ${MODEL_DTYPES:-bf16} \
                   --columns ${BENCH_COLUMNS:-triton triton-written cuda eager-cl compile} ;;
        graphs|replays)
                [[ $name == replays ]] || step tests_graphs "${GRAPH_TESTS_S:-150}" \
                    python3 -m pytest -m gpu -k graphs tests/test_cuda_graphs.py \
                    tests/test_bench_suite.py -q -p no:cacheprovider "${xdist[@]}"
                step bench_graphs "${GRAPHS_S:-240}" python3 benchmarks/bench_model.py \
                    --no-progress --out "$OUT" --dtypes ${MODEL_DTYPES:-bf16} --cuda-graphs \
                    --columns ${BENCH_COLUMNS:-triton cuda eager-cl compile} ;;
        blocks) step bench_blocks "${BLOCKS_S:-300}" python3 benchmarks/bench_blocks.py \
                    --no-progress --out "$OUT" --write-table
                cp fused_resnet/data/auto_backend.json "$OUT/" ;;
    esac
done
wait_for_build

echo "=== summary ==="
grep -h "^=== FAILED NOW" "$OUT"/tests_*.log 2>/dev/null | cut -c 16-130 | head -n 40
grep -h -E "^(=+ .*(passed|failed|error).* =+|FAILED|ERROR)" "$OUT"/tests_*.log 2>/dev/null \
    | tail -n 15
for f in "$OUT"/*-"$(date +%F)"/*.md; do
    [[ -f $f ]] && tail -n 30 "$f"
done
printf '%s\n' "${summary[@]}"
