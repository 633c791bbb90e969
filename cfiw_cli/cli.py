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
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from cfiw_cli import __version__, configs, distributed, options
from cfiw_cli.errors import exits_cleanly
from cfiw_cli.registry import STAGES

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


def command(name: str, example: str, section_flags: tuple[options.SectionFlag, ...] = ()) -> Callable:
    """Register a command whose help ends with `example` and whose errors exit cleanly. For a
    stage of the registry, its flags are its config's fields plus the body's own keyword
    parameters, and the body is called with the built config first. With `section_flags`,
    those flags are added, and the body gets the config keys they set as `overrides`."""

    def register(func: Callable) -> Callable:
        if section_flags:
            return app.command(name, epilog=f"Example: {example}")(exits_cleanly(_with_flags(func, section_flags)))
        if name not in STAGES:
            return app.command(name, epilog=f"Example: {example}")(exits_cleanly(func))
        config = STAGES[name].config
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


def _with_flags(func: Callable, section_flags: tuple[options.SectionFlag, ...]) -> Callable:
    """`func` with the generated flags in its signature, called with their `overrides`."""
    own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "overrides"]
    params = own + [flag.parameter() for flag in section_flags]

    @functools.wraps(func)
    def with_flags(**values):
        overrides = options.section_overrides(section_flags, values)
        return func(**{p.name: values[p.name] for p in own}, overrides=overrides)

    del with_flags.__wrapped__
    with_flags.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
    with_flags.__annotations__ = {p.name: p.annotation for p in params}
    return with_flags


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cfiw {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    rehash: Annotated[
        bool,
        typer.Option(
            "--rehash",
            help="Hash every input file afresh, ignoring the recorded hashes (kept per file while its "
            "size, mtime and inode stay the same).",
        ),
    ] = False,
) -> None:
    if rehash:
        os.environ["CFIW_REHASH"] = "1"  # read by every hash, here and in processes started from here


@command("tiny-model", "cfiw tiny-model --out runs/tiny-model --arch llama --layers 2 --hidden 64")
def tiny_model(config: configs.TinyModelConfig, force: options.Force = False) -> None:
    """Build a small random-init model and a byte-level BPE tokenizer, offline.

    The tokenizer is trained on the dataset's text and has pad and EOS tokens and a ChatML chat
    template; the model is saved with save_pretrained, so it loads with AutoModelForCausalLM
    from the path. The same arguments and seed give identical files.
    """
    from cfiw_cli.tools import tiny_model as stage

    stage.run(config, force=force)


@command("synth", "cfiw synth --out data/arith-distractors --n-train 2000 --n-test 200 --distractors 2 --seed 0")
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


@command("sft", "cfiw sft --model runs/tiny-model --dataset data/arith --out runs/tiny-sft --steps 1000 --lr 3e-3")
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


ReportFormat = options.choice_type("ReportFormat", ("all", "md", "html"))


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
    format: Annotated[
        ReportFormat, typer.Option("--format", help="Pages to write: all (report.md and report.html), md or html.")
    ] = "all",
    explorer_rollouts: Annotated[
        int,
        typer.Option(
            min=0, max=configs.MAX_ROWS, help="Most rollouts embedded in report.html's token explorer (0: none)."
        ),
    ] = 512,
) -> None:
    """Tables, plots and a report over one or more runs, all aggregates in DuckDB SQL.

    The report leads with a summary (per run: probe and greedy accuracy first -> last, steps,
    seconds, token weight by span kind; over runs: each mode minus uniform with its 95%
    interval, and whether any interval excludes zero), then the plots with captions, then every
    table. report.html is one self-contained file with a token explorer: a rollout's tokens
    coloured by each mode's weight, span deltas on hover.
    """
    from cfiw_cli.report import analyze as stage

    chosen = ReportFormat(format).value
    stage.run([str(r) for r in runs], str(out), force=force, format=chosen, explorer_rollouts=explorer_rollouts)
    pages = {"all": ("report.html", "report.md"), "md": ("report.md",), "html": ("report.html",)}[chosen]
    typer.echo(f"report written to {' and '.join(str(out / page) for page in pages)}")


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


