"""The `cfiw` command line: a thin Typer layer over the stages.

A stage command's flags are its config's fields (`cfiw_cli.configs`), turned into Typer
parameters by `cfiw_cli.options`; the command body receives the built config. Each stage
module is imported inside its command body, so `cfiw --help` loads neither it nor torch,
pyarrow or duckdb. Every body goes through `exits_cleanly`: bad input prints `Error: ...` and a
hint, and exits 1; a bad flag value exits 2.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cfiw_cli import __version__, configs, distributed, options
from cfiw_cli.errors import exits_cleanly

app = typer.Typer(
    name="cfiw",
    help="Counterfactual importance weighting for GRPO/DAPO fine-tuning on GSM8K.\n\n"
    "Stages talk through Parquet files (query them with DuckDB); every file carries a manifest.",
    epilog="Example: cfiw tiny-model --out runs/tiny-model && "
    "cfiw rollout --model runs/tiny-model --dataset gsm8k --limit 8 --out runs/demo/rollouts.parquet",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# which config each command builds from its flags (the test of flags walks this)
COMMAND_CONFIGS: dict[str, type] = {}


def command(name: str, example: str, config: type | None = None) -> Callable:
    """Register a command whose help ends with `example` and whose errors exit cleanly. With
    `config`, its flags are the config's fields plus the body's own keyword parameters, and
    the body is called with the built config first."""

    def register(func: Callable) -> Callable:
        if config is None:
            return app.command(name, epilog=f"Example: {example}")(exits_cleanly(func))
        COMMAND_CONFIGS[name] = config
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "config"]
        params = options.parameters(config) + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

        @functools.wraps(func)
        def with_config(**values):
            extra = {p.name: values.pop(p.name) for p in own}
            return func(options.build_config(config, values), **extra)

        del with_config.__wrapped__  # Typer must read the generated signature, not the body's
        with_config.__signature__ = inspect.Signature(params)
        with_config.__annotations__ = {p.name: p.annotation for p in params}
        return app.command(name, epilog=f"Example: {example}")(exits_cleanly(with_config))

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


@command(
    "tiny-model", "cfiw tiny-model --out runs/tiny-model --arch llama --layers 2 --hidden 64", configs.TinyModelConfig
)
def tiny_model(config: configs.TinyModelConfig, force: options.Force = False) -> None:
    """Build a small random-init model and a byte-level BPE tokenizer, offline.

    The tokenizer is trained on the dataset's text and has pad and EOS tokens and a ChatML chat
    template; the model is saved with save_pretrained, so it loads with AutoModelForCausalLM
    from the path. The same arguments and seed give identical files.
    """
    from cfiw_cli.tools import tiny_model as stage

    stage.run(config, force=force)


@command(
    "synth",
    "cfiw synth --out data/arith-distractors --n-train 2000 --n-test 200 --distractors 2 --seed 0",
    configs.SynthConfig,
)
def synth(config: configs.SynthConfig, force: options.Force = False) -> None:
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

    stage.run(config, force=force)


@command(
    "sft",
    "cfiw sft --model runs/tiny-model --dataset data/arith --out runs/tiny-sft --steps 1000 --lr 3e-3",
    configs.SftConfig,
)
def sft(config: configs.SftConfig, force: options.Force = False) -> None:
    """Supervised warm start on the dataset's reference solutions (TRL SFTTrainer).

    The prompt of each example is exactly what cfiw rollout sends; the loss covers the
    solution and its EOS token only. Writes the model and tokenizer (no optimizer state) and a
    manifest with the loss curve. Use it before RL when the base model earns no reward.
    """
    from cfiw_cli.tools import sft as stage

    stage.run(config, force=force)


@command(
    "rollout",
    "cfiw rollout --model Qwen/Qwen2.5-1.5B-Instruct --dataset gsm8k --limit 64 --group-size 8 "
    "--out runs/x/iter-0000/rollouts.parquet",
    configs.RolloutConfig,
)
def rollout(config: configs.RolloutConfig, force: options.Force = False) -> None:
    """Sample G completions per question with per-token log-probs, answers and rewards.

    Generation is batched (left padding, KV cache). completion_logprobs are the log-probs of the
    sampled tokens under the distribution they were drawn from (temperature and top-p applied).
    Writes one row per completion (schema in docs/commands.md).
    """
    from cfiw_cli.pipeline import rollout as stage

    stage.run(config, force=force)


@command(
    "eval",
    "cfiw eval --model runs/x/policy --dataset gsm8k --split test --limit 200 --out runs/x/eval/iter-0000.parquet",
    configs.EvalConfig,
)
def evaluate(config: configs.EvalConfig, force: options.Force = False) -> None:
    """Evaluate a model: accuracy with its 95% Wilson interval (printed and in the manifest)."""
    from cfiw_cli.pipeline import eval as stage

    result = stage.run(config, force=force)
    if result.metrics:
        typer.echo(stage.summary_line(result.metrics))


@command(
    "segment",
    "cfiw segment --rollouts runs/x/iter-0000/rollouts.parquet --model runs/tiny-model "
    "--out runs/x/iter-0000/spans.parquet",
    configs.SegmentConfig,
)
def segment(config: configs.SegmentConfig, force: options.Force = False) -> None:
    """Cut each completion into token-aligned spans: calculation, numeric, scaffolding, answer.

    The answer span runs from the answer marker (####, The answer is, Final answer, \\boxed)
    to the end of the completion, stop token excluded; rollouts without an extractable answer
    get no rows. Calculations (12 + 24 = 36, <<3*4=12>>12) win overlaps; other sentences are
    numeric when they hold a digit, else scaffolding.
    """
    from cfiw_cli.pipeline import segment as stage

    stage.run(config, force=force)


@command(
    "score",
    "cfiw score --model runs/tiny-model --rollouts runs/x/iter-0000/rollouts.parquet "
    "--spans runs/x/iter-0000/spans.parquet --out runs/x/iter-0000/scores.parquet --mask pad",
    configs.ScoreConfig,
)
def score(config: configs.ScoreConfig, force: options.Force = False) -> None:
    """Span importance: delta = answer log-prob unmasked - answer log-prob with the span masked.

    Exactly what one full forward pass per masked variant gives, computed once per prompt
    and prefix: the unmasked KV cache is reused, only what follows each span runs, many
    variants of many rollouts share a forward call, and logits are computed only at answer
    positions. Under accelerate launch each process scores its share of the rollouts.
    """
    from cfiw_cli.pipeline import score as stage

    stage.run(config, force=force)


@command(
    "train",
    "cfiw train --model runs/x/policy --rollouts runs/x/iter-0000/rollouts.parquet "
    "--spans runs/x/iter-0000/spans.parquet --scores runs/x/iter-0000/scores.parquet --weighting cfiw "
    "--out runs/x/policy",
    configs.TrainConfig,
)
def train(config: configs.TrainConfig, force: options.Force = False) -> None:
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

    stage.run(config, force=force)


@command("analyze", "cfiw analyze runs/tiny-cfiw runs/tiny-uniform --out runs/report")
def analyze(
    runs: Annotated[list[Path], typer.Argument(help="Run directories written by cfiw loop.")],
    out: Annotated[
        Path,
        typer.Option(
            help="Report directory (tables as JSON, PNG plots, report.md, report.html); an earlier report there "
            "is replaced."
        ),
    ],
    force: options.Force = False,
) -> None:
    """Tables, plots and a report over one or more runs, all aggregates in DuckDB SQL.

    Accuracy per iteration with 95% Wilson intervals, mean reward, span importance by kind,
    share of token weight by kind, iterations to reach the final uniform accuracy; report.html
    is self-contained and shows rollouts coloured by token weight.
    """
    from cfiw_cli.report import analyze as stage

    stage.run([str(r) for r in runs], str(out), force=force)
    typer.echo(f"report written to {out / 'report.html'} and {out / 'report.md'}")


SqlFormat = options.choice_type("SqlFormat", ("table", "csv", "json"))


@command(
    "sql", 'cfiw sql runs/x "select kind, avg(delta) from spans join scores using (rollout_id, span_idx) group by kind"'
)
def sql(
    run: Annotated[Path, typer.Argument(help="Run directory (runs/NAME).")],
    query: Annotated[
        str,
        typer.Argument(
            help="SQL over the views rollouts, spans, scores, weights, train_metrics, eval, probe, replay, "
            "replay_weights, gradients, manifests."
        ),
    ],
    format: Annotated[SqlFormat, typer.Option("--format", help="Output format.")] = "table",
) -> None:
    """Query every artifact of a run with DuckDB.

    Each artifact kind is a view over all iterations with an iteration column; manifests lists
    the manifest of every Parquet file (file, stage, manifest JSON).
    """
    from cfiw_cli.report import sql as stage

    columns, rows = stage.query(run, query)
    typer.echo(stage.render(columns, rows, SqlFormat(format).value), nl=False)


PresetChoice = options.choice_type("PresetChoice", tuple(sorted(configs.presets())))


@command("loop", "cfiw loop --preset tiny --run runs/tiny-cfiw --iterations 3 --weighting cfiw")
def loop(
    run: Annotated[Path, typer.Option(help="Run directory to write (runs/NAME); an interrupted run resumes.")],
    preset: Annotated[PresetChoice | None, typer.Option(help="A preset shipped in the package (pipelines/).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="A TOML file laid out like the presets (instead of --preset).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Override the preset's model (hub id or directory).")
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Hub revision of the model (branch, tag or commit; default: main).")
    ] = None,
    iterations: Annotated[
        int | None, typer.Option(min=1, max=configs.MAX_STEPS, help="Override the number of iterations.")
    ] = None,
    dtype: Annotated[
        options.TrainDtypeChoice | None,
        typer.Option(
            help="Compute dtype of every stage: auto (bfloat16 on a bf16 GPU, else float32), float32 or bfloat16; "
            "train keeps float32 weights."
        ),
    ] = None,
    weighting: Annotated[options.WeightingChoice | None, typer.Option(help="Override the weighting.")] = None,
    profile: Annotated[
        options.ProfileChoice | None,
        typer.Option(help="Override the profile of segment, score and train: cfiw or authors (loop.profile)."),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(min=1, max=configs.MAX_STEPS, help="Evaluate before every k-th iteration (and after the last)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, max=configs.MAX_SEED, help="Override the seed.")] = None,
    keep_checkpoints: Annotated[
        int | None,
        typer.Option(
            min=0, max=configs.MAX_STEPS, help="Keep only the newest N kept policies (loop.keep_checkpoints; 0: all)."
        ),
    ] = None,
    lora_r: Annotated[
        int | None,
        typer.Option(min=0, max=65_536, help="Train LoRA adapters of this rank (train.lora_r; 0: full fine-tuning)."),
    ] = None,
    lora_alpha: Annotated[float | None, typer.Option(min=0.0, help="LoRA alpha (train.lora_alpha).")] = None,
    lora_target_modules: Annotated[
        str | None,
        typer.Option(help="Modules with adapters, e.g. q_proj,v_proj or all-linear (train.lora_target_modules)."),
    ] = None,
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
    report_to: Annotated[
        options.ReportToChoice,
        typer.Option(help="Live curves of every stage: none, tensorboard (RUN/tracking/), wandb or trackio."),
    ] = options.NO_TRACKING,
) -> None:
    """Run the research loop: rollout -> segment -> score -> train, with evaluations.

    The model loaded once (in each process under accelerate launch); the files are exactly
    those of the separate commands (--dry-run prints them). Layout: RUN/config.toml,
    RUN/iter-NNNN/*.parquet, RUN/policy/, RUN/eval/iter-NNNN.parquet. Started again after an
    interruption, it resumes.
    """
    from cfiw_cli.pipeline import loop as stage

    if (preset is None) == (config is None):
        raise typer.BadParameter(
            "pass exactly one of them (presets: " + ", ".join(sorted(configs.presets())) + ")",
            param_hint="'--preset' / '--config'",
        )
    settings = stage.load_config(preset.value if preset else None, str(config) if config else None)
    overrides = {
        "model.id": model,
        "model.revision": revision,
        "loop.iterations": iterations,
        **{f"{section}.dtype": dtype.value if dtype else None for section in ("rollout", "score", "eval", "train")},
        "loop.weighting": weighting.value if weighting else None,
        "loop.profile": profile.value if profile else None,
        "loop.eval_every": eval_every,
        "loop.seed": seed,
        "loop.keep_checkpoints": keep_checkpoints,
        "train.lora_r": lora_r,
        "train.lora_alpha": lora_alpha,
        "train.lora_target_modules": lora_target_modules,
    }
    flags = {key: value for key, value in overrides.items() if value is not None}  # a flag wins over --set
    settings = stage.apply_overrides(settings, {**stage.parse_assignments(set_ or []), **flags})
    commands = stage.run(settings, str(run), dry_run=dry_run, report_to=report_to.value)
    if dry_run:
        typer.echo("\n".join(commands))


@command("replay", "cfiw replay runs/tiny-cfiw --iterations 0-11 --modes uniform,cfiw,inverted", configs.ReplayConfig)
def replay(config: configs.ReplayConfig, force: options.Force = False) -> None:
    """Replay each kept iteration's update in every weighting mode, from the same policy on the same rollouts.

    For each iteration k and mode: load the policy iteration k started from, train on
    iteration k's rollouts, spans and scores with the run's settings in that mode, and measure
    the result on the loop's probe (sampled reward, and the likelihood of the reference
    solutions per token and of the answer line). Writes RUN/replay/MODE/iter-NNNN/ and one row
    per iteration x mode to replay.parquet; a killed replay resumes.
    """
    from cfiw_cli.pipeline import replay as stage

    stage.run(config, force=force)


@command(
    "gradients", "cfiw gradients runs/tiny-cfiw --modes uniform,cfiw,cfiw@0,oracle --reference-rollouts 2048",
    configs.GradientsConfig,
)  # fmt: skip
def gradients(config: configs.GradientsConfig, force: options.Force = False) -> None:
    """Measure what each weighting mode does to the policy gradient, without an update.

    For each kept iteration and mode, on the minibatches train forms from that iteration's
    rollouts: the gradient's norm, its cosine with uniform's and with a reference gradient (the
    iteration's questions sampled again, 8x by default), the share of each span kind and synth
    label, and the cosine between two halves of the minibatch (its noise). Writes
    RUN/gradients/MODE/iter-NNNN/ and all rows to gradients.parquet; a killed run resumes.
    """
    from cfiw_cli.pipeline import gradients as stage

    stage.run(config, force=force)


KindChoice = options.choice_type("KindChoice", configs.ARTIFACT_KINDS)


@command("validate", "cfiw validate runs/x/iter-0000/rollouts.parquet --manifest")
def validate(
    path: Annotated[Path, typer.Argument(help="Parquet artifact to check.")],
    kind: Annotated[
        KindChoice | None,
        typer.Option(help="The artifact kind (default: from the manifest, the file name or the columns)."),
    ] = None,
    manifest: Annotated[bool, typer.Option("--manifest", help="Also print the manifest as JSON.")] = False,
) -> None:
    """Check that a Parquet file has the columns and types its stage needs.

    Files written by other tools are accepted when their columns match the schema; this command
    says whether one does, and names the first missing or mistyped column.
    """
    from cfiw_cli.report import validate as stage

    kind, rows, meta = stage.check(path, kind.value if kind else None)
    written_by = meta.get("stage") if meta else "none (written by another tool?)"
    typer.echo(f"{path}: valid {kind} file, {rows} rows, manifest stage: {written_by}")
    if manifest and meta:
        typer.echo(json.dumps(meta, indent=2, sort_keys=True))


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        distributed.exit_launched_process(exc.code)  # returns unless under `accelerate launch`
        raise
