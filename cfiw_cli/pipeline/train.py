"""`cfiw train`: one offline policy update from saved rollouts (and spans + scores).

The batch is the rollouts file. Group advantages are computed per prompt; groups whose rewards
are all equal are dropped (dynamic sampling). Every log-prob is of softmax(logits / T), T the
rollouts' sampling temperature (their manifest, a `temperature` column, or --temperature),
so the update is for the distribution the rollouts were drawn from; top-p is not applied, as
in TRL and verl. This module prepares the update (reads and checks the inputs, weighs every
token, loads the policy, the reference and the optimizer) and saves its result;
`cfiw_cli.update` takes the optimizer steps (`epochs` passes of `minibatches` steps over whole
groups, micro-batches of at most `micro_batch_tokens` padded tokens, old log-probs recomputed
so the first ratio is exactly 1; the mean distance to the rollouts' own log-probs is reported
as `rollout_logprob_diff`), and `cfiw_cli.checkpoint` writes the checkpoint. Under
`accelerate launch` each process takes every n-th rollout of a minibatch; loss normalizers
are global, so the step equals the single-process one.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from cfiw_cli import adapters, checkpoint, distributed, modeling, schemas, sharding
from cfiw_cli.algo.loss import equal_reward_groups, group_advantages
from cfiw_cli.algo.spans import feeds_the_answer
from cfiw_cli.algo.weights import SCORED_MODES, ScoredSpan, WeightConfig, token_weights
from cfiw_cli.artifacts import prepare_output, read_artifact, read_manifest
from cfiw_cli.checks import check_finite_rollouts, check_scores_match, check_spans_match, require_rollouts
from cfiw_cli.configs import TRACKING_FIELDS, TrainConfig
from cfiw_cli.console import info
from cfiw_cli.distributed import state as process_state
from cfiw_cli.errors import CfiwError
from cfiw_cli.stage import StageResult, StageRun, guard_inputs, guard_tracking_dir
from cfiw_cli.tracking import beside_output, check_report_to, log_train_steps
from cfiw_cli.update import (
    ADAPTERS_OFF,
    TrainSequence,
    UpdateContext,
    build_optimizer,
    check_finite_parameters,
    optimize,
)


def check(config: TrainConfig) -> None:
    """What needs the environment: the tracker's library. The fields' own limits and the rules
    that tie them together are checked when the config is built."""
    check_report_to(config.report_to)


def _rollout_setting(rollouts: Any, manifest: dict | None, name: str, path: str) -> Any:
    """A sampling setting of the rollouts: from the manifest `cfiw rollout` wrote, else from a
    column holding one value (files written by other tools), else None."""
    if manifest and manifest.get("stage") == "rollout" and manifest.get("config", {}).get(name) is not None:
        return manifest["config"][name]
    if name in rollouts.column_names:
        values = set(rollouts.column(name).to_pylist()) - {None}
        if len(values) > 1:
            raise CfiwError(
                f"the {name} column of {path} holds several values ({', '.join(map(str, sorted(values)))})",
                f"train on rollouts sampled with one {name}, or pass --{name.replace('_', '-')}",
            )
        if values:
            return values.pop()
    return None


def sampling_settings(config: TrainConfig, rollouts: Any) -> dict[str, Any]:
    """The temperature the log-probs are taken at and the dr_grpo length normalizer."""
    manifest = read_manifest(config.rollouts)
    max_new_tokens = config.max_new_tokens or _rollout_setting(rollouts, manifest, "max_new_tokens", config.rollouts)
    if config.loss_type == "dr_grpo" and max_new_tokens is None:
        raise CfiwError(
            f"--loss-type dr_grpo needs the length limit of the rollouts, and {config.rollouts} does not record it",
            "pass --max-new-tokens (the limit they were sampled with)",
        )
    recorded = _rollout_setting(rollouts, manifest, "temperature", config.rollouts)
    if config.temperature is not None:
        temperature, source = float(config.temperature), "--temperature"
    elif recorded is not None:
        temperature, source = float(recorded), "rollouts"
    else:
        temperature, source = 1.0, "default"
        info(
            f"Warning: {config.rollouts} does not record its sampling temperature; training at T = 1 (pass "
            f"--temperature if they were sampled otherwise)"
        )
    if temperature == 0:  # greedy rollouts record their log-probs at T = 1
        temperature = 1.0
    return {
        "temperature": temperature,
        "temperature_source": source,
        "max_new_tokens": int(max_new_tokens) if max_new_tokens else None,
    }


def build_sequences(
    config: TrainConfig, rollouts: Any, spans: Any, scores: Any, tokenizer: Any = None
) -> tuple[list[TrainSequence], list[dict], int]:
    """Kept sequences, one weights.parquet row per rollout, and the number of dropped groups.
    `tokenizer` decodes tokens for the authors profile's formatting-token rule."""
    columns = [
        "rollout_id",
        "prompt_id",
        "prompt_ids",
        "completion_ids",
        "completion_logprobs",
        "finish_reason",
        "reward",
    ]
    oracle = config.weighting == "oracle"
    rows = rollouts.select(columns + (["labels"] if oracle else [])).to_pylist()
    advantages = group_advantages([r["reward"] for r in rows], [r["prompt_id"] for r in rows], config.scale_rewards)
    flat = equal_reward_groups([r["reward"] for r in rows], [r["prompt_id"] for r in rows])
    spans_by_rollout: dict[str, list[ScoredSpan]] = {}
    if spans is not None:
        deltas = {
            (s["rollout_id"], s["span_idx"]): s["delta"]
            for s in (scores.select(["rollout_id", "span_idx", "delta"]).to_pylist() if scores is not None else [])
        }
        if any(d is None or not math.isfinite(d) for d in deltas.values()):
            raise CfiwError("the scores file holds a NaN or infinite delta", "rerun cfiw score with --dtype float32")
        for span in spans.select(["rollout_id", "span_idx", "kind", "tok_start", "tok_end"]).to_pylist():
            delta = deltas.get((span["rollout_id"], span["span_idx"]))
            spans_by_rollout.setdefault(span["rollout_id"], []).append(
                ScoredSpan(span["kind"], span["tok_start"], span["tok_end"], delta)
            )
    weight_config = WeightConfig(
        config.floor,
        config.boost,
        config.min_weight,
        config.answer_weight,
        config.conserve,
        config.min_spread,
        config.profile,
        config.importance_floor,
    )
    needs_text = config.profile == "authors" and config.weighting in SCORED_MODES
    token_text = functools.lru_cache(maxsize=None)(lambda token: tokenizer.decode([token]))  # each id decoded once
    sequences, weight_rows = [], []
    for row, advantage in zip(rows, advantages, strict=True):
        completion = row["completion_ids"]
        rng = random.Random(f"{config.seed}:{row['rollout_id']}")
        texts = [token_text(t) for t in completion] if needs_text else None
        spans_here = spans_by_rollout.get(row["rollout_id"], [])
        if config.weighting == "entropy":
            weights = [1.0] * len(completion)  # until the old policy's entropies are known (`weigh_by_entropy`)
        else:
            weights = token_weights(
                len(completion),
                spans_here,
                config.weighting,
                weight_config,
                ends_with_stop=row["finish_reason"] == "stop",
                rng=rng,
                token_texts=texts,
                relevant=_relevance(row, spans_here, tokenizer) if oracle else None,
            )
        kept = not (config.dynamic_sampling and row["prompt_id"] in flat)
        truncated = config.mask_truncated and row["finish_reason"] == "length"
        weight_rows.append(
            {
                "rollout_id": row["rollout_id"],
                "weighting": config.weighting,
                "token_weights": weights,
                "advantage": advantage,
                "kept": kept,
                "truncated": truncated,
            }
        )
        if kept and completion:
            mask = [0.0 if truncated else 1.0] * len(completion)
            sequences.append(
                TrainSequence(
                    row["rollout_id"],
                    row["prompt_id"],
                    row["prompt_ids"] + completion,
                    len(row["prompt_ids"]),
                    advantage,
                    weights,
                    mask,
                    row["completion_logprobs"],
                    row["finish_reason"] == "stop",
                )
            )
    return sequences, weight_rows, len(flat) if config.dynamic_sampling else 0


