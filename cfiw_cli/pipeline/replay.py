"""`cfiw replay`: every weighting mode's update from the same policy on the same rollouts.

For each kept iteration k of a loop run (policy_k, the policy iteration k started from; see
`cfiw_cli.policies`) and each mode, replay runs `cfiw train` on iteration k's rollouts, spans
and scores with the run's own train settings in that mode, starting from policy_k with its
optimizer state (`--optimizer-state kept`; in the loop's mode this is the loop's own update,
exactly) or a fresh optimizer and schedule (`fresh`; then `--optimizer` may differ from the
loop's). A mode may carry its own importance floor, `cfiw@0` (see `--importance-floor`), so
one replay can sweep the mapping. The minibatch order depends only on the
seed and on which groups are kept, and neither depends on the mode, so the modes differ only
in the token weights. Each updated policy, and policy_k itself, is measured on the loop's
probe: the sampled reward (the same questions, samples, temperature and seed as the loop's
probe) and the teacher-forced likelihood of the reference solutions (`cfiw_cli.likelihood`),
which has no sampling noise.

Layout, under RUN/replay/:

    start/iter-NNNN/   probe.parquet, result.parquet          policy_k itself
    MODE/iter-NNNN/    train_metrics.parquet, weights.parquet, probe.parquet, result.parquet
                       (`cfiw sql`'s replay_weights view reads every MODE's weights)
    replay.parquet     one row per iteration x mode: policy_k's and the update's measures

An updated policy is on disk only while it is measured (`.updated/`); policy_k is rebuilt from
links to the kept files (`.policy/`), one at a time. A cell is done when its `result.parquet`
records the same settings and input hashes, so a killed replay resumes where it stopped.
Under `accelerate launch` the updates run on every process (`train` shards each minibatch);
the measurements run on the main process.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cfiw_cli import distributed, modeling
from cfiw_cli.artifacts import prepare_output, settings_of, sha256_of
from cfiw_cli.configs import ReplayConfig, mode_settings, parse_modes
from cfiw_cli.console import info
from cfiw_cli.errors import CfiwError
from cfiw_cli.likelihood import reference_likelihood, reference_sequences
from cfiw_cli.pipeline import eval as eval_stage
from cfiw_cli.pipeline import train
from cfiw_cli.pipeline.loop import LoopPlan, kept_scored_iterations, loop_plan
from cfiw_cli.policies import policy_at
from cfiw_cli.runs import RunLayout, iteration_name
from cfiw_cli.stage import StageRun, guard_inputs, guard_outputs
from cfiw_cli.tasks.gsm8k import load_questions

START = "start"  # the cell of policy_k itself


def _cells(config: ReplayConfig, run: Path, planned: LoopPlan) -> tuple[list[int], list[str], dict[int, Any], Any]:
    """The iterations and modes to replay, each iteration's planned train stage, and the probe."""

    modes = parse_modes(config.modes)
    trains = planned.configs("train")
    iterations = kept_scored_iterations(run, trains, config.iterations, "replayed")
    probes = list(planned.configs("eval", "probe").values())
    if not probes:
        raise CfiwError(
            f"{run} has no probe to copy the sampling settings from", "run the loop with loop.probe_questions > 0"
        )
    probe = replace(
        probes[0], limit=config.probe_questions or probes[0].limit, samples=config.probe_samples or probes[0].samples
    )
    return iterations, modes, trains, probe


def _optimizer(config: ReplayConfig, step: Any) -> dict[str, Any]:
    """The replayed updates' optimizer: the loop's unless overridden; kept state must be its own."""
    chosen = {
        "optimizer": config.optimizer or step.optimizer,
        "momentum": step.momentum if config.momentum is None else config.momentum,
    }
    if config.optimizer_state == "kept" and chosen["optimizer"] != step.optimizer:
        raise CfiwError(
            f"the loop trained with {step.optimizer}, so its kept optimizer state cannot start --optimizer "
            f"{chosen['optimizer']}",
            "add --optimizer-state fresh",
        )
    return chosen


def _update_config(step: Any, mode: str, optimizer: dict[str, Any]) -> Any:
    """The loop's train stage of an iteration, in `mode` (`MODE[@FLOOR][+PROFILE]`)."""
    return replace(step, **mode_settings(mode, step), **optimizer)


def _guard_summary(out: Path, run: Path, trains: list[Any], force: bool) -> None:
    """Before any cell runs: `--out` is not the run's config, a replayed file or a kept policy,
    and it replaces only a replay summary (or anything, with --force)."""
    layout = RunLayout(run)
    refs = {"config": str(layout.config), "policies": str(layout.policies)}
    for step in trains:
        refs |= {
            f"{key} of {Path(step.rollouts).parent.name}": getattr(step, key) for key in ("rollouts", "spans", "scores")
        }
    guard_inputs({"--out": out}, refs, named=lambda key: f"the run's {key}")
    guard_outputs({"--out": out}, "replay", force=force)
    prepare_output(out)


def weights_sha256(model_dir: str) -> str | None:
    """sha256 of a checkpoint's weights file (None for a hub id or sharded weights): two
    updates with the same hash have bit-identical parameters."""

    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (path := Path(model_dir) / name).exists():
            return sha256_of(path)
    return None


