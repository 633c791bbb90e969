"""`cfiw loop`: rollout -> segment -> score -> train, iterated, in one process.

The model is loaded once and handed from stage to stage (the trained policy of iteration i
samples iteration i + 1). Every stage writes exactly the files the separate commands write,
with the same configs, so `cfiw loop --dry-run` prints the equivalent shell commands and
running them gives identical Parquet contents. Iteration i takes questions
[i * questions, (i + 1) * questions) of the train split, modulo `train_pool` when it is set (a
finite pool revisited, one epoch every train_pool / questions iterations).

The current policy is measured before iterations 0, k, 2k, ... (`eval_every` = k) and after
the last one, twice: greedy accuracy on `eval_limit` questions of the eval split
(`eval/iter-NNNN.parquet`), and the probe, `probe_samples` samples at the rollout temperature
and top-p on the first `probe_questions` questions of the eval split
(`probe/iter-NNNN.parquet`). The probe's questions and sampling seed are the same for every
iteration, weighting mode and loop seed, so its curves differ only by the policy; its mean
reward sees what greedy accuracy cannot, RL sharpening the sampling distribution.

With `loop.keep_policies = k` the policy that iterations k, 2k, ... started from is kept under
`RUN/policies/` (see `cfiw_cli.policies`) for `cfiw replay`.

A cosine schedule (`train.lr_schedule`) spans the whole run: unless `train.total_steps` is set,
its horizon is iterations x epochs x minibatches optimizer steps.

Resuming: `loop_state.json` counts completed iterations; within an interrupted iteration the
stages whose outputs are up to date are skipped, and a policy whose manifest shows it was
trained on this iteration's rollouts is not trained again.

Under `accelerate launch` every process holds the policy and the run keeps one process group:
evaluation, rollout, score and train split their work across the processes (`SHARDED`), and
the main process alone segments, keeps policies, picks best/ and writes the loop's state.
"""

from __future__ import annotations

import json
import shlex
import time
import tomllib
from dataclasses import dataclass, fields, replace
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from cfiw_cli import checkpoint, distributed, memory, modeling, sharding
from cfiw_cli.artifacts import (
    lies_inside,
    read_directory_manifest,
    recorded_value,
    recover_directory,
    remove_stale_temp_files,
    same_path,
    sha256_of,
    write_text_atomic,
)
from cfiw_cli.configs import (
    DataSection,
    EvalConfig,
    LoopSection,
    ModelSection,
    RolloutConfig,
    ScoreConfig,
    SegmentConfig,
    TrainConfig,
    at_quiet_default,
    parse_iterations,
    presets,
)
from cfiw_cli.console import info
from cfiw_cli.errors import CfiwError
from cfiw_cli.options import ordered_fields
from cfiw_cli.pipeline import train
from cfiw_cli.policies import KeepConfig, keep, keep_command, kept_iterations, prune_kept, update_best
from cfiw_cli.registry import LOOP_STAGES
from cfiw_cli.runs import EVALUATION_KINDS, ITERATION_KINDS, RunLayout, iteration_of
from cfiw_cli.stage import OutputLocks
from cfiw_cli.tasks.gsm8k import load_questions
from cfiw_cli.tracking import Tracker, check_report_to, log_train_steps, prefixed

PROBE_SEED = 0  # one sampling seed for every probe: runs that differ only in mode or seed draw alike