def _run_settings(
    preset: Any, config: Path | None, assignments: list[str] | None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A run's settings: exactly one of a preset and a config file, then `--set`, then the flags
    that set config keys (a flag wins over --set)."""
    from cfiw_cli.pipeline import loop as stage

    if (preset is None) == (config is None):
        raise typer.BadParameter(
            "pass exactly one of them (presets: " + ", ".join(sorted(configs.presets())) + ")",
            param_hint="'--preset' / '--config'",
        )
    settings = stage.load_config(preset.value if preset else None, str(config) if config else None)
    return stage.apply_overrides(settings, {**stage.parse_assignments(assignments or []), **(overrides or {})})


# `cfiw loop`'s flags beside --set: each sets config keys, declared where the key's field is
LOOP_FLAGS = (
    options.SectionFlag("model", configs.ModelSection, "id", ("model.id",), "-m"),
    options.SectionFlag("revision", configs.ModelSection, "revision", ("model.revision",)),
    options.SectionFlag("iterations", configs.LoopSection, "iterations", ("loop.iterations",)),
    options.SectionFlag(
        "dtype", configs.TrainConfig, "dtype", tuple(f"{s}.dtype" for s in ("rollout", "score", "eval", "train"))
    ),
    options.SectionFlag("weighting", configs.LoopSection, "weighting", ("loop.weighting",)),
    options.SectionFlag("profile", configs.LoopSection, "profile", ("loop.profile",)),
    options.SectionFlag("eval_every", configs.LoopSection, "eval_every", ("loop.eval_every",)),
    options.SectionFlag("seed", configs.LoopSection, "seed", ("loop.seed",)),
    options.SectionFlag("keep_checkpoints", configs.LoopSection, "keep_checkpoints", ("loop.keep_checkpoints",)),
    options.SectionFlag("score", configs.LoopSection, "score", ("loop.score",)),
    options.SectionFlag("lora_r", configs.TrainConfig, "lora_r", ("train.lora_r",)),
    options.SectionFlag("lora_alpha", configs.TrainConfig, "lora_alpha", ("train.lora_alpha",)),
    options.SectionFlag(
        "lora_target_modules", configs.TrainConfig, "lora_target_modules", ("train.lora_target_modules",)
    ),
)


@command("loop", "cfiw loop --preset tiny --run runs/tiny-cfiw --iterations 3 --weighting cfiw", LOOP_FLAGS)
def loop(
    run: Annotated[Path, typer.Option(help="Run directory to write (runs/NAME); an interrupted run resumes.")],
    overrides: dict[str, Any],
    preset: Annotated[PresetChoice | None, typer.Option(help="A preset shipped in the package (pipelines/).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="A TOML file laid out like the presets (instead of --preset).")
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

    settings = _run_settings(preset, config, set_, overrides)
    commands = stage.run(settings, str(run), dry_run=dry_run, report_to=report_to.value)
    if dry_run:
        typer.echo("\n".join(commands))


@command("trl-train", "cfiw trl-train --preset tiny --out runs/trl-tiny --steps 8 --set loop.weighting=cfiw")
def trl_train(
    out: Annotated[Path, typer.Option(help="Directory for TRL's output and the trained policy.")],
    preset: Annotated[PresetChoice | None, typer.Option(help="A preset shipped in the package (pipelines/).")] = None,
    config: Annotated[Path | None, typer.Option(help="A TOML file laid out like the presets.")] = None,
    steps: Annotated[int, typer.Option(min=1, max=configs.MAX_STEPS, help="Optimizer steps.")] = 8,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a preset value, SECTION.KEY=VALUE, e.g. --set loop.weighting=uniform."),
    ] = None,
) -> None:
    """Train with TRL's GRPOTrainer and CFIW per-token advantages, from a loop preset.

    The preset's model, train split and cfiw's reward (the answer equals the gold number); its
    rollout and train settings become GRPOConfig's, its weighting, profile and train, score and
    segment settings the trainer's CFIWConfig. Each generated batch is segmented and scored in
    process, and its advantages multiplied by the token weights (see docs/scale.md).
    """
    import torch

    from cfiw_cli.integrations import trl_run
    from cfiw_cli.pipeline import loop as loop_stage

    settings = _run_settings(preset, config, set_)
    loop_stage.plan(settings, out / "plan")  # every value checked as cfiw loop checks it, before anything loads
    trl_run.cfiw_settings(settings)  # and what TRL's batch cannot serve (oracle, entropy)
    trl_run.run(settings, str(out), steps, use_cpu=not torch.cuda.is_available())
    typer.echo(f"trained {steps} steps with TRL; the policy is in {out}")


@command("replay", "cfiw replay runs/tiny-cfiw --iterations 0-11 --modes uniform,cfiw,inverted")
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
    "gradients", "cfiw gradients runs/tiny-cfiw --modes uniform,cfiw,cfiw@0,oracle --reference-rollouts 2048"
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