def _relevance(row: dict, spans: list[ScoredSpan], tokenizer: Any) -> list[bool] | None:
    """Per reasoning token of a rollout: whether its line feeds the answer (the oracle)."""
    answer = next((s for s in spans if s.kind == "answer"), None)
    if answer is None:
        return None
    return feeds_the_answer(row["completion_ids"], row["labels"], answer.tok_start, tokenizer)


def run(
    config: TrainConfig, force: bool = False, model: Any = None, tokenizer: Any = None, finish: bool = True
) -> StageResult:
    """One update of `config.model` on the rollouts, saved to `config.out`. `model`/`tokenizer`:
    an already loaded policy (float32), e.g. the loop's; the trained one comes back in the
    result. Without `finish` the process group stays up for a caller that trains again (replay)."""
    check(config)
    out = Path(config.out)
    # by default the step metrics and token weights go inside the checkpoint, written with it
    # atomically, so updates of one batch in several modes (to several --out) never collide
    metrics_out = Path(config.metrics_out) if config.metrics_out else out / "train_metrics.parquet"
    weights_out = Path(config.weights_out) if config.weights_out else out / "weights.parquet"
    inputs = {name: getattr(config, name) for name in ("model", "rollouts", "spans", "scores")}
    outputs = {"--metrics-out": metrics_out, "--weights-out": weights_out}
    in_place = out if Path(config.model).expanduser().resolve() == out.expanduser().resolve() else None
    guard_inputs({"--out": out, **outputs}, {k: v for k, v in inputs.items() if v}, in_place=in_place)
    guard_tracking_dir(config, inputs)
    if in_place is not None:
        checkpoint.recover(out)  # `--model P --out P` killed mid-commit: P is whole again before it is read
    for path in (config.metrics_out, config.weights_out):
        if path:
            prepare_output(path)
    modeling.check_model_ref(config.model)
    batch = read_batch(config)
    with StageRun(
        "train", config, inputs, force=force, revision=config.revision, directory=True, replaces=True,
        outputs=outputs, exclude=("metrics_out", "weights_out", *TRACKING_FIELDS), requires=(metrics_out, weights_out),
    ) as stage:  # fmt: skip
        if stage.up_to_date:
            return stage.skipped(model)
        return _update(config, stage, batch, model, tokenizer, finish, metrics_out, weights_out)