def load_config(preset: str | None, config_file: str | None) -> dict[str, Any]:
    """A preset's or config file's settings. A top-level `base = "PRESET"` starts from that
    preset, whose sections the file's own keys then override one by one."""
    shipped = presets()
    hint = f"presets: {', '.join(sorted(shipped))}"
    if bool(preset) == bool(config_file):
        raise CfiwError("pass exactly one of --preset and --config", hint)
    source: Path | Traversable | None = Path(config_file) if config_file else shipped.get(preset)
    if source is None or not source.is_file():
        raise CfiwError(f"no such {'config file' if config_file else 'preset'}: {config_file or preset}", hint)
    what = config_file or f"preset {preset}"
    config = _read_toml(source, what)
    seen = [preset]
    while "base" in config:
        name = config.pop("base")
        if not isinstance(name, str) or name not in shipped or name in seen:
            problem = "names itself through its bases" if name in seen else f"has base {name!r}, which is no preset"
            raise CfiwError(f"{what} {problem}", hint)
        if any(not isinstance(values, dict) for values in config.values()):
            raise CfiwError(f"{what}: beside base, every top-level key must be a [section]", hint)
        seen.append(name)
        overrides = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}
        parent = _read_toml(shipped[name], f"preset {name}")
        grandparent = parent.pop("base", None)
        config = apply_overrides(parent, overrides) | ({"base": grandparent} if grandparent is not None else {})
    return config


def _read_toml(source: Path | Traversable, name: str) -> dict[str, Any]:
    try:
        return tomllib.loads(source.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CfiwError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})", "save it as UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CfiwError(f"{name} is not valid TOML: {exc}", "fix the file") from exc


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Flags win over the preset: keys `section.name` (e.g. `loop.iterations`)."""
    merged = {section: dict(values) for section, values in config.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = key.split(".", 1)
        merged.setdefault(section, {})[name] = value
    return merged


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-3", "loop.weighting=uniform"]` -> {"train.lr": 0.001, "loop.weighting": "uniform"}:
    a value is read as TOML, and taken as a string when it is not valid TOML."""
    parsed = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or key.count(".") != 1 or not all(key.split(".")):
            raise CfiwError(
                f"--set {assignment!r} is not SECTION.KEY=VALUE", "e.g. --set train.lr=1e-3 --set rollout.group_size=4"
            )
        try:
            parsed[key.strip()] = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            parsed[key.strip()] = raw
    return parsed


def _to_toml(config: dict[str, Any]) -> str:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def _section(config: dict[str, Any], name: str, section_class: type, **fixed: Any) -> Any:
    """A section of the config as its dataclass, on top of what the loop sets (`fixed`): a bad
    value names the section and the key."""
    try:
        return section_class(**{**fixed, **config.get(name, {})})  # what the loop sets is no section key
    except CfiwError as exc:
        key = exc.message.split()[0].removeprefix("--").replace("-", "_")
        raise CfiwError(f"[{name}] {exc.message.replace(exc.message.split()[0], key, 1)}", exc.hint) from exc


@dataclass(frozen=True)
class Step:
    """One planned command of a loop run, with exactly the config its command would build."""

    iteration: int  # the final evaluation's is the number of iterations
    command: str  # keep, eval, rollout, segment, score or train
    config: Any
    role: str = ""  # an evaluation's: greedy (RUN/eval/) or probe (RUN/probe/)

    @property
    def name(self) -> str:
        """What the run layout, the logs and the curves call it: eval or probe for an evaluation."""
        return EVALUATION_KINDS[ROLES.index(self.role)] if self.command == "eval" else self.command


ROLES = ("greedy", "probe")  # an evaluation's role, in the order of runs.EVALUATION_KINDS


@dataclass(frozen=True)
class LoopPlan:
    """A loop run's parsed sections and its planned steps, in order."""

    settings: dict[str, Any]  # the resolved config, as written to RUN/config.toml
    loop: LoopSection
    data: DataSection
    model: ModelSection
    steps: list[Step]

    def configs(self, command: str, role: str = "") -> dict[int, Any]:
        """Each iteration's planned config of one command (and evaluation role)."""
        return {s.iteration: s.config for s in self.steps if s.command == command and s.role == role}


