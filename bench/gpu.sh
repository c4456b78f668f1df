#!/usr/bin/env bash
# The render benchmarks on one CUDA GPU, in one go (each step time-boxed; a failed step does not stop the rest).
#   bash bench/gpu.sh [LOG_DIR]        # logs: LOG_DIR (default $OUT or ./bench-gpu-logs), one file per step
# Needs torch (CUDA), numpy, tqdm, opencv and scikit-image; installs this checkout's dawn (no deps) if missing.
set -u
cd "$(dirname "$0")/.."
LOGS=${1:-${OUT:-bench-gpu-logs}}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
"$PY" -c "import dawn" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e .

step() {  # step NAME SECONDS ARGS...: python bench/render.py ARGS, its output in $LOGS/NAME.log
    local name=$1 seconds=$2; shift 2
    echo "=== $name: bench/render.py $*"
    local start=$SECONDS
    timeout "$seconds" "$PY" bench/render.py --device cuda --threads 4 "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    grep -v "^\s*$" "$LOGS/$name.log" | grep -v "it/s\]\|s/it\]" | tail -n 25
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOGS/device.log"

step smoke 40 --presets tiny --frames 24 --steps 2 --dtype bf16 || exit 1  # the rest would fail alike
step bf16 100 --dtype bf16                        # 200 frames, 20 DDIM steps: ours in bf16, the reference way in fp32
step fp32 90 --dtype fp32                        # both in fp32: outputs equal within tolerance
step dpm_solver 45 --dtype bf16 --sampler dpm-solver++ --skip-baseline
step lengths 100 --dtype bf16 --lengths 200 400 800 1600 --skip-baseline
step cudnn_benchmark 40 --dtype bf16 --skip-baseline --cudnn-benchmark
step ten_minutes 60 --dtype bf16 --long-audio-minutes 10 --steps 2