@dataclass(frozen=True)
class Batch:
    """The update's inputs: the rollouts (and their spans and scores), and how they were sampled."""

    rollouts: pa.Table
    spans: pa.Table | None
    scores: pa.Table | None
    sampling: dict[str, Any]  # temperature, its source, max_new_tokens


def read_batch(config: TrainConfig) -> Batch:
    rollouts = read_artifact(config.rollouts, "rollouts")
    require_rollouts(rollouts, config.rollouts)
    spans = read_artifact(config.spans, "spans") if config.spans else None
    scores = read_artifact(config.scores, "scores") if config.scores else None
    if spans is not None:
        check_spans_match(rollouts, spans, config.rollouts, config.spans)
    if scores is not None and config.spans:
        check_scores_match(config.scores, config.spans, config.rollouts)
    check_finite_rollouts(rollouts, config.rollouts)
    if config.weighting == "oracle" and "labels" not in rollouts.column_names:
        raise CfiwError(
            f"--weighting oracle needs the labels column (ground-truth sentence labels), and {config.rollouts} "
            "has none",
            "sample the rollouts from a cfiw synth dataset, or choose another --weighting",
        )
    check_resumable(config)
    _warn_on_profile_mismatch(config)
    return Batch(rollouts, spans, scores, sampling_settings(config, rollouts))


