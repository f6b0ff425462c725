#!/usr/bin/env bash
# The prepared GPU check: on a bare GPU machine, install what ringbench's GPU paths need and run them once, every
# figure and log under $OUT (default ./gpu_check_out), in under 8 minutes. Without a GPU: one line, exit 0.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
#
# Steps (each logged to $OUT/NN-step.log, a summary in $OUT/summary.txt, stopped by `timeout` so none can hang):
#   1 pip install -e '.[mpich,test,torch]' cupy-cuda12x flash-attn   (RINGBENCH_GPU_CHECK_NO_INSTALL=1 skips it)
#   2 tests/engine/test_cupy.py
#   3 ringbench doctor
#   4 a checked run (--check) per strategy and pass on the GPU (--backend cupy), 2 ranks
#   5 kernel timings: flash-attn against torch SDPA, fwd and bwd, causal or not, and ring-flash-attention's merge
#     (benchmarks/gpu_kernels.py: the preset's kernel tables and the merge term benchmarks/README.md names)
#   6 ringbench probe --backend cupy --kernel flash-attn (2 ranks), then a preset from it (benchmarks/probe_preset.py)
set -u
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no GPU here (nvidia-smi finds none): nothing to check"
    exit 0
fi
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
: > "$OUT/summary.txt"
BUDGET=${RINGBENCH_GPU_CHECK_BUDGET_S:-470}  # the whole check stays under 8 minutes: a step gets what is left
step() {  # step NN NAME SECONDS CMD...: run with a time limit, log, record the status
    local nn=$1 name=$2 limit=$3
    shift 3
    local t0=$(date +%s)
    local left=$(( BUDGET - (t0 - START) ))
    if [ "$left" -lt 10 ]; then
        echo "$nn $name skipped: the 8-minute budget is spent" | tee -a "$OUT/summary.txt"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout -k 5 "$limit" "$@" > "$OUT/$nn-$name.log" 2>&1
    local rc=$?
    echo "$nn $name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
    return 0
}
nvidia-smi > "$OUT/00-nvidia-smi.log" 2>&1
if [ -z "${RINGBENCH_GPU_CHECK_NO_INSTALL:-}" ]; then
    step 01 install 240 $PY -m pip install -q -e '.[mpich,test,torch]' cupy-cuda12x flash-attn
fi
MPIEXEC=$(dirname "$(command -v $PY)")/mpiexec
[ -x "$MPIEXEC" ] || MPIEXEC=mpiexec
step 02 test_cupy 90 $PY -m pytest -q tests/engine/test_cupy.py
step 03 doctor 30 $PY -m ringbench doctor
for mode in overlap blocking allgather ulysses hybrid pass-q; do
    for pass in fwd fwd+bwd; do
        [ "$mode" = pass-q ] && [ "$pass" != fwd ] && continue
        extra=""
        [ "$mode" = hybrid ] && extra="--ulysses-degree 2"
        step 04 "run-$mode-${pass/+/_}" 40 "$MPIEXEC" -n 2 $PY -m ringbench run --backend cupy --mode "$mode" $extra \
            --pass "$pass" --seq-len 4096 --heads 8 --kv-heads 2 --head-dim 128 --dtype float32 --causal --layout zigzag \
            --check --repeat 2 --out "$OUT/runs.h5"
    done
done
for kern in torch flash-attn; do
    step 04 "run-kernel-$kern" 40 "$MPIEXEC" -n 2 $PY -m ringbench run --backend cupy --kernel "$kern" --pass fwd --seq-len 8192 \
        --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16 --causal --layout zigzag --check --repeat 2 --out "$OUT/runs.h5"
done
step 05 gpu_kernels 90 $PY benchmarks/gpu_kernels.py --out "$OUT/gpu_kernels.json"
step 06 probe 90 "$MPIEXEC" -n 2 $PY -m ringbench probe --backend cupy --kernel flash-attn --dtype bfloat16 --heads 32 \
    --kv-heads 8 --head-dim 128 --out "$OUT/probe.h5"
step 07 preset 30 $PY benchmarks/probe_preset.py "$OUT/probe.h5" --base h100-sxm5-8x --out "$OUT/probed-preset.yaml"
echo "note: the probe times flash-attn's forward and ringbench's native backward (no fused GPU backward is wired in)" \
    | tee -a "$OUT/summary.txt"
echo "total $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
