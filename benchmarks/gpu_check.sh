#!/usr/bin/env bash
# The GPU row of docs/performance.md in one prepared run, for the few minutes a CUDA machine is lent:
#   1. the tests that need CUDA;
#   2. time to quality: nanoGPT's GPU recipe (overrides/nanogpt-gpu.txt), then overrides/gpu.txt;
#   3. the training step of both, and gpu.txt's levers: CUDA graphs, batch 128;
#   4. where gpu.txt's step goes (torch.profiler);
#   5. a short sweep at the GPU scale with 1 and then 4 workers on the one GPU: trials a minute.
# About 8 minutes on an H100 or H200. Each part has a time limit; a part is skipped, and the log says
# so, when less than half its limit is left of the whole budget (BUDGET seconds, default 480).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check)
#
# Writes OUT_DIR/gpu_check.log (everything printed) and one JSON per benchmark. On a machine without
# the project's packages (mlflow, optuna, pydantic...), first run benchmarks/gpu_wheels.sh where pip
# works: this script installs what .whl/ (or WHEELS) holds into /tmp/site. PYTHON picks the interpreter.
set -uo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set /p' "$0" | sed '$d' | cut -c3-
    exit 0
fi
OUT_DIR=$(realpath -m "${1:-${OUT:-gpu-check}}")  # a relative path is the caller's, not the repo's
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-480}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=
START=$SECONDS

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
"$PYTHON" -c 'import google.protobuf as p; print("protobuf", p.__version__, "(MLflow needs 5.26 or later)")'

part() {  # part NAME LIMIT_SECONDS COMMAND...: run it under a time limit, unless too little budget is left
    local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START)))
    shift 2
    if ((left < limit / 2)); then
        echo "== $name: skipped, ${left} s of the budget left for a ${limit} s part"
        return 124
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at $((SECONDS - START)) s, limit ${limit} s): $*"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    echo "== $name: exit status $status, $((SECONDS - began)) s"
    return $status
}

GPU_PAIR=(--reference overrides/nanogpt-gpu.txt --set-file overrides/gpu.txt)
part tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_training.py tests/test_inspection.py \
    tests/test_optim.py tests/test_tuning_sweep.py -k "cuda or pinned or flash"
part time_to_quality 200 "$PYTHON" -m benchmarks.time_to_quality "${GPU_PAIR[@]}" --eval-interval 250 \
    --targets 1.6,1.5,1.47,1.45,1.42 --budgets 15,30,60 --json "$OUT_DIR/time_to_quality.json"
part train_step 140 "$PYTHON" -m benchmarks.train_step "${GPU_PAIR[@]}" --steps 100 --batch-sizes 64,128 \
    --variants bfloat16+compile,bfloat16+cudagraphs --json "$OUT_DIR/train_step.json"
part profile_step 60 "$PYTHON" -m benchmarks.profile_step --set-file overrides/gpu.txt --top 15 \
    --json "$OUT_DIR/profile_step.json"

sweep() {  # sweep WORKERS TRIALS: a new study at the GPU scale, 300 steps a trial; then trials a minute
    local workers=$1 trials=$2 began=$SECONDS
    part "sweep_${workers}_workers" 100 "$PYTHON" -m pipeline tune --example shakespeare --set-file overrides/gpu.txt \
        "${SWEEP_SET[@]}" --trials "$trials" --workers "$workers" --no-progress \
        --storage "sqlite:////tmp/gpu_check_sweep_${workers}.db" --study "gpu-check-${workers}" || return
    local seconds=$((SECONDS - began > 0 ? SECONDS - began : 1))
    echo "sweep, $workers workers: $trials trials in $seconds s: $((trials * 60 / seconds)) trials a minute"
}
# the space's heads and head sizes must hold gpu.txt's 6 of 64, the baseline every sweep runs first
SWEEP_SET=(--set shakespeare.tune.max_steps=300 --set shakespeare.tune.eval_interval=100
    --set shakespeare.tune.pruner.warmup_steps=100 --set "shakespeare.tune.space.n_head.choices=[4,6,8]"
    --set "shakespeare.tune.space.head_size.choices=[32,64]")
part prepare 60 "$PYTHON" -m pipeline prepare --example shakespeare  # the sweep reads the prepared data
sweep 1 4
sweep 4 8
echo "== done in $((SECONDS - START)) s; results in $OUT_DIR"
