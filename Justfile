# cfiw tasks. `just` lists them; every recipe uses the project's .venv.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"
# Which PyTorch to install, and from where. PyPI serves Linux machines the CUDA build; for
# PyTorch's CPU build: CFIW_TORCH_INDEX=https://download.pytorch.org/whl/cpu just setup
torch := env("CFIW_TORCH", "torch")
torch_index := env("CFIW_TORCH_INDEX", "")
# per mode: % of the kept rollouts' token weight on calculation and scaffolding spans, and the
# weight of a calculation token over that of a scaffolding token
weight_share_query := "with tokens as (select mode, iteration, rollout_id, unnest(token_weights) as weight, unnest(generate_series(0, len(token_weights) - 1)) as t from replay_weights where kept), typed as (select k.mode, k.weight, coalesce(s.kind, 'none') as kind from tokens k left join spans s on s.iteration = k.iteration and s.rollout_id = k.rollout_id and k.t >= s.tok_start and k.t < s.tok_end) select mode, round(100 * sum(weight) filter (where kind = 'calculation') / sum(weight), 1) as calculation_pct, round(100 * sum(weight) filter (where kind = 'scaffolding') / sum(weight), 1) as scaffolding_pct, round(avg(weight) filter (where kind = 'calculation') / avg(weight) filter (where kind = 'scaffolding'), 2) as calculation_over_scaffolding from typed group by mode order by calculation_pct"

# the testbed dial's points, each with a preset tiny-POINT (L: made-up words before every event, N: noise lines)
dial_points := "L8 L32 N2 L8-N2 L32-N2"

default:
    @just --list

# create .venv and install cfiw (editable) with its test tools
setup:
    test -x {{bin}}/python || python3 -m venv {{venv}}
    {{bin}}/pip install -q {{ if torch_index != "" { "--index-url " + torch_index } else { "" } }} "{{torch}}"
    {{bin}}/pip install -q -e '.[dev]'
    {{bin}}/cfiw --version

# the whole test suite, slow end-to-end tests included (pass pytest flags after it)
test *args:
    {{bin}}/python -m pytest {{args}}

# lint and format check (ruff, configured in pyproject.toml); `just fmt` rewrites
lint:
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .

# format the code and apply ruff's safe fixes
fmt:
    {{bin}}/ruff format .
    {{bin}}/ruff check --fix .

# tests under the lower bounds of the model stack in pyproject.toml (transformers, tokenizers,
# huggingface_hub, trl, accelerate, datasets, peft), in .venv-lowest; default: the TRL and
# generation tests and the scorer's (pass test paths and pytest flags to run others)
test-lowest *args:
    #!/usr/bin/env bash
    set -euo pipefail
    low=.venv-lowest
    test -x $low/bin/python || python3 -m venv $low
    $low/bin/pip install -q {{ if torch_index != "" { "--index-url " + torch_index } else { "" } }} "{{torch}}"
    pins=$({{bin}}/python -c 'import re, tomllib; stack = {"transformers", "tokenizers", "huggingface_hub", "trl", "accelerate", "datasets", "peft"}; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(" ".join(re.match(r"([\w-]+)>=([\w.]+)", d).expand(r"\1==\2") for d in deps if re.match(r"[\w-]+", d).group(0) in stack))')
    $low/bin/pip install -q $pins -e '.[dev]'
    $low/bin/python -c 'import trl, transformers; print(f"trl {trl.__version__}, transformers {transformers.__version__}")'
    if [ -n "{{args}}" ]; then $low/bin/python -m pytest {{args}}; else $low/bin/python -m pytest tests/test_trl_integration.py tests/test_trl_parity.py tests/test_trl_engines.py tests/test_generation.py tests/test_importance.py; fi

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

# the offline policy: a tiny model (4 layers, hidden 128) warm-started with cfiw sft on a synthetic dataset
tiny-sft out="runs/tiny-sft" steps="1000" data="data/arith":
    {{bin}}/cfiw tiny-model --out {{out}}-base --dataset {{data}}/train.jsonl --layers 4 --hidden 128
    {{bin}}/cfiw sft --model {{out}}-base --dataset {{data}} --split sft --out {{out}} --steps {{steps}} --lr 3e-3 --batch-size 16

# the warm start of a tiny preset, on the preset's own dataset (a dial point's is written first; up to date: skipped)
_warm model sft steps:
    #!/usr/bin/env bash
    set -euo pipefail
    data="$({{bin}}/python -c 'import sys; from cfiw_cli.pipeline.loop import load_config; print(load_config(sys.argv[1], None)["data"]["dataset"])' {{model}})"
    if [[ ! -d "$data" && "$data" =~ ^data/arith-([LN][0-9].*)$ ]]; then {{just_executable()}} --justfile {{justfile()}} dial-data "${BASH_REMATCH[1]}"; fi
    {{just_executable()}} --justfile {{justfile()}} tiny-sft {{sft}} {{steps}} "$data"