def plan(config: dict[str, Any], run: Path) -> LoopPlan:
    """Every stage of the run, in order. Every value and every rule that ties values together
    is checked here, when the configs are built, and what needs the environment (a tracker's
    library) is checked before any stage runs, so a bad config fails before the first stage
    (and `--dry-run` checks it too)."""
    _check_keys(config, {name: stage.config for name, stage in LOOP_STAGES.items()})
    loop = _section(config, "loop", LoopSection)
    data = _section(config, "data", DataSection)
    model = _section(config, "model", ModelSection)
    if loop.train_pool is not None and (loop.train_pool < loop.questions or loop.train_pool % loop.questions):
        raise CfiwError(
            f"loop.train_pool ({loop.train_pool}) must be a multiple of loop.questions ({loop.questions})",
            f"e.g. --set loop.train_pool={loop.questions * 8}",
        )
    steps = _steps(config, loop, data, model, RunLayout(run))
    checked = set()
    for step in steps:
        if step.command in LOOP_STAGES and step.command not in checked:  # every iteration needs the same
            checked.add(step.command)
            try:
                LOOP_STAGES[step.command].check_environment(step.config)
            except CfiwError as exc:
                raise CfiwError(f"[{step.command}] {exc.message}", exc.hint) from exc
    return LoopPlan(config, loop, data, model, steps)


def loop_plan(run: Path) -> LoopPlan:
    """A loop run's plan (see `plan`), from its config.toml."""
    path = RunLayout(run).config
    if not path.exists():
        raise CfiwError(f"{run} is not a loop run (no config.toml)", "pass a directory written by cfiw loop")
    return plan(tomllib.loads(path.read_text()), run)


def kept_scored_iterations(run: Path, trains: dict[int, Any], chosen: str | None, verb: str) -> list[int]:
    """The `--iterations` chosen (default: every kept one) of a loop run that `verb` (replayed,
    measured) needs: each with a kept policy and scored rollouts (`trains`: its planned train
    stages by iteration). None at all is an error too: iteration 0, always kept, is unscored."""
    scored = {i for i, step in trains.items() if Path(step.rollouts).exists() and Path(step.scores).exists()}
    completed = [i for i in kept_iterations(run) if i in scored]
    iterations = parse_iterations(chosen) if chosen else completed
    missing = [i for i in iterations if i not in completed]
    if missing or not iterations:
        raise CfiwError(
            f"iteration {missing[0] if missing else 0} of {run} has no kept policy or no scored rollouts",
            f"iterations that can be {verb}: {', '.join(map(str, completed)) or 'none'} (run the loop with "
            f"--set loop.keep_policies=1)",
        )
    return iterations