def _measure(
    model: Any, tokenizer: Any, probe: Any, cell: StageRun, references: list, weights: str | None
) -> dict[str, Any]:
    """Probe a policy: the sampled reward (probe.parquet) and the likelihoods (result.parquet)."""
    sampled = eval_stage.run(
        replace(probe, out=str(cell.out.parent / "probe.parquet")),
        force=True,
        model=model,
        tokenizer=tokenizer,
        shard=False,  # the main process measures alone while the others wait
    ).metrics
    likelihood = reference_likelihood(model, tokenizer, references)
    key = f"mean@{probe.samples}" if probe.samples > 1 else "accuracy"
    result = {
        "reward": sampled[key],
        "reward_se": sampled.get(f"{key}_se"),
        "loglik_per_token": likelihood["loglik_per_token"],
        "answer_loglik": likelihood["answer_loglik"],
        "reference_tokens": likelihood["tokens"],
        "questions": likelihood["questions"],
        "weights_sha256": weights,
    }
    device = modeling.describe_device(next(model.parameters()).device)
    cell.write_table(pa.Table.from_pylist([result]), cell.manifest(rows=1, metrics=result, device=device))
    return result


def run(config: ReplayConfig, force: bool = False) -> Path:
    """Every cell, then the summary `--out`, which is checked first: it is never one of the
    replayed files, and an existing file there is replaced only when it is a replay summary
    (or with `force`)."""
    run_dir = Path(config.run)
    if not run_dir.is_dir():
        what = "is a file, not a run directory" if run_dir.exists() else "not found"
        raise CfiwError(f"run directory {what}: {run_dir}", "pass a directory written by cfiw loop")
    planned = loop_plan(run_dir)
    iterations, modes, trains, probe = _cells(config, run_dir, planned)
    seed = planned.loop.seed if config.seed is None else config.seed
    base = planned.model.id
    root = RunLayout(run_dir).replay
    out = Path(config.out) if config.out else root / "replay.parquet"
    _guard_summary(out, run_dir, [trains[i] for i in iterations], force)
    rows_of_questions = load_questions(probe.dataset, probe.split, probe.offset, probe.limit)
    keep_optimizer = config.optimizer_state == "kept"
    optimizer = _optimizer(config, trains[iterations[0]])
    main = distributed.is_main()
    results: dict[tuple[int, str], dict] = {}
    for iteration in iterations:
        # one process rebuilds policy_k's links; the others wait for it
        policy_dir = policy_at(run_dir, iteration, base, keep_optimizer, root / ".policy", build=main)
        distributed.barrier()
        step = trains[iteration]
        inputs = {"policy": policy_dir, **{k: getattr(step, k) for k in ("rollouts", "spans", "scores")}}
        tokenizer = modeling.load_tokenizer(policy_dir)
        references = reference_sequences(tokenizer, rows_of_questions, probe.prompt_template, probe.chat_template)
        probe_settings = settings_of(probe, "model")
        for mode in [START, *modes]:
            directory = root / mode / iteration_name(iteration)
            settings = {"mode": mode, "optimizer_state": config.optimizer_state, "seed": seed, "probe": probe_settings}
            if mode != START:
                update = _update_config(step, mode, optimizer)
                settings["train"] = settings_of(
                    update, "model", "rollouts", "spans", "scores", "metrics_out", "weights_out", "weighting", "seed"
                )
            with StageRun("replay", None, inputs, out=directory / "result.parquet", settings=settings) as cell:
                if cell.up_to_date:
                    results[(iteration, mode)] = pq.read_table(cell.out).to_pylist()[0]
                    continue
                info(f"[replay] iteration {iteration}: {mode}")
                if mode == START:
                    model = modeling.load_model(policy_dir, "float32") if main else None
                    weights = weights_sha256(policy_dir)
                else:
                    updated = root / ".updated"
                    trained = train.run(
                        replace(
                            _update_config(step, mode, optimizer),
                            model=policy_dir,
                            out=str(updated),
                            seed=seed,
                            metrics_out=str(directory / "train_metrics.parquet"),
                            weights_out=str(directory / "weights.parquet"),
                        ),
                        force=True,
                        finish=False,
                    )
                    model, weights = trained.model, weights_sha256(str(updated)) if main else None
                if main:
                    measured_model = str(updated) if mode != START else policy_dir
                    probe_here = replace(probe, model=measured_model)
                    results[(iteration, mode)] = _measure(model, tokenizer, probe_here, cell, references, weights)
                    shutil.rmtree(root / ".updated", ignore_errors=True)
                del model
            distributed.barrier()
    if main:
        shutil.rmtree(root / ".policy", ignore_errors=True)
        rows = []
        for iteration in iterations:
            start = results[(iteration, START)]
            for mode in modes:
                after = results[(iteration, mode)]
                row = {
                    "iteration": iteration,
                    "mode": mode,
                    "optimizer": optimizer["optimizer"],
                    "optimizer_state": config.optimizer_state,
                    "seed": seed,
                }
                for name in ("reward", "loglik_per_token", "answer_loglik"):
                    row[f"{name}_before"], row[f"{name}_after"] = start[name], after[name]
                    row[f"{name}_gain"] = after[name] - start[name]
                row["reward_se_after"] = after["reward_se"]
                row["weights_sha256_before"], row["weights_sha256_after"] = (
                    start["weights_sha256"],
                    after["weights_sha256"],
                )
                rows.append(row)
        summary = {"modes": modes, "iterations": iterations, **optimizer, "optimizer_state": config.optimizer_state}
        summary["seed"] = seed
        with StageRun("replay", None, {}, force=force, recompute=True, out=out, settings=summary) as stage:
            stage.write_table(pa.Table.from_pylist(rows), stage.manifest(rows=len(rows), metrics={}))
        info(f"wrote {len(rows)} replays ({len(iterations)} iterations x {len(modes)} modes) to {out}")
    distributed.finish()
    return out
