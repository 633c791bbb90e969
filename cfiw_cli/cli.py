"""The `cfiw` command line: a thin Typer layer over `cfiw_cli.stages`.

Heavy libraries (torch, transformers) are imported inside command bodies so that `cfiw --help`
answers instantly. Every command body goes through `exits_cleanly`: bad input prints
`Error: ...` and a hint, and exits 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cfiw_cli import __version__
from cfiw_cli import options as opt
from cfiw_cli.errors import exits_cleanly

app = typer.Typer(
    name="cfiw",
    help="Counterfactual importance weighting for GRPO/DAPO fine-tuning on GSM8K.\n\n"
    "Stages talk through Parquet files (query them with DuckDB); every file carries a manifest.",
    epilog="Example: cfiw tiny-model --out runs/tiny-model && cfiw rollout --model runs/tiny-model --dataset gsm8k --limit 8 --out runs/demo/rollouts.parquet",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command(name: str, example: str) -> Callable:
    """Register a command whose help ends with `example` and whose errors exit cleanly."""

    def register(func: Callable) -> Callable:
        return app.command(name, epilog=f"Example: {example}")(exits_cleanly(func))

    return register


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cfiw {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    pass


@command("tiny-model", "cfiw tiny-model --out runs/tiny-model --arch llama --layers 2 --hidden 64")
def tiny_model(
    out: Annotated[Path, typer.Option(help="Directory to write the model and tokenizer to.")],
    arch: Annotated[str, typer.Option(help="Architecture: qwen2 or llama.")] = "qwen2",
    dataset: Annotated[
        str | None,
        typer.Option(
            help="GSM8K-format file whose text trains the tokenizer (default: generated arithmetic problems)."
        ),
    ] = None,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size, special tokens included.")] = 1024,
    layers: Annotated[int, typer.Option(min=1, help="Transformer layers.")] = 2,
    hidden: Annotated[int, typer.Option(min=8, help="Hidden size.")] = 64,
    heads: Annotated[int, typer.Option(min=1, help="Attention heads.")] = 4,
    kv_heads: Annotated[int, typer.Option(min=1, help="Key/value heads (grouped-query attention).")] = 2,
    seed: opt.Seed = 0,
    force: opt.Force = False,
) -> None:
    """Build a small random-init model and a byte-level BPE tokenizer, offline.

    The tokenizer is trained on the dataset's text and has pad and EOS tokens and a ChatML chat
    template; the model is saved with save_pretrained, so it loads with AutoModelForCausalLM
    from the path. The same arguments and seed give identical files.
    """
    from cfiw_cli.tools import tiny_model as stage

    stage.run(
        stage.TinyModelConfig(
            out=str(out),
            arch=arch,
            dataset=dataset,
            vocab_size=vocab_size,
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            seed=seed,
        ),
        force=force,
    )


@command("synth", "cfiw synth --out data/arith-distractors --n-train 2000 --n-test 200 --distractors 2 --seed 0")
def synth(
    out: Annotated[Path, typer.Option(help="Directory to write train.jsonl and test.jsonl to.")],
    n_train: Annotated[int, typer.Option("--n-train", min=1, help="Problems in the train split.")] = 2000,
    n_test: Annotated[
        int, typer.Option("--n-test", min=1, help="Problems in the test split (none repeats a train question).")
    ] = 200,
    seed: opt.Seed = 0,
    max_steps: Annotated[
        int, typer.Option(min=1, help="Most arithmetic steps per problem (each has 1 to this many).")
    ] = 3,
    max_number: Annotated[
        int, typer.Option(min=4, help="Largest number anywhere in a problem, results included.")
    ] = 20,
    filler_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Chance of a filler sentence before each calculation line.")
    ] = 0.3,
    distractors: Annotated[
        int,
        typer.Option(
            min=0, help="Sentences per question about someone else's items: numbers the answer does not depend on."
        ),
    ] = 0,
    teacher_error_rate: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Also write sft.jsonl, demonstrations by a teacher that adds given-away amounts and distractors with this chance.",
        ),
    ] = 0.0,
    force: opt.Force = False,
) -> None:
    """Generate GSM8K-format word problems with a ground-truth label per solution sentence.

    Each solution line is a restatement ("Ava starts with 7 apples."), a calculation
    ("7 + 5 = <<7+5=12>>12."), a filler without digits ("Let me think about this."), with
    --distractors K a distractor ("Ben's 4 apples do not count.", one per question sentence
    about another person's items), or the answer ("#### 12"); the labels column holds
    [{text, label}] per line. cfiw analyze uses it to check that calculation spans are scored
    above filler and distractors. With --teacher-error-rate, sft.jsonl holds the train questions
    solved by a teacher with a systematic misconception, for a warm start (cfiw sft --split sft)
    whose errors RL can unlearn. Deterministic for a seed.
    """
    from cfiw_cli.tools import synth as stage

    stage.run(
        stage.SynthConfig(
            out=str(out),
            n_train=n_train,
            n_test=n_test,
            seed=seed,
            max_steps=max_steps,
            max_number=max_number,
            filler_rate=filler_rate,
            distractors=distractors,
            teacher_error_rate=teacher_error_rate,
        ),
        force=force,
    )


@command("sft", "cfiw sft --model runs/tiny-model --dataset data/arith --out runs/tiny-sft --steps 1000 --lr 3e-3")
def sft(
    model: opt.Model,
    dataset: opt.Dataset,
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write (model and tokenizer).")],
    split: opt.Split = "train",
    limit: opt.Limit = None,
    offset: opt.Offset = 0,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 500,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-5,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per optimizer step.")] = 16,
    max_length: Annotated[
        int, typer.Option(min=1, help="Longest prompt + solution, in tokens (longer ones are cut).")
    ] = 1024,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warm-up steps.")] = 0,
    lr_schedule: Annotated[str, typer.Option(help="constant, linear or cosine decay after warm-up.")] = "cosine",
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay.")] = 0.0,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in the backward pass (less memory).")
    ] = False,
    seed: opt.Seed = 0,
    dtype: opt.Dtype = "auto",
    prompt_template: opt.PromptTemplate = None,
    chat_template: opt.ChatTemplate = True,
    force: opt.Force = False,
) -> None:
    """Supervised warm start on the dataset's reference solutions (TRL SFTTrainer).

    The prompt of each example is exactly what cfiw rollout sends; the loss covers the
    solution and its EOS token only. Writes the model and tokenizer (no optimizer state) and a
    manifest with the loss curve. Use it before RL when the base model earns no reward.
    """
    from cfiw_cli.tools import sft as stage

    stage.run(
        stage.SftConfig(
            model=model,
            dataset=dataset,
            out=str(out),
            split=split,
            limit=limit,
            offset=offset,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            max_length=max_length,
            warmup_steps=warmup_steps,
            lr_schedule=lr_schedule,
            weight_decay=weight_decay,
            gradient_checkpointing=gradient_checkpointing,
            seed=seed,
            dtype=dtype.value,
            prompt_template=prompt_template,
            chat_template=chat_template,
        ),
        force=force,
    )


@command(
    "rollout",
    "cfiw rollout --model Qwen/Qwen2.5-1.5B-Instruct --dataset gsm8k --limit 64 --group-size 8 --out runs/x/iter-0000/rollouts.parquet",
)
def rollout(
    model: opt.Model,
    dataset: opt.Dataset,
    out: Annotated[Path, typer.Option(help="rollouts.parquet to write.")],
    split: opt.Split = "train",
    limit: opt.Limit = None,
    offset: opt.Offset = 0,
    group_size: Annotated[int, typer.Option("--group-size", "-g", min=1, help="Samples per question (G).")] = 8,
    max_new_tokens: opt.MaxNewTokens = 512,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature (0 = greedy).")] = 1.0,
    top_p: opt.TopP = 1.0,
    batch_size: opt.BatchSize = 64,
    seed: opt.Seed = 0,
    iteration: Annotated[int, typer.Option(min=0, help="Iteration number, part of each rollout_id.")] = 0,
    dtype: opt.Dtype = "auto",
    prompt_template: opt.PromptTemplate = None,
    chat_template: opt.ChatTemplate = True,
    force: opt.Force = False,
) -> None:
    """Sample G completions per question with per-token log-probs, answers and rewards.

    Generation is batched (left padding, KV cache). completion_logprobs are the log-probs of the
    sampled tokens under the distribution they were drawn from (temperature and top-p applied).
    Writes one row per completion (schema in the README).
    """
    from cfiw_cli.pipeline import rollout as stage

    stage.run(
        stage.RolloutConfig(
            model=model,
            dataset=dataset,
            out=str(out),
            split=split,
            limit=limit,
            offset=offset,
            group_size=group_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            seed=seed,
            iteration=iteration,
            dtype=dtype.value,
            prompt_template=prompt_template,
            chat_template=chat_template,
        ),
        force=force,
    )


@command(
    "eval",
    "cfiw eval --model runs/x/policy --dataset gsm8k --split test --limit 200 --out runs/x/eval/iter-0000.parquet",
)
def evaluate(
    model: opt.Model,
    dataset: opt.Dataset,
    out: Annotated[Path, typer.Option(help="eval.parquet to write.")],
    split: opt.Split = "test",
    limit: opt.Limit = None,
    offset: opt.Offset = 0,
    samples: Annotated[
        int, typer.Option("--samples", "-k", min=1, help="Samples per question (k > 1 adds pass@k and maj@k).")
    ] = 1,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Sampling temperature (0 = greedy; use e.g. 0.6 with --samples).")
    ] = 0.0,
    top_p: opt.TopP = 1.0,
    max_new_tokens: opt.MaxNewTokens = 512,
    batch_size: opt.BatchSize = 64,
    seed: opt.Seed = 0,
    dtype: opt.Dtype = "auto",
    prompt_template: opt.PromptTemplate = None,
    chat_template: opt.ChatTemplate = True,
    force: opt.Force = False,
) -> None:
    """Evaluate a model: accuracy with its 95% Wilson interval (printed and in the manifest)."""
    from cfiw_cli.pipeline import eval as stage

    result = stage.run(
        stage.EvalConfig(
            model=model,
            dataset=dataset,
            out=str(out),
            split=split,
            limit=limit,
            offset=offset,
            samples=samples,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            dtype=dtype.value,
            prompt_template=prompt_template,
            chat_template=chat_template,
        ),
        force=force,
    )
    if result.metrics:
        typer.echo(stage.summary_line(result.metrics))


@command(
    "segment",
    "cfiw segment --rollouts runs/x/iter-0000/rollouts.parquet --model runs/tiny-model --out runs/x/iter-0000/spans.parquet",
)
def segment(
    rollouts: opt.Rollouts,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model (hub id or directory) whose tokenizer produced the rollouts.")
    ],
    out: Annotated[Path, typer.Option(help="spans.parquet to write.")],
    max_spans: Annotated[int, typer.Option(help="Most reasoning spans kept per rollout (calculations first).")] = 10,
    min_tokens: Annotated[int, typer.Option(help="Sentences shorter than this are merged into a neighbour.")] = 5,
    max_tokens: Annotated[int, typer.Option(help="Sentences longer than this are split.")] = 50,
    force: opt.Force = False,
) -> None:
    """Cut each completion into token-aligned spans: calculation, numeric, scaffolding, answer.

    The answer span runs from the answer marker (####, The answer is, Final answer, \\boxed)
    to the end of the completion, stop token excluded; rollouts without an extractable answer
    get no rows. Calculations (12 + 24 = 36, <<3*4=12>>12) win overlaps; other sentences are
    numeric when they hold a digit, else scaffolding.
    """
    from cfiw_cli.pipeline import segment as stage

    stage.run(
        stage.SegmentConfig(
            rollouts=str(rollouts),
            model=model,
            out=str(out),
            max_spans=max_spans,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
        ),
        force=force,
    )


@command(
    "score",
    "cfiw score --model runs/tiny-model --rollouts runs/x/iter-0000/rollouts.parquet --spans runs/x/iter-0000/spans.parquet --out runs/x/iter-0000/scores.parquet --mask pad",
)
def score(
    model: opt.Model,
    rollouts: opt.Rollouts,
    spans: opt.Spans,
    out: Annotated[Path, typer.Option(help="scores.parquet to write.")],
    mask: Annotated[
        opt.MaskChoice,
        typer.Option(help="pad (span -> pad tokens), delete (span removed), knockout (span hidden from later tokens)."),
    ] = "pad",
    target: Annotated[
        opt.TargetChoice,
        typer.Option(help="own: the rollout's own answer tokens; gold: the gold answer in their place."),
    ] = "own",
    batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward call (memory bound).")] = 8192,
    dtype: opt.Dtype = "auto",
    force: opt.Force = False,
) -> None:
    """Span importance: delta = answer log-prob unmasked - answer log-prob with the span masked.

    Exactly what one full forward pass per masked variant gives, computed once per prompt
    and prefix: the unmasked KV cache is reused, only what follows each span runs, many
    variants of many rollouts share a forward call, and logits are computed only at answer
    positions. Under accelerate launch each process scores its share of the rollouts.
    """
    from cfiw_cli.pipeline import score as stage

    stage.run(
        stage.ScoreConfig(
            model=model,
            rollouts=str(rollouts),
            spans=str(spans),
            out=str(out),
            mask=mask.value,
            target=target.value,
            batch_tokens=batch_tokens,
            dtype=dtype.value,
        ),
        force=force,
    )


@command(
    "train",
    "cfiw train --model runs/x/policy --rollouts runs/x/iter-0000/rollouts.parquet --spans runs/x/iter-0000/spans.parquet --scores runs/x/iter-0000/scores.parquet --weighting cfiw --out runs/x/policy",
)
def train(
    model: opt.Model,
    rollouts: opt.Rollouts,
    out: Annotated[
        Path, typer.Option(help="Checkpoint directory to write (may be --model itself; replaced atomically).")
    ],
    spans: Annotated[
        Path | None, typer.Option("--spans", "-s", help="spans.parquet (needed unless --weighting uniform).")
    ] = None,
    scores: Annotated[Path | None, typer.Option(help="scores.parquet (needed unless --weighting uniform).")] = None,
    weighting: Annotated[
        opt.WeightingChoice,
        typer.Option(
            help="cfiw, uniform (plain DAPO/GRPO), inverted, shuffled (span deltas permuted) or random (i.i.d. U(0,1) importance)."
        ),
    ] = "cfiw",
    profile: Annotated[
        opt.ProfileChoice,
        typer.Option(
            help="cfiw (min-spread, unscored rollouts as uniform; see the README) or authors (the authors' trainer: formatting tokens x0.1, inversion over the whole completion)."
        ),
    ] = "cfiw",
    metrics_out: Annotated[Path | None, typer.Option(help="train_metrics.parquet (default: inside --out).")] = None,
    weights_out: Annotated[Path | None, typer.Option(help="weights.parquet (default: inside --out).")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-6,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    lr_schedule: Annotated[str, typer.Option(help="constant or cosine (over --total-steps).")] = "constant",
    total_steps: Annotated[
        int | None, typer.Option(help="Horizon of the cosine schedule (default: the steps of this call).")
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    epochs: Annotated[int, typer.Option(help="Passes over the batch.")] = 1,
    minibatches: Annotated[int, typer.Option(help="Optimizer steps per pass.")] = 1,
    micro_batch_tokens: Annotated[
        int, typer.Option(help="Padded tokens per forward/backward (gradient accumulation).")
    ] = 8192,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip (0: off).")] = 1.0,
    scale_rewards: Annotated[
        opt.RewardScalingChoice, typer.Option(help="Advantage scaling: group, batch or none.")
    ] = "group",
    dynamic_sampling: Annotated[
        bool, typer.Option("--dynamic-sampling/--no-dynamic-sampling", help="Drop groups whose rewards are all equal.")
    ] = True,
    mask_truncated: Annotated[
        bool,
        typer.Option(
            "--mask-truncated/--no-mask-truncated", help="Leave completions that hit the length limit out of the loss."
        ),
    ] = True,
    loss_type: Annotated[
        opt.LossTypeChoice, typer.Option(help="dapo (token mean over the batch), grpo (sequence mean) or dr_grpo.")
    ] = "dapo",
    eps_low: Annotated[float, typer.Option(help="Lower clip range of the ratio.")] = 0.2,
    eps_high: Annotated[float, typer.Option(help="Upper clip range of the ratio.")] = 0.28,
    beta: Annotated[
        float, typer.Option(help="KL coefficient (k3, to --reference); the reference is loaded only when > 0.")
    ] = 0.0,
    reference: Annotated[str | None, typer.Option(help="Reference model for the KL term (default: --model).")] = None,
    floor: Annotated[float, typer.Option(help="Importance floor added to every reasoning token.")] = 0.2,
    boost: Annotated[
        float, typer.Option(help="Weight of the most important reasoning token (before --conserve).")
    ] = 2.0,
    min_weight: Annotated[
        float, typer.Option(help="Weight of the least important reasoning token (before --conserve).")
    ] = 0.5,
    answer_weight: Annotated[float, typer.Option(help="Weight of answer tokens (before --conserve).")] = 1.5,
    conserve: Annotated[
        bool,
        typer.Option(
            "--conserve/--no-conserve", help="Rescale each rollout's weights to mean 1 (EOS left out, kept at 1)."
        ),
    ] = True,
    min_spread: Annotated[
        float,
        typer.Option(
            help="Importances whose spread (max - min, nats) is below this are flat: every reasoning token gets Î = 0.5."
        ),
    ] = 1e-3,
    temperature: Annotated[
        float | None,
        typer.Option(
            help="Temperature T of the log-probs, softmax(logits / T) (default: the rollouts' own, from their manifest or a temperature column; top-p is not applied)."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            help="dr_grpo normalizer (default: the rollouts' own --max-new-tokens; required for files that do not record it)."
        ),
    ] = None,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for activation memory."
        ),
    ] = False,
    seed: opt.Seed = 0,
    force: opt.Force = False,
) -> None:
    """Importance-weighted DAPO/GRPO update from saved rollouts (and spans + scores).

    Advantages are group-normalized per prompt; groups with equal rewards are dropped (with
    none left the policy is saved unchanged); minibatches hold whole groups. Every log-prob is
    of softmax(logits / T) at the rollouts' sampling temperature T (top-p is ignored, as in TRL
    and verl), so the update is on-policy; old log-probs are recomputed by the loaded policy,
    so the first minibatch has ratio 1, and their mean distance to the rollouts' own log-probs
    is reported as rollout_logprob_diff. The optimizer and scheduler state are saved
    with the checkpoint and resumed when --model holds them. Runs under accelerate launch
    (DDP; FSDP/DeepSpeed through the accelerate config), the batch split across processes.
    """
    from cfiw_cli.pipeline import train as stage

    stage.run(
        stage.TrainConfig(
            model=model,
            rollouts=str(rollouts),
            out=str(out),
            spans=str(spans) if spans else None,
            scores=str(scores) if scores else None,
            weighting=weighting.value,
            profile=profile.value,
            metrics_out=str(metrics_out) if metrics_out else None,
            weights_out=str(weights_out) if weights_out else None,
            lr=lr,
            warmup_steps=warmup_steps,
            lr_schedule=lr_schedule,
            total_steps=total_steps,
            weight_decay=weight_decay,
            epochs=epochs,
            minibatches=minibatches,
            micro_batch_tokens=micro_batch_tokens,
            grad_clip=grad_clip,
            scale_rewards=scale_rewards.value,
            dynamic_sampling=dynamic_sampling,
            mask_truncated=mask_truncated,
            loss_type=loss_type.value,
            eps_low=eps_low,
            eps_high=eps_high,
            beta=beta,
            reference=reference,
            floor=floor,
            boost=boost,
            min_weight=min_weight,
            answer_weight=answer_weight,
            conserve=conserve,
            min_spread=min_spread,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            gradient_checkpointing=gradient_checkpointing,
            seed=seed,
        ),
        force=force,
    )


@command("analyze", "cfiw analyze runs/tiny-cfiw runs/tiny-uniform --out runs/report")
def analyze(
    runs: Annotated[list[Path], typer.Argument(help="Run directories written by cfiw loop.")],
    out: Annotated[Path, typer.Option(help="Report directory (tables as JSON, PNG plots, report.md, report.html).")],
) -> None:
    """Tables, plots and a report over one or more runs, all aggregates in DuckDB SQL.

    Accuracy per iteration with 95% Wilson intervals, mean reward, span importance by kind,
    share of token weight by kind, iterations to reach the final uniform accuracy; report.html
    is self-contained and shows rollouts coloured by token weight.
    """
    from cfiw_cli.report import analyze as stage

    stage.run([str(r) for r in runs], str(out))
    typer.echo(f"report written to {out / 'report.html'} and {out / 'report.md'}")


@command(
    "sql", 'cfiw sql runs/x "select kind, avg(delta) from spans join scores using (rollout_id, span_idx) group by kind"'
)
def sql(
    run: Annotated[Path, typer.Argument(help="Run directory (runs/NAME).")],
    query: Annotated[
        str, typer.Argument(help="SQL over the views rollouts, spans, scores, weights, train_metrics, eval, manifests.")
    ],
    format: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Query every artifact of a run with DuckDB.

    Each artifact kind is a view over all iterations with an iteration column; manifests lists
    the manifest of every Parquet file (file, stage, manifest JSON).
    """
    from cfiw_cli.report import sql as stage

    columns, rows = stage.query(run, query)
    typer.echo(stage.render(columns, rows, format), nl=False)


@command("loop", "cfiw loop --preset tiny --run runs/tiny-cfiw --iterations 3 --weighting cfiw")
def loop(
    run: Annotated[Path, typer.Option(help="Run directory to write (runs/NAME); an interrupted run resumes.")],
    preset: Annotated[str | None, typer.Option(help="A preset in pipelines/: tiny, qwen, qwen-0.5b, llama.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="A TOML file laid out like the presets (instead of --preset).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Override the preset's model (hub id or directory).")
    ] = None,
    iterations: Annotated[int | None, typer.Option(help="Override the number of iterations.")] = None,
    weighting: Annotated[opt.WeightingChoice | None, typer.Option(help="Override the weighting.")] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Evaluate before every k-th iteration (and after the last).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override any preset value, SECTION.KEY=VALUE (TOML value), e.g. --set train.lr=1e-3; repeatable.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the equivalent cfiw commands instead of running.")
    ] = False,
) -> None:
    """Run the research loop: rollout -> segment -> score -> train, with evaluations.

    One process, the model loaded once; the files are exactly those of the separate commands
    (--dry-run prints them). Layout: RUN/config.toml, RUN/iter-NNNN/*.parquet, RUN/policy/,
    RUN/eval/iter-NNNN.parquet. Started again after an interruption, it resumes.
    """
    from cfiw_cli.pipeline import loop as stage

    settings = stage.load_config(preset, str(config) if config else None)
    settings = stage.apply_overrides(
        settings,
        {
            **stage.parse_assignments(set_ or []),
            "model.id": model,
            "loop.iterations": iterations,
            "loop.weighting": weighting.value if weighting else None,
            "loop.eval_every": eval_every,
            "loop.seed": seed,
        },
    )
    commands = stage.run(settings, str(run), dry_run=dry_run)
    if dry_run:
        typer.echo("\n".join(commands))


@command("replay", "cfiw replay runs/tiny-cfiw --iterations 0-11 --modes uniform,cfiw,inverted")
def replay(
    run: Annotated[
        Path, typer.Argument(help="Run directory written by cfiw loop with kept policies (loop.keep_policies).")
    ],
    iterations: Annotated[
        str | None, typer.Option(help="Iterations to replay, e.g. 0-11 or 0,4,8 (default: every kept one).")
    ] = None,
    modes: Annotated[
        str, typer.Option(help="Weighting modes to apply, comma-separated.")
    ] = "uniform,cfiw,inverted,shuffled,random",
    optimizer: Annotated[
        str,
        typer.Option(
            help="kept: start from the optimizer state policy_k had (the loop's own update); fresh: a new AdamW and schedule."
        ),
    ] = "kept",
    seed: Annotated[int | None, typer.Option(help="Seed of the minibatch order (default: the loop's).")] = None,
    probe_questions: Annotated[
        int | None, typer.Option(min=1, help="Probe questions (default: the loop's probe).")
    ] = None,
    probe_samples: Annotated[
        int | None, typer.Option(min=1, help="Samples per probe question (default: the loop's probe).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="replay.parquet to write (default: RUN/replay/replay.parquet).")
    ] = None,
) -> None:
    """Replay each kept iteration's update in every weighting mode, from the same policy on the same rollouts.

    For each iteration k and mode: load the policy iteration k started from, train on
    iteration k's rollouts, spans and scores with the run's settings in that mode, and measure
    the result on the loop's probe (sampled reward, and the likelihood of the reference
    solutions per token and of the answer line). Writes RUN/replay/MODE/iter-NNNN/ and one row
    per iteration x mode to replay.parquet; a killed replay resumes.
    """
    from cfiw_cli.pipeline import replay as stage

    stage.run(
        stage.ReplayConfig(
            run=str(run),
            iterations=iterations,
            modes=modes,
            optimizer=optimizer,
            seed=seed,
            probe_questions=probe_questions,
            probe_samples=probe_samples,
            out=str(out) if out else None,
        )
    )


@command("validate", "cfiw validate runs/x/iter-0000/rollouts.parquet --manifest")
def validate(
    path: Annotated[Path, typer.Argument(help="Parquet artifact to check.")],
    kind: Annotated[
        str | None,
        typer.Option(
            help="rollouts, spans, scores, weights, train_metrics or eval (default: from the manifest or file name)."
        ),
    ] = None,
    manifest: Annotated[bool, typer.Option("--manifest", help="Also print the manifest as JSON.")] = False,
) -> None:
    """Check that a Parquet file has the columns and types its stage needs.

    Files written by other tools are accepted when their columns match the schema; this command
    says whether one does, and names the first missing or mistyped column.
    """
    import json

    from cfiw_cli.artifacts import infer_kind, read_artifact, read_manifest
    from cfiw_cli.errors import CfiwError
    from cfiw_cli.schemas import SCHEMAS

    if not path.exists():
        raise CfiwError(f"file not found: {path}", "check the path")
    meta = read_manifest(path)
    kind = kind or infer_kind(path, meta)
    if kind not in SCHEMAS:
        raise CfiwError(f"unknown kind {kind!r}", f"choose one of {', '.join(SCHEMAS)}")
    table = read_artifact(path, kind)
    stage = meta.get("stage") if meta else "none (written by another tool?)"
    typer.echo(f"{path}: valid {kind} file, {table.num_rows} rows, manifest stage: {stage}")
    if manifest and meta:
        typer.echo(json.dumps(meta, indent=2, sort_keys=True))


def main() -> None:
    app()