def _steps(
    config: dict[str, Any], loop: LoopSection, data: DataSection, model: ModelSection, layout: RunLayout
) -> list[Step]:
    """The steps, each config derived with `dataclasses.replace` from a template built (and so
    checked) once from its section; every stage gets the revision, which the run's policy
    directory ignores."""
    base, revision, seed, policy = model.id, model.revision, loop.seed, str(layout.policy)
    first = {kind: str(layout.artifact(0, kind)) for kind in ITERATION_KINDS}
    rollout_template = _section(
        config, "rollout", RolloutConfig, model=base, revision=revision, dataset=data.dataset, out=first["rollouts"],
        split=data.train_split, limit=loop.questions, seed=seed,
    )  # fmt: skip
    segment_template = _section(
        config, "segment", SegmentConfig, model=base, revision=revision, rollouts=first["rollouts"],
        out=first["spans"], profile=loop.profile,
    )  # fmt: skip
    score_template = _section(
        config, "score", ScoreConfig, model=base, revision=revision, rollouts=first["rollouts"], spans=first["spans"],
        out=first["scores"], profile=loop.profile,
    )  # fmt: skip
    scored = {"spans": first["spans"], "scores": first["scores"]} if loop.score else {"spans": None, "scores": None}
    train_template = _section(
        config, "train", TrainConfig, model=base, revision=revision, rollouts=first["rollouts"], **scored, out=policy,
        metrics_out=first["train_metrics"], weights_out=first["weights"], weighting=loop.weighting,
        profile=loop.profile, seed=seed,
    )  # fmt: skip
    if loop.score and score_template.groups == "mixed" and not train_template.dynamic_sampling:
        raise CfiwError(
            "score.groups = 'mixed' leaves the groups with equal rewards unscored, and train.dynamic_sampling = "
            "false trains on them",
            "set score.groups = 'all', or keep train.dynamic_sampling on",
        )
    if train_template.beta > 0 and not train_template.lora_r and train_template.reference is None:
        # the KL term anchors every iteration to the starting policy (with LoRA: the adapters disabled)
        train_template = replace(train_template, reference=base)
    if train_template.total_steps is None and (
        train_template.lr_schedule != "constant" or train_template.warmup_steps
    ):  # one schedule over the whole run (the step count carries over from iteration to iteration)
        total = loop.iterations * train_template.epochs * train_template.minibatches
        train_template = replace(train_template, total_steps=total)
    greedy_template = _section(
        config, "eval", EvalConfig, model=base, revision=revision, dataset=data.dataset, out="",
        split=data.eval_split, limit=loop.eval_limit, seed=seed,
        **{"max_new_tokens": rollout_template.max_new_tokens, **config.get("eval", {})},
    )  # fmt: skip
    # the probe samples as training does: the rollouts' prompts, dtype and sampling, one fixed seed
    probe_template = replace(
        greedy_template,
        limit=loop.probe_questions or None,
        samples=loop.probe_samples,
        seed=PROBE_SEED,
        batch_size=config.get("eval", {}).get("batch_size", rollout_template.batch_size),
        **{name: getattr(rollout_template, name) for name in PROBE_SAMPLING},
    )

    def evaluation(current: str, index: int) -> list[Step]:
        greedy = replace(greedy_template, model=current, out=str(layout.evaluation("eval", index)))
        if loop.probe_questions <= 0:
            return [Step(index, "eval", greedy, "greedy")]
        probe = replace(probe_template, model=current, out=str(layout.evaluation("probe", index)))
        return [Step(index, "eval", greedy, "greedy"), Step(index, "eval", probe, "probe")]

    steps = []
    for i in range(loop.iterations):
        current = base if i == 0 else policy
        files = {kind: str(layout.artifact(i, kind)) for kind in ITERATION_KINDS}
        if loop.keep_policies > 0 and i > 0 and i % loop.keep_policies == 0:
            steps.append(Step(i, "keep", KeepConfig(policy=policy, out=str(layout.kept_policy(i)))))
        if i % loop.eval_every == 0:
            steps += evaluation(current, i)
        offset = i * loop.questions % loop.train_pool if loop.train_pool is not None else i * loop.questions
        rollouts, spans, scores = files["rollouts"], files["spans"], files["scores"]
        steps.append(
            Step(i, "rollout", replace(rollout_template, model=current, out=rollouts, offset=offset, iteration=i))
        )
        if loop.score:
            steps += [
                Step(i, "segment", replace(segment_template, model=current, rollouts=rollouts, out=spans)),
                Step(i, "score", replace(score_template, model=current, rollouts=rollouts, spans=spans, out=scores)),
            ]
        else:
            spans = scores = None
        train = replace(
            train_template, model=current, rollouts=rollouts, spans=spans, scores=scores,
            metrics_out=files["train_metrics"], weights_out=files["weights"],
        )  # fmt: skip
        steps.append(Step(i, "train", train))
    steps += evaluation(policy, loop.iterations)
    return steps


# the probe's settings taken from the rollout section (its seed and batch size are its own)
PROBE_SAMPLING = ("temperature", "top_p", "max_new_tokens", "dtype", "prompt_template", "chat_template", "backend")

# set by the loop itself, not by a preset
_FIXED = {"model", "revision", "dataset", "out", "rollouts", "spans", "scores", "split", "offset", "limit", "iteration"}
_FIXED |= {"weighting", "profile", "seed", "metrics_out", "weights_out"}
SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "loop": LoopSection}


