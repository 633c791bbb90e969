#!/usr/bin/env bash
# The GPU figures of the scoring benchmark, in one go (run from the repository root on a CUDA
# machine with cfiw's dependencies; PYTHON names the interpreter): real GSM8K text, a Qwen2.5-0.5B-shaped random model
# (24 layers, hidden 896, 14 heads, 2 KV heads, 151,936 embedding rows), 64 rollouts of
# about 300 tokens (16 prompts x G = 4), in bf16 and fp32, with the `cfiw rollout` time of the
# same rollouts for scale.
set -euo pipefail
common=(--data real "$@" --device cuda --shape qwen0.5b --pad-vocab 151936 --prompts 16 --group 4 --repeats 3
        --batch-tokens 16384)
"${PYTHON:-python3}" benchmarks/score_bench.py "${common[@]}" --dtype bf16 --rollout-time
"${PYTHON:-python3}" benchmarks/score_bench.py "${common[@]}" --dtype fp32 --modes pad,knockout