def _update(
    config: TrainConfig,
    stage: StageRun,
    batch: Batch,
    model: Any,
    tokenizer: Any,
    finish: bool,
    metrics_out: Path,
    weights_out: Path,
) -> StageResult:
    """The RL step, top to bottom: load, weigh, recompute old log-probs, optimize, save."""
    import torch
    from accelerate import Accelerator

    modeling.quiet_libraries()
    accelerator = Accelerator(cpu=process_state().device.type == "cpu")
    torch.manual_seed(config.seed)
    tokenizer = tokenizer or modeling.load_tokenizer(config.model, stage.commit)
    sequences, weight_rows, dropped = build_sequences(config, batch.rollouts, batch.spans, batch.scores, tokenizer)
    policy = load_policy(config, model, batch.rollouts, stage.commit)
    steps_here = config.epochs * min(config.minibatches, len({s.group for s in sequences}))
    sharded = sharding.requested(accelerator.num_processes)  # an accelerate FSDP config
    if sharded:
        policy = sharding.shard(policy.to(accelerator.device))
    optimizer, scheduler, start_step = build_optimizer(policy, config, steps_here, sharded)
    if not sharded:
        policy, optimizer = accelerator.prepare(policy, optimizer)  # DDP across processes
    reference = None
    if config.beta > 0:
        lora = adapters.is_peft(accelerator.unwrap_model(policy))
        reference = ADAPTERS_OFF if lora else load_reference(config, accelerator.device, stage.commit)
    context = UpdateContext.of(config, batch.sampling, accelerator, tokenizer.pad_token_id, reference, sharded)
    if sequences:
        steps = optimize(policy, reference, optimizer, scheduler, sequences, config, context, start_step, steps_here)
        check_finite_parameters(policy)
        if config.weighting == "entropy":  # the weights the entropy pass chose
            chosen = {s.rollout_id: s.weights for s in sequences}
            for row in weight_rows:
                row["token_weights"] = chosen.get(row["rollout_id"], row["token_weights"])
    else:
        steps = []
        info(
            f"Warning: all {dropped} groups have equal rewards, so there is no advantage to learn from: "
            "no update; the policy is saved unchanged"
        )

    trained = None if sharded else accelerator.unwrap_model(policy)  # the same parameters on every process
    result = StageResult(stage.out, False, {}, trained)  # what the other processes return
    # gathered whole to the main process (every process takes part), or read from the one copy
    weights = sharding.full_model_state(policy) if sharded else None
    optimizer_state = sharding.full_optimizer_state(policy, optimizer) if sharded else optimizer.state_dict()
    if accelerator.is_main_process:
        step_rows = [s.row() for s in steps]
        metrics = _summary(step_rows, len(sequences), dropped, stage.seconds, context.world, batch.sampling)
        device = modeling.describe_device(accelerator.device)
        dtype = modeling.dtype_name(context.autocast)
        manifest = stage.manifest(rows=len(step_rows), metrics=metrics, device=device, seed=config.seed, dtype=dtype)
        tables = {
            metrics_out: pa.Table.from_pylist(step_rows, schema=schemas.TRAIN_METRICS_WRITTEN),
            weights_out: pa.Table.from_pylist(weight_rows, schema=schemas.WEIGHTS_WRITTEN),
        }
        saved = trained if trained is not None else policy  # a sharded policy saves the gathered weights
        saving = checkpoint.Checkpoint(saved, weights, optimizer_state, scheduler.state_dict(), config.optimizer)
        result = checkpoint.save(stage, saving, tokenizer, start_step + len(steps), manifest, tables)
        track(config, step_rows, metrics)
        if steps:
            info(
                f"trained {len(steps)} steps on {len(sequences)} rollouts ({config.weighting}, "
                f"T = {context.temperature:g}), final loss {steps[-1].loss:.4f}; saved {stage.out}"
            )
    accelerator.wait_for_everyone()
    if finish:
        distributed.finish()
    return result