def _check_keys(config: dict[str, Any], stages: dict[str, type]) -> None:
    """A misspelt key in a preset or `--set` is an error, not silently ignored."""
    for section, values in config.items():
        if section in SECTIONS:
            allowed = {f.name for f in fields(SECTIONS[section])}
        elif section in stages:
            allowed = {f.name for f in fields(stages[section])} - _FIXED
        else:
            raise CfiwError(f"unknown config section [{section}]", f"sections: {', '.join([*SECTIONS, *stages])}")
        if not isinstance(values, dict):
            raise CfiwError(f"[{section}] must be a table of settings", "see pipelines/tiny.toml")
        unknown = sorted(set(values) - allowed)
        if section in stages and "profile" in unknown:
            raise CfiwError(
                f"{section}.profile is set for the whole loop", "set loop.profile (segment, score and train share it)"
            )
        if unknown:
            raise CfiwError(f"unknown key {section}.{unknown[0]}", f"[{section}] takes: {', '.join(sorted(allowed))}")
    if "id" not in config.get("model", {}) or "dataset" not in config.get("data", {}):
        raise CfiwError("the config needs model.id and data.dataset", "see pipelines/tiny.toml")


def command_line(command: str, stage_config: Any) -> str:
    """The `cfiw` command that runs one planned stage with exactly this config."""
    if command == "keep":
        return keep_command(stage_config)
    words = ["cfiw", command]
    for field in ordered_fields(type(stage_config)):
        value = getattr(stage_config, field.name)
        flag = "--" + field.name.replace("_", "-")
        if value is None or at_quiet_default(stage_config, field.name):
            continue
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, repr(value) if isinstance(value, float) else str(value)]
    return shlex.join(words)


def run(config: dict[str, Any], run_dir: str, dry_run: bool = False, report_to: str = "none") -> list[str]:
    """Run (or, with `dry_run`, list the commands of) every stage; returns the command lines.
    `report_to`: live curves of every stage (see `tracking`), in RUN/tracking/ for TensorBoard."""
    check_report_to(report_to)
    if sharding.requested(distributed.processes()):
        raise CfiwError(
            "cfiw loop does not run under FSDP: its stages sample and score with the whole policy in every process",
            "launch the loop with --multi_gpu (DDP), or run cfiw train alone under FSDP",
        )
    run = Path(run_dir)
    planned = plan(config, run)
    commands = [command_line(step.command, step.config) for step in planned.steps]
    if dry_run:
        return commands
    with modeling.pinned_revisions():  # one commit of a hub model for the whole run
        _run(planned, run, report_to)
    return commands


def _run(planned: LoopPlan, run: Path, report_to: str) -> None:
    """Every planned stage, from where an interrupted run stopped. Everything that can refuse
    the start (the run directory, the model, the dataset, another configuration) is checked
    before the first file is written, so a refused start leaves nothing behind."""
    layout = RunLayout(run)
    base, dataset = planned.model.id, planned.data.dataset
    builds = f"build it first: `just tiny-sft {base} 1000 {dataset}` (the warm start of the tiny presets)"
    builds = builds if "tiny" in Path(base).name else None
    modeling.check_model_ref(base, builds)
    _check_run_directory(layout, {"model": base, "dataset": dataset})
    resolved = _to_toml(planned.settings)
    if layout.config.is_file() and _read_text(layout.config) != resolved:
        raise CfiwError(
            f"{run} was started with another configuration", f"compare {layout.config}, or choose another --run"
        )
    _check_memory(planned.steps, base)  # loads the questions: a dataset that cannot load fails here, before any write
    main = distributed.is_main()  # under accelerate launch: the process that writes
    # One loop per run directory: a second copy would read the same state, then redo and
    # overwrite the first one's iterations from another policy.
    locks = distributed.agreed(OutputLocks, [run] if main else [])
    try:
        _resume(planned, run, layout, report_to, resolved, main)
    finally:
        locks.release()


