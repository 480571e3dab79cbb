#!/usr/bin/env bash
# GPU readiness on one GPU, in two stages that each fit one device call (the SmolLM2 stage needs its model, which
# may have to reach the machine separately):
#   benchmarks/gpu_check.sh toys      # ≤ 4.5 min: the `cuda` tests, CUDA-vs-CPU step agreement, fp32/bf16 step times
#   benchmarks/gpu_check.sh lm        # ≤ 8 min: SmolLM2-135M SPD over all MLPs (step time, peak memory), then over
#                                     #   every attention and MLP matrix (CE of the CI-masked model, alive, L0, time)
#   benchmarks/gpu_check.sh resid3 [--set K=V ...]   # ≤ 9.5 min: issue 22's 3-layer residual MLP, seeds 0-2 in
#                                     #   parallel on the card, the preset (extra overrides appended)
#   benchmarks/gpu_check.sh           # toys and lm
# Run from the repository root, its python3 holding torch with CUDA (pydantic and the rest installed, or on
# PYTHONPATH); the lm stage needs the SmolLM2 package and the corpus (`make real`). One JSON line per result.
set -u
stage="${1:-all}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export UNMERGE_CACHE_DIR="${UNMERGE_CACHE_DIR:-/tmp/unmerge-gpu-check}"
PY="${PYTHON:-python3}"
echo "{\"benchmark\": \"device\", \"name\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)\", \"torch\": \"$($PY -c 'import torch; print(torch.__version__)')\"}"
# every $1 s while this script runs, the last line of each training log matching the pattern $2 (a run cut short
# by its timeout still shows how far it got); started in the background, stopped with `kill $!`
watch_logs() {
    (shopt -s nullglob; while sleep "$1" && kill -0 $$ 2>/dev/null; do for log in $2; do
        echo "{\"t_s\": $SECONDS, \"log\": \"$log\", \"last\": $(tail -1 "$log" 2>/dev/null | grep . || echo null)}"
    done; done) &
}
if [[ $stage == resid3 ]]; then
    # the preset itself (constant lr, so each kept checkpoint is the shorter run: benchmarks/at_step.py)
    out=$(mktemp -d /tmp/resid3-XXXX)
    watch_logs 60 "$out/*/*/train_log.jsonl"
    watcher=$!
    timeout 570 $PY benchmarks/seeds.py resid-mlp-3 --seeds 0-2 --workers 3 --out "$out" --set train.device=cuda \
        --set train.keep_checkpoints=20 "${@:2}"
    kill $watcher
fi
if [[ $stage == toys || $stage == all ]]; then
    timeout 120 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | grep -E '^(FAILED|ERROR)|passed|failed'
    timeout 60 $PY benchmarks/devices.py agreement
    timeout 90 $PY benchmarks/devices.py speed --device cuda --threads 4 --steps 50
fi
if [[ $stage == lm || $stage == all ]]; then
    timeout 120 $PY benchmarks/devices.py smollm2 --device cuda --batch 16 --steps 5 2>&1 | grep -v '%|'
    # issue 24: every attention and MLP matrix of SmolLM2 (210 sites), 200 steps after a 200-step warm-up, bf16
    run_dir=$(mktemp -d /tmp/whole-lm-XXXX)
    watch_logs 30 "$run_dir/train_log.jsonl"
    watcher=$!
    timeout 360 $PY benchmarks/whole_lm.py smollm2-all --device cuda --steps 200 --out "$run_dir" 2>&1 | grep -v '%|'
    kill $watcher
fi