# the loop in one process, then its report: just full-run model=tiny|qwen [mode=cfiw iters=N run=DIR sft=DIR sft_steps=N]
full-run *args:
    #!/usr/bin/env bash
    set -euo pipefail
    model=tiny mode=cfiw iters= run= sft= sft_steps=1000
    for arg in {{args}}; do case "$arg" in model=*|mode=*|iters=*|run=*|sft=*|sft_steps=*) declare "$arg" ;; *) echo "unknown argument: $arg (use model= mode= iters= run= sft= sft_steps=)" >&2; exit 2 ;; esac; done
    run="${run:-runs/$model-$mode}"
    extra=()
    if [[ "$model" == tiny* ]]; then sft="${sft:-runs/$model-sft}"; {{just_executable()}} --justfile {{justfile()}} _warm "$model" "$sft" "$sft_steps"; extra=(--model "$sft"); fi
    {{bin}}/cfiw loop --preset "$model" --weighting "$mode" --run "$run" ${iters:+--iterations "$iters"} "${extra[@]}"
    {{bin}}/cfiw analyze "$run" --out "$run/report"
    echo "report: $run/report/report.html (tables and plots: $run/report/report.md)"

# the same iterations, each stage a separate cfiw command chained in the shell (same arguments)
staged-run *args:
    #!/usr/bin/env bash
    set -euo pipefail
    model=tiny mode=cfiw iters= run= sft= sft_steps=1000
    for arg in {{args}}; do case "$arg" in model=*|mode=*|iters=*|run=*|sft=*|sft_steps=*) declare "$arg" ;; *) echo "unknown argument: $arg (use model= mode= iters= run= sft= sft_steps=)" >&2; exit 2 ;; esac; done
    extra=()
    if [[ "$model" == tiny* ]]; then sft="${sft:-runs/$model-sft}"; {{just_executable()}} --justfile {{justfile()}} _warm "$model" "$sft" "$sft_steps"; extra=(--model "$sft"); fi
    export PATH="$PWD/{{bin}}:$PATH"
    cfiw loop --preset "$model" --weighting "$mode" --run "${run:-runs/$model-$mode-staged}" ${iters:+--iterations "$iters"} "${extra[@]}" --dry-run | bash -e
    echo "run written to ${run:-runs/$model-$mode-staged}"