def _resume(planned: LoopPlan, run: Path, layout: RunLayout, report_to: str, resolved: str, main: bool) -> None:
    """The planned stages from the first one not yet completed, under the run's lock."""
    if main and run.is_dir():
        recover_directory(layout.policy)  # a checkpoint commit that a kill interrupted
    distributed.barrier()
    recorded = _recorded_state(layout)
    completed = max(recorded, _trained_iteration(layout) + 1)  # the policy's commit may have outrun the state
    current_ref = planned.model.id if completed == 0 else str(layout.policy)
    commit = modeling.resolve_revision(current_ref, planned.model.revision)
    tokenizer = modeling.load_tokenizer(current_ref, commit)
    model = modeling.load_model(current_ref, "float32", revision=commit)
    if main:  # the start is accepted: now the run directory is written
        run.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(layout.config)  # a kill mid-replace of the config or the state left them
        remove_stale_temp_files(layout.state)
        write_text_atomic(layout.config, resolved)
        if completed != recorded:
            write_text_atomic(layout.state, json.dumps({"completed": completed}))
    distributed.barrier()
    tracker = Tracker(report_to, layout.tracking, run.name, planned.settings) if report_to != "none" and main else None
    if tracker is not None and completed > recorded and layout.artifact(completed - 1, "train_metrics").exists():
        log_train_steps(tracker, pq.read_table(layout.artifact(completed - 1, "train_metrics")).to_pylist())
    step = checkpoint.global_step(layout.policy) if completed else 0  # the x axis of its curves
    loop = planned.loop
    judge = Step(0, "eval", None, "probe" if loop.probe_questions > 0 else "greedy")  # what picks best/
    score_name = f"mean@{loop.probe_samples}" if judge.role == "probe" and loop.probe_samples > 1 else "accuracy"
    with distributed.one_group():
        for planned_step in planned.steps:
            iteration, command = planned_step.iteration, planned_step.command
            if iteration < completed:
                continue
            if main:
                info(f"[loop] iteration {iteration}: {command}")
            started = time.perf_counter()
            # the main process alone segments and keeps
            work = _run_step if main or _shards(command) else _wait
            model, metrics = distributed.agreed(work, planned_step, model, tokenizer)
            if not main:
                continue
            if tracker is not None:
                step = track(tracker, planned_step, metrics, time.perf_counter() - started, step)
            if command == "keep":
                prune_kept(run, loop.keep_checkpoints)
            if command == "eval" and iteration > 0 and planned_step.role == judge.role:
                value, judged = metrics[score_name], f"{judge.name} {score_name}"
                if update_best(layout.policy, layout.best, iteration, judged, value):
                    info(f"[loop] best/ is now the policy of iteration {iteration} ({judge.name} {value:.3f})")
            if command == "train":
                write_text_atomic(layout.state, json.dumps({"completed": iteration + 1}))
    if tracker is not None:
        tracker.close()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CfiwError(f"cannot read {path}: {exc}", "restore the file, or choose another --run") from exc


def _check_run_directory(layout: RunLayout, inputs: dict[str, str]) -> None:
    """`--run` is a directory (or not there yet), is no input and lies inside none, and no input
    lies where the loop writes (the policy, kept policies, best/, an iteration, evaluations)."""
    run = layout.root
    if run.exists() and not run.is_dir():
        raise CfiwError(f"--run {run} is a file", "pass a directory for the run, e.g. runs/NAME")
    owned = [layout.policy, layout.policies, layout.best, layout.replay, layout.tracking, run / "eval", run / "probe"]
    for key, ref in inputs.items():
        source = Path(ref).expanduser()
        if not source.exists():
            continue
        if same_path(source, run) or (source.is_dir() and lies_inside(run, source)):
            where = "is" if same_path(source, run) else "lies inside"
            raise CfiwError(f"--run {run} {where} the input {key} {ref}", "choose a new directory, e.g. runs/NAME")
        for place in owned + list(run.glob("iter-*")):
            if same_path(source, place) or lies_inside(source, place):
                raise CfiwError(
                    f"the input {key} {ref} lies where the loop writes, in --run {run}",
                    "move it out of the run directory, or choose another --run",
                )


# How the loop's config spells the knobs of its sampling stages, for memory errors.
_KNOBS = {
    "rollout": {"samples": "rollout.group_size", "limit": "loop.questions"},
    "eval": {"samples": "eval.samples", "limit": "loop.eval_limit"},
    "probe": {"samples": "loop.probe_samples", "limit": "loop.probe_questions"},
}


