# cfiw tasks. `just` lists them; every recipe uses the project's .venv.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"
# CPU-only machines: CFIW_TORCH=torch==2.13.0 just setup (the default takes PyPI's build)
torch := env("CFIW_TORCH", "torch")

default:
    @just --list

# create .venv and install cfiw (editable) with its test tools
setup:
    test -x {{bin}}/python || python3 -m venv {{venv}}
    {{bin}}/pip install -q "{{torch}}"
    {{bin}}/pip install -q -e '.[dev]'
    {{bin}}/cfiw --version

# the whole test suite, slow end-to-end tests included (pass pytest flags after it)
test *args:
    {{bin}}/python -m pytest {{args}}

# the quick unit tests only
test-fast *args:
    {{bin}}/python -m pytest -m "not slow" {{args}}

# build a tiny random-init model offline
tiny-model out="runs/tiny-model" arch="qwen2":
    {{bin}}/cfiw tiny-model --out {{out}} --arch {{arch}} --dataset data/arith/train.jsonl

# offline demo: tiny model -> rollouts -> spans -> scores -> eval, then a DuckDB look at the spans
demo run="runs/demo": (tiny-model run / "model")
    {{bin}}/cfiw rollout --model {{run}}/model --dataset data/arith --split train --limit 16 --group-size 4 --max-new-tokens 64 --out {{run}}/iter-0000/rollouts.parquet
    {{bin}}/cfiw segment --model {{run}}/model --rollouts {{run}}/iter-0000/rollouts.parquet --out {{run}}/iter-0000/spans.parquet
    {{bin}}/cfiw score --model {{run}}/model --rollouts {{run}}/iter-0000/rollouts.parquet --spans {{run}}/iter-0000/spans.parquet --out {{run}}/iter-0000/scores.parquet
    {{bin}}/cfiw eval --model {{run}}/model --dataset data/arith --split test --max-new-tokens 64 --out {{run}}/eval/iter-0000.parquet
    {{bin}}/python -c "import duckdb; duckdb.sql(\"select kind, count(*) as spans, avg(delta) as mean_delta from '{{run}}/iter-0000/spans.parquet' join '{{run}}/iter-0000/scores.parquet' using (rollout_id, span_idx) group by kind\").show()"

# the offline policy: a tiny model (4 layers, hidden 128) warm-started on data/arith with cfiw sft
tiny-sft out="runs/tiny-sft" steps="1000":
    {{bin}}/cfiw tiny-model --out {{out}}-base --dataset data/arith/train.jsonl --layers 4 --hidden 128
    {{bin}}/cfiw sft --model {{out}}-base --dataset data/arith --out {{out}} --steps {{steps}} --lr 3e-3 --batch-size 16

# the loop in one process, then its report: just full-run model=tiny|qwen [mode=cfiw iters=N run=DIR sft=DIR sft_steps=N]
full-run *args:
    #!/usr/bin/env bash
    set -euo pipefail
    model=tiny mode=cfiw iters= run= sft=runs/tiny-sft sft_steps=1000
    for arg in {{args}}; do case "$arg" in model=*|mode=*|iters=*|run=*|sft=*|sft_steps=*) declare "$arg" ;; *) echo "unknown argument: $arg (use model= mode= iters= run= sft= sft_steps=)" >&2; exit 2 ;; esac; done
    run="${run:-runs/$model-$mode}"
    extra=()
    if [ "$model" = tiny ]; then {{just_executable()}} --justfile {{justfile()}} tiny-sft "$sft" "$sft_steps"; extra=(--model "$sft"); fi
    {{bin}}/cfiw loop --preset "$model" --weighting "$mode" --run "$run" ${iters:+--iterations "$iters"} "${extra[@]}"
    {{bin}}/cfiw analyze "$run" --out "$run/report"
    echo "report: $run/report/report.html (tables and plots: $run/report/report.md)"

# the same iterations, each stage a separate cfiw command chained in the shell (same arguments)
staged-run *args:
    #!/usr/bin/env bash
    set -euo pipefail
    model=tiny mode=cfiw iters= run= sft=runs/tiny-sft sft_steps=1000
    for arg in {{args}}; do case "$arg" in model=*|mode=*|iters=*|run=*|sft=*|sft_steps=*) declare "$arg" ;; *) echo "unknown argument: $arg (use model= mode= iters= run= sft= sft_steps=)" >&2; exit 2 ;; esac; done
    extra=()
    if [ "$model" = tiny ]; then {{just_executable()}} --justfile {{justfile()}} tiny-sft "$sft" "$sft_steps"; extra=(--model "$sft"); fi
    export PATH="$PWD/{{bin}}:$PATH"
    cfiw loop --preset "$model" --weighting "$mode" --run "${run:-runs/$model-$mode-staged}" ${iters:+--iterations "$iters"} "${extra[@]}" --dry-run | bash -e
    echo "run written to ${run:-runs/$model-$mode-staged}"

# the paper's experiment: uniform, cfiw, inverted, shuffled, random for each seed, then one report over all runs
compare *args:
    #!/usr/bin/env bash
    set -euo pipefail
    model=tiny seeds=1 iters= sft=runs/tiny-sft sft_steps=1000
    for arg in {{args}}; do case "$arg" in model=*|seeds=*|iters=*|sft=*|sft_steps=*) declare "$arg" ;; *) echo "unknown argument: $arg (use model= seeds= iters= sft= sft_steps=)" >&2; exit 2 ;; esac; done
    extra=()
    if [ "$model" = tiny ]; then {{just_executable()}} --justfile {{justfile()}} tiny-sft "$sft" "$sft_steps"; extra=(--model "$sft"); fi
    runs=()
    for seed in $(seq 0 $((seeds - 1))); do
      for mode in uniform cfiw inverted shuffled random; do
        run="runs/compare-$model/$mode-seed$seed"
        {{bin}}/cfiw loop --preset "$model" --weighting "$mode" --seed "$seed" --run "$run" ${iters:+--iterations "$iters"} "${extra[@]}"
        runs+=("$run")
      done
    done
    {{bin}}/cfiw analyze "${runs[@]}" --out "runs/compare-$model/report"
    echo "report: runs/compare-$model/report/report.html (tables and plots: runs/compare-$model/report/report.md)"

# tables, plots and report.html of one run
report run:
    {{bin}}/cfiw analyze {{run}} --out {{run}}/report

# loop vs chained commands: time per iteration and share of each stage
bench-loop *args:
    {{bin}}/python benchmarks/loop_bench.py {{args}}

# rollout throughput: batched generate vs one sequence at a time
bench-rollout *args:
    {{bin}}/python benchmarks/rollout_bench.py {{args}}

# span scoring: cfiw score against one forward per variant and padded batches
bench-score *args:
    {{bin}}/python benchmarks/score_bench.py {{args}}

# training throughput, and what weighting adds to a step
bench-train *args:
    {{bin}}/python benchmarks/train_bench.py {{args}}

# regenerate the synthetic problems in data/arith (the committed copy)
data:
    {{bin}}/cfiw synth --out data/arith --n-train 2000 --n-test 200 --max-steps 3 --max-number 20 --filler-rate 0.3 --seed 0 --force