# the paper's experiment: uniform, cfiw, inverted, shuffled, random for each seed from one warm start, then one report over all runs
# (jobs=N runs N loops at once, each with nproc/N threads; each loop's log is beside its run directory;
#  modes=uniform,cfiw,cfiw@0 runs a subset, MODE@F at importance floor F; sets=train.optimizer="sgd",train.lr=0.5
#  adds --set assignments to every loop; out=DIR instead of runs/compare-MODEL; no policies are kept)
compare *args:
    #!/usr/bin/env bash
    set -euo pipefail
    model=tiny seeds=1 iters= sft= sft_steps=1000 jobs=1 modes=uniform,cfiw,inverted,shuffled,random out= sets=
    for arg in {{args}}; do case "$arg" in model=*|seeds=*|iters=*|sft=*|sft_steps=*|jobs=*|modes=*|out=*|sets=*) declare "$arg" ;; *) echo "unknown argument: $arg (use model= seeds= iters= sft= sft_steps= jobs= modes= out= sets=)" >&2; exit 2 ;; esac; done
    extra=()
    if [[ "$model" == tiny* ]]; then sft="${sft:-runs/$model-sft}"; {{just_executable()}} --justfile {{justfile()}} _warm "$model" "$sft" "$sft_steps"; extra=(--model "$sft"); fi
    for assignment in ${sets//,/ }; do extra+=(--set "$assignment"); done
    out="${out:-runs/compare-$model}" modes="${modes//,/ }"
    mkdir -p "$out"
    runs=() commands=()
    for seed in $(seq 0 $((seeds - 1))); do
      for mode in $modes; do
        run="$out/$mode-seed$seed"
        runs+=("$run")
        floor=(); [[ "$mode" == *@* ]] && floor=(--set "train.importance_floor=${mode#*@}")
        commands+=("$(printf '%q ' {{bin}}/cfiw loop --preset "$model" --weighting "${mode%@*}" "${floor[@]}" --seed "$seed" --run "$run" --set loop.keep_policies=0 ${iters:+--iterations "$iters"} "${extra[@]}")> $(printf '%q' "$run.log") 2>&1 && echo done: $(printf '%q' "$run")")
      done
    done
    threads=$(( $(nproc) / jobs )); threads=$(( threads > 0 ? threads : 1 ))
    printf '%s\0' "${commands[@]}" | OMP_NUM_THREADS=$threads xargs -0 -P "$jobs" -n 1 bash -c
    {{bin}}/cfiw analyze "${runs[@]}" --out "$out/report"
    echo "report: $out/report/report.html (tables and plots: $out/report/report.md)"

# Per seed, a loop that keeps the policy every keep-th iteration started from, then every mode's update
# replayed from each kept policy on that iteration's rollouts (mode= is the loop's own weighting; jobs=N
# runs N seeds at once; logs beside the run directories).
# paired replay of every weighting mode over seeds, then one report
paired *args:
    #!/usr/bin/env bash
    set -euo pipefail
    model=tiny seeds=1 iters= sft= sft_steps=1000 jobs=1 mode=cfiw modes=uniform,cfiw,inverted,shuffled,random keep=4 out=
    for arg in {{args}}; do case "$arg" in model=*|seeds=*|iters=*|sft=*|sft_steps=*|jobs=*|mode=*|modes=*|keep=*|out=*) declare "$arg" ;; *) echo "unknown argument: $arg (use model= seeds= iters= sft= sft_steps= jobs= mode= modes= keep= out=)" >&2; exit 2 ;; esac; done
    extra=()
    if [[ "$model" == tiny* ]]; then sft="${sft:-runs/$model-sft}"; {{just_executable()}} --justfile {{justfile()}} _warm "$model" "$sft" "$sft_steps"; extra=(--model "$sft"); fi
    out="${out:-runs/paired-$model}"
    mkdir -p "$out"
    runs=() commands=()
    for seed in $(seq 0 $((seeds - 1))); do
      run="$out/$mode-seed$seed"
      runs+=("$run")
      loop="$(printf '%q ' {{bin}}/cfiw loop --preset "$model" --weighting "$mode" --seed "$seed" --run "$run" --set "loop.keep_policies=$keep" ${iters:+--iterations "$iters"} "${extra[@]}")"
      commands+=("($loop && $(printf '%q ' {{bin}}/cfiw replay "$run" --modes "$modes")) > $(printf '%q' "$run.log") 2>&1 && echo done: $(printf '%q' "$run")")
    done
    threads=$(( $(nproc) / jobs )); threads=$(( threads > 0 ? threads : 1 ))
    printf '%s\0' "${commands[@]}" | OMP_NUM_THREADS=$threads xargs -0 -P "$jobs" -n 1 bash -c
    {{bin}}/cfiw analyze "${runs[@]}" --out "$out/report"
    echo "report: $out/report/report.html (tables and plots: $out/report/report.md)"

