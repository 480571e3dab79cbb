#!/usr/bin/env bash
# GPU readiness in one call (≤ 10 minutes on one GPU). Run from the repository root on a machine with CUDA, its
# python3 holding torch with CUDA (pydantic and the rest installed, or on PYTHONPATH). Prints one JSON line per
# result: the `cuda` tests, CUDA-vs-CPU step agreement, step times at fp32 and bf16, SmolLM2-135M SPD over all
# its MLPs (step time, peak memory), and over every attention and MLP matrix (CE of the CI-masked model, alive
# subcomponents, L0 per token, time, peak memory) — the last two need the SmolLM2 package (`make real`).
set -u
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export UNMERGE_CACHE_DIR="${UNMERGE_CACHE_DIR:-/tmp/unmerge-gpu-check}"
PY="${PYTHON:-python3}"
echo "{\"benchmark\": \"device\", \"name\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)\", \"torch\": \"$($PY -c 'import torch; print(torch.__version__)')\"}"
timeout 180 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -1 \
    | $PY -c 'import json, sys; print(json.dumps({"benchmark": "cuda_tests", "summary": sys.stdin.read().strip()}))'
timeout 60 $PY benchmarks/devices.py agreement
timeout 120 $PY benchmarks/devices.py speed --device cuda --threads 4 --steps 100
timeout 120 $PY benchmarks/devices.py smollm2 --device cuda --batch 16 --steps 5 2>&1 | tail -1
# issue 24: every attention and MLP matrix of SmolLM2 (210 sites), 150 steps after a 200-step warm-up, bf16
timeout 300 $PY benchmarks/whole_lm.py smollm2-all --device cuda --steps 150 2>&1 | tail -1