def _check_memory(steps: list[Step], base: str) -> None:
    """The first rollout, greedy evaluation and probe of the plan fit in memory (estimated from
    the starting model's shape, before it loads; every iteration samples alike)."""
    firsts: dict[str, Any] = {}
    for step in steps:
        if step.command in ("rollout", "eval") and step.name not in firsts:
            firsts[step.name] = step.config
    for kind, stage_config in firsts.items():
        section = "rollout" if kind in ("rollout", "probe") else "eval"
        names = {**_KNOBS[kind], "max_new_tokens": f"{section}.max_new_tokens", "batch_size": f"{section}.batch_size"}
        if kind == "probe":
            names["batch_size"] = "eval.batch_size"
        samples = stage_config.group_size if kind == "rollout" else stage_config.samples
        rows = load_questions(stage_config.dataset, stage_config.split, stage_config.offset, stage_config.limit)
        memory.check_stage_fits(replace(stage_config, model=base), rows, samples, names)


def _recorded_state(layout: RunLayout) -> int:
    """Iterations `loop_state.json` says are complete."""
    if not layout.state.exists():
        return 0
    return recorded_value(
        layout.state,
        "completed",
        lambda completed: isinstance(completed, int) and completed >= 0,
        "delete it: the loop then counts the completed iterations from the policy's manifest",
    )


def _trained_iteration(layout: RunLayout) -> int:
    """The iteration whose rollouts the run's policy was last trained on (its manifest records
    their path and sha256), or -1. A kill between the policy's commit and the state's write
    leaves the state one behind; this tells."""
    manifest = read_directory_manifest(layout.policy) if layout.policy.is_dir() else None
    recorded = ((manifest or {}).get("inputs") or {}).get("rollouts") or {}
    iteration = iteration_of(Path(str(recorded.get("path", ""))).parent.name)
    if iteration is None:
        return -1
    rollouts = layout.artifact(iteration, "rollouts")
    return iteration if rollouts.is_file() and sha256_of(rollouts) == recorded.get("sha256") else -1


def _shards(command: str) -> bool:
    """Whether every process of `accelerate launch` runs the command (each samples, scores or
    trains its share; the main process writes)."""
    return command in LOOP_STAGES and LOOP_STAGES[command].shards


def track(tracker: Tracker, planned: Step, metrics: dict[str, Any], seconds: float, step: int) -> int:
    """One stage's numbers at the current optimizer step; returns the step after it. Train logs
    each of its optimizer steps (loss, KL, entropy, clip fractions, grad norm, weight
    statistics) from its train_metrics file; an evaluation logs under eval/ or probe/."""
    if planned.command == "keep":
        return step
    name = planned.name  # eval/ or probe/ for an evaluation
    if planned.command == "train":
        last = log_train_steps(tracker, pq.read_table(planned.config.metrics_out).to_pylist())
        step = step if last is None else last
    else:
        tracker.log(prefixed(name, metrics), step)
    tracker.log({f"time/{name}_seconds": seconds}, step)
    return step


def _wait(step: Step, model: Any, tokenizer: Any) -> tuple[Any, dict]:
    """What a process other than the main one does during a stage that only the main runs."""
    return model, {}


def _run_step(step: Step, model: Any, tokenizer: Any) -> tuple[Any, dict]:
    """One planned command in this process, on the loop's model: the model after it (the
    trained policy after train) and the stage's metrics."""
    if step.command == "keep":
        keep(step.config)
        return model, {}
    if step.command == "train":
        if train.is_saved(step.config):  # a killed loop had already saved this update
            return modeling.load_model(step.config.out, "float32").eval(), {}
        result = train.run(step.config, force=True, model=model, tokenizer=tokenizer)
        return result.model.eval(), result.metrics
    stage = LOOP_STAGES[step.command]
    handed = {"model": model, "tokenizer": tokenizer} if stage.takes_model else {"tokenizer": tokenizer}
    return model, stage.load().run(step.config, **handed).metrics