# Gradient alignment at each point of the testbed dial: per point and seed, a short loop that keeps the
# policies iterations 0, 2 and 4 start from, then `cfiw gradients` on each (every mode on the same minibatches),
# then one report whose gradient tables are per point (points=base,L8,... where base is the tiny preset;
# jobs=N runs N seeds at once; reference=R reference rollouts per policy; logs beside the run directories)
dose-response *args:
    #!/usr/bin/env bash
    set -euo pipefail
    points=base,L8,L32,N2,L8-N2,L32-N2 seeds=3 jobs=1 iters=5 keep=2 reference=1024 sft_steps=1000 modes=uniform,cfiw,cfiw@0,inverted,random,oracle,entropy out=runs/dose-response
    for arg in {{args}}; do case "$arg" in points=*|seeds=*|jobs=*|iters=*|keep=*|reference=*|sft_steps=*|modes=*|out=*) declare "$arg" ;; *) echo "unknown argument: $arg (use points= seeds= jobs= iters= keep= reference= sft_steps= modes= out=)" >&2; exit 2 ;; esac; done
    runs=() commands=()
    for point in ${points//,/ }; do
      preset=tiny; [[ "$point" == base ]] || preset="tiny-$point"
      sft="runs/$preset-sft"
      {{just_executable()}} --justfile {{justfile()}} _warm "$preset" "$sft" "$sft_steps"
      for seed in $(seq 0 $((seeds - 1))); do
        run="$out/$point/seed$seed"
        runs+=("$run")
        mkdir -p "$out/$point"
        loop="$(printf '%q ' {{bin}}/cfiw loop --preset "$preset" --model "$sft" --seed "$seed" --run "$run" --iterations "$iters" --set "loop.keep_policies=$keep" --set loop.probe_questions=0 --set loop.eval_every=1000 --set loop.eval_limit=16)"
        measure="$(printf '%q ' {{bin}}/cfiw gradients "$run" --modes "$modes" --no-shares --reference-rollouts "$reference")"
        commands+=("(SECONDS=0; $loop && echo loop seconds: \$SECONDS && $measure && echo total seconds: \$SECONDS) > $(printf '%q' "$run.log") 2>&1 && echo done: $(printf '%q' "$run")")
      done
    done
    mkdir -p "$out"
    threads=$(( $(nproc) / jobs )); threads=$(( threads > 0 ? threads : 1 ))
    printf '%s\0' "${commands[@]}" | OMP_NUM_THREADS=$threads xargs -0 -P "$jobs" -n 1 bash -c
    {{bin}}/cfiw analyze "${runs[@]}" --out "$out/report"
    echo "report: $out/report/report.md (gradient tables per dataset; plot: $out/report/gradient_alignment.png)"

# the share of the token weight each mode puts on calculation and scaffolding spans, on one batch:
# iteration 0 of a one-iteration tiny run, replayed in every mode, measured by one cfiw sql query
weight-shares run="runs/tiny-shares" sft="runs/tiny-sft" sft_steps="1000":
    {{just_executable()}} --justfile {{justfile()}} _warm tiny {{sft}} {{sft_steps}}
    {{bin}}/cfiw loop --preset tiny --model {{sft}} --run {{run}} --iterations 1 --set loop.eval_limit=8 --set loop.probe_questions=8 --set loop.probe_samples=2
    {{bin}}/cfiw replay {{run}} --iterations 0 --modes uniform,cfiw,cfiw@0,inverted,oracle,entropy --probe-questions 8 --probe-samples 2
    {{bin}}/cfiw sql {{run}} "{{weight_share_query}}"

# tables, plots and report.html of one run
report run:
    {{bin}}/cfiw analyze {{run}} --out {{run}}/report

# loop vs chained commands: time per iteration and share of each stage
bench-loop *args:
    {{bin}}/python benchmarks/loop_bench.py {{args}}

# rollout throughput: batched generate vs one sequence at a time
bench-rollout *args:
    {{bin}}/python benchmarks/rollout_bench.py {{args}}

# CFIW's share of a TRL GRPOTrainer step (segment + exact scoring + weights), against stock GRPO
bench-trl *args:
    {{bin}}/python benchmarks/trl_bench.py {{args}}

# span scoring: cfiw score against one forward per variant and padded batches
bench-score *args:
    {{bin}}/python benchmarks/score_bench.py {{args}}

# the qwen preset at real shape on a GPU (2 iterations, 0.5B and 1.5B shapes); `--device cpu --tiny` is CI's smoke test
gpu-check *args:
    {{bin}}/python benchmarks/gpu_check.py {{args}}

# training throughput, and what weighting adds to a step
bench-train *args:
    {{bin}}/python benchmarks/train_bench.py {{args}}

# cfiw sql's sealed, read-only connection against a plain DuckDB connection over the same run
bench-sql *args:
    {{bin}}/python benchmarks/sql_bench.py {{args}}

# regenerate the synthetic problems in data/arith and data/arith-distractors (the committed copies)
# and every point of the testbed dial (data/arith-POINT, checked against data/dial.sha256)
data:
    {{bin}}/cfiw synth --out data/arith --n-train 2000 --n-test 200 --max-steps 3 --max-number 10 --filler-rate 0.3 --teacher-error-rate 0.5 --seed 0 --force
    {{bin}}/cfiw synth --out data/arith-distractors --n-train 2000 --n-test 200 --max-steps 3 --max-number 20 --filler-rate 0.3 --distractors 2 --teacher-error-rate 0.15 --seed 0 --force
    for point in {{dial_points}}; do {{just_executable()}} --justfile {{justfile()}} dial-data "$point"; done
    cd data && sha256sum --check --quiet dial.sha256

# one point of the testbed dial over data/arith's problems: L made-up words before every event, N noise lines (e.g. L8-N2)
dial-data point out="data":
    #!/usr/bin/env bash
    set -euo pipefail
    [[ "{{point}}" =~ ^(L([0-9]+))?-?(N([0-9]+))?$ && -n "{{point}}" ]] || { echo "a dial point is LWORDS, NLINES or LWORDS-NLINES, e.g. L8-N2" >&2; exit 2; }
    {{bin}}/cfiw synth --out {{out}}/arith-{{point}} --n-train 2000 --n-test 200 --max-steps 3 --max-number 10 --filler-rate 0.3 --teacher-error-rate 0.5 --seed 0 --filler-length "${BASH_REMATCH[2]:-0}" --filler-vocab 256 --noise-lines "${BASH_REMATCH[4]:-0}" --force