def track(config: TrainConfig, step_rows: list[dict], metrics: dict[str, Any]) -> None:
    """The update's step rows (loss, KL, entropy, clip fractions, grad norm, weight statistics)
    at their optimizer steps, to `--report-to`."""
    tracker = beside_output(config) if step_rows else None
    if tracker is None:
        return
    last = log_train_steps(tracker, step_rows)
    tracker.log({"time/train_tokens_per_second": metrics["tokens_per_second"]}, last)
    tracker.close()


def _summary(
    step_rows: list[dict], sequences: int, dropped: int, seconds: float, processes: int, sampling: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's metrics of an update."""
    import torch

    tokens = sum(r["tokens"] for r in step_rows)
    metrics = {
        "steps": len(step_rows),
        "sequences": sequences,
        "dropped_groups": dropped,
        "tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "processes": processes,
        **sampling,
        "rollout_logprob_diff": _first_epoch_mean(step_rows, "rollout_logprob_diff"),
    }
    if torch.cuda.is_available():
        metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics


def load_policy(config: TrainConfig, model: Any, rollouts: pa.Table, commit: str | None = None) -> Any:
    """The policy in float32 (the optimizer's master copy): the one given, else `config.model`
    (at `commit`, for a hub model). With LoRA (`--lora-r`, or a `--model` holding adapters)
    only the adapters are trainable."""
    policy = model if model is not None else modeling.load_model(config.model, "float32", "cpu", commit)
    token_ids = rollouts.column("prompt_ids").to_pylist() + rollouts.column("completion_ids").to_pylist()
    modeling.check_vocabulary(policy, token_ids, config.rollouts)
    policy = adapters.for_training(policy, adapters.LoraSettings.of(config), config.model, commit)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        if adapters.is_peft(policy):  # the frozen embeddings would cut the graph of checkpointed layers
            policy.enable_input_require_grads()
    return policy


def load_reference(config: TrainConfig, device: Any, model_commit: str | None = None) -> Any:
    """The frozen model of the KL term (default: the policy's starting point, at the commit
    `--model` resolved to); a hub `--reference` of its own is taken at `--revision`."""
    ref = config.reference or config.model
    commit = model_commit if ref == config.model else modeling.resolve_revision(ref, config.revision)
    return modeling.load_model(ref, "float32", device, commit).eval()


def _warn_on_profile_mismatch(config: TrainConfig) -> None:
    """Spans and scores cut under one profile and weighed under the other are allowed (it
    separates the stages' differences), but never silently."""
    if config.weighting not in SCORED_MODES:
        return
    for name in ("spans", "scores"):
        path = getattr(config, name)
        made = ((read_manifest(path) or {}).get("config") or {}).get("profile") if path else None
        if made is not None and made != config.profile:
            info(f"Warning: {path} was made with --profile {made}; training with --profile {config.profile}")


def is_saved(config: TrainConfig) -> bool:
    """Whether `config.out` already holds this update (see `checkpoint.is_saved`)."""
    return checkpoint.is_saved(config.out, config.rollouts)


def check_resumable(config: TrainConfig) -> None:
    """The optimizer state of `--model` is resumed: it must be the state of `--optimizer`."""
    saved = checkpoint.saved_optimizer(config.model)
    if saved is not None and saved != config.optimizer:
        raise CfiwError(
            f"{config.model} holds {saved} optimizer state, which --optimizer {config.optimizer} cannot resume",
            f"pass --optimizer {saved}, or start from a checkpoint without {checkpoint.OPTIMIZER_FILE}",
        )


def _first_epoch_mean(rows: list[dict], key: str) -> float | None:
    """Token-weighted mean of a per-step metric over the first pass (each kept token once)."""
    first = [r for r in rows if r["epoch"] == 0]
    tokens = sum(r["tokens"] for r in first)
    return sum(r[key] * r["tokens"] for r in first) / tokens if tokens else None
