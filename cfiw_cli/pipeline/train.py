"""`cfiw train`: one offline policy update from saved rollouts (and spans + scores).

The batch is the rollouts file. Group advantages are computed per prompt; groups whose rewards
are all equal are dropped (dynamic sampling). Every log-prob is of softmax(logits / T), T the
rollouts' sampling temperature (their manifest, a `temperature` column, or --temperature),
so the update is for the distribution the rollouts were drawn from; top-p is not applied, as
in TRL and verl. Old log-probs are recomputed by the loaded policy with the same
micro-batches as the first pass, so the ratio is exactly 1 on the first minibatch; their mean
distance to the rollouts' own log-probs is reported (`rollout_logprob_diff`). Each of
`epochs` passes shuffles the kept GRPO groups (seeded) into `minibatches` optimizer steps,
each group whole, so a minibatch's advantages sum to zero per group; a step accumulates
gradients over micro-batches of at most `micro_batch_tokens` padded tokens. Under
`accelerate launch` each process takes every n-th rollout of a minibatch; loss normalizers
are global, so the step equals the single-process one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from cfiw_cli import adapters, distributed, modeling, schemas, sharding
from cfiw_cli.algo.loss import LossConfig, group_advantages, loss_normalizer, policy_loss
from cfiw_cli.algo.spans import line_relevance
from cfiw_cli.algo.weights import (
    SCORED_MODES,
    ScoredSpan,
    WeightConfig,
    entropy_weights,
    quantile,
    token_weights,
)
from cfiw_cli.artifacts import (
    prepare_output,
    read_artifact,
    read_directory_manifest,
    read_manifest,
    recorded_value,
    recover_directory,
    sha256_of,
    stage_file,
    write_table,
)
from cfiw_cli.batching import consecutive_runs
from cfiw_cli.checks import check_finite_rollouts, check_scores_match, check_spans_match, require_rollouts
from cfiw_cli.configs import OPTIMIZERS, TRACKING_FIELDS, TrainConfig
from cfiw_cli.console import info, progress_bar
from cfiw_cli.distributed import state as process_state
from cfiw_cli.errors import CfiwError
from cfiw_cli.logprobs import completion_logprobs
from cfiw_cli.stage import StageResult, StageRun, guard_inputs, guard_tracking_dir
from cfiw_cli.tasks.arith import FEEDS_ANSWER, label_lookup
from cfiw_cli.tracking import beside_output, check_report_to, log_train_steps

if TYPE_CHECKING:
    import torch

STATE_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")


@dataclass
class _Sequence:
    rollout_id: str
    group: str  # prompt_id: the GRPO group
    tokens: list[int]  # prompt + completion
    prompt_length: int
    advantage: float
    weights: list[float]  # one per completion token
    mask: list[float]  # 1 for completion tokens that count
    rollout_logprobs: list[float]  # what the sampler recorded, one per completion token
    ends_with_stop: bool = False  # its last token is the stop token (weighs 1 in every mode)


def check(config: TrainConfig) -> None:
    """The rules that tie fields together or need the environment; each field's own limits and
    choices are checked where it is declared, when the config is built."""
    check_report_to(config.report_to)
    adapters.check(config)
    if config.lora_r and config.reference:
        raise CfiwError(
            "--reference cannot be used with LoRA: the reference is the policy with its adapters disabled",
            "drop --reference (the KL term then anchors to the base model)",
        )
    if config.weighting in SCORED_MODES and not (config.spans and config.scores):
        raise CfiwError(
            f"--weighting {config.weighting} needs --spans and --scores",
            "run cfiw segment and cfiw score first, or use --weighting uniform",
        )
    if config.weighting == "oracle" and not config.spans:
        raise CfiwError("--weighting oracle needs --spans (for the answer region)", "run cfiw segment first")


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
) -> tuple[list[_Sequence], list[dict], int]:
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
    rewards_by_group: dict[str, set] = {}
    for row in rows:
        rewards_by_group.setdefault(row["prompt_id"], set()).add(row["reward"])
    flat = {g for g, values in rewards_by_group.items() if len(values) == 1}
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
                _Sequence(
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
    labels = label_lookup(row["labels"])
    return line_relevance(row["completion_ids"], tokenizer, answer.tok_start, labels, FEEDS_ANSWER)


def weigh_by_entropy(sequences: list[_Sequence], entropies: dict[str, list[float]], q: float) -> None:
    """`entropy` mode: every kept sequence's weights from the old policy's per-token entropies.
    The threshold is the q-quantile over every token that carries loss in the update (a
    final stop token left out), once for the batch."""
    population = []
    for s in sequences:
        values = entropies[s.rollout_id]
        body = len(values) - 1 if s.ends_with_stop else len(values)
        population += [h for h, m in zip(values[:body], s.mask[:body], strict=True) if m > 0]
    if not population:
        return
    threshold = quantile(population, q)
    for s in sequences:
        s.weights = entropy_weights(entropies[s.rollout_id], threshold, s.ends_with_stop)


def plan_minibatches(sequences: list[_Sequence], minibatches: int, seed: int, epoch: int) -> list[list[_Sequence]]:
    """Whole GRPO groups, shuffled (seeded per epoch), dealt into min(minibatches, groups)
    minibatches whose group counts differ by at most one."""
    groups: dict[str, list[_Sequence]] = {}
    for sequence in sequences:
        groups.setdefault(sequence.group, []).append(sequence)
    order = list(groups)
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    count = min(minibatches, len(order))
    if count == 0:
        return []
    size, extra = divmod(len(order), count)
    plan, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        plan.append([member for group in order[start:end] for member in groups[group]])
        start = end
    return plan


def _micro_batches(sequences: list[_Sequence], budget: int) -> list[list[_Sequence]]:
    """Consecutive runs whose padded size (rows x longest) stays within `budget` tokens."""
    runs = consecutive_runs(range(len(sequences)), [len(s.tokens) for s in sequences], budget)
    return [[sequences[i] for i in run] for run in runs]


def right_aligned(values: list[list[float]], longest: int, device: Any = "cpu") -> torch.Tensor:  # [B, C]
    """Per-token lists as a right-aligned `[B, C]` tensor (as `completion_logprobs` returns), zeros before each."""
    import torch

    out = torch.zeros(len(values), longest, device=device)
    for row, data in enumerate(values):
        out[row, longest - len(data) :] = torch.tensor(data, dtype=torch.float32, device=device)
    return out


def _plan(
    sequences: list[_Sequence], config: TrainConfig, epoch: int, context: UpdateContext
) -> list[tuple[list[list[_Sequence]], list[_Sequence]]]:
    """Epoch -> (this process's micro-batches, all members) per minibatch (same on every process).
    A sharded policy: every process gets as many micro-batches as the busiest, empty ones added."""
    rank, world = context.rank, context.world
    plan = []
    for members in plan_minibatches(sequences, config.minibatches, config.seed, epoch):
        mine = _micro_batches(members[rank::world], config.micro_batch_tokens)
        if context.sharded:
            busiest = max(len(_micro_batches(members[r::world], config.micro_batch_tokens)) for r in range(world))
            mine = mine + [[]] * (busiest - len(mine))
        plan.append((mine, members))
    return plan


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
        recover_directory(out)  # `--model P --out P` killed mid-commit: P is whole again before it is read
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


def is_saved(config: TrainConfig) -> bool:
    """Whether `config.out` already holds this update: a checkpoint trained on these rollouts
    (a loop killed after saving it resumes without training twice). A commit that the kill
    interrupted is finished first."""
    recover_directory(Path(config.out))
    manifest = read_directory_manifest(Path(config.out)) or {}
    recorded = manifest.get("inputs", {}).get("rollouts", {}).get("sha256")
    return recorded == sha256_of(config.rollouts)


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
    context = UpdateContext.of(config, batch, accelerator, tokenizer.pad_token_id, reference, sharded)
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
        checkpoint = Checkpoint(saved, weights, optimizer_state, scheduler.state_dict(), config.optimizer)
        result = save(stage, checkpoint, tokenizer, start_step + len(steps), manifest, tables)
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


def check_finite_parameters(policy: Any) -> None:
    """An update that overflowed is never saved over the policy it started from. Each process
    checks its own parameters (its shard, under FSDP) and every process learns the verdict."""
    import torch
    from accelerate.utils import gather_object

    with torch.no_grad():
        mine = next(
            (name for name, p in policy.named_parameters() if not torch.isfinite(getattr(p, "_local_tensor", p)).all()),
            None,
        )
    bad = next((name for name in gather_object([mine]) if name), None)
    if bad is not None:
        raise CfiwError(
            f"the update made parameter {bad} non-finite (inf or NaN): nothing was saved, the policy is unchanged",
            "lower --lr; the previous policy is kept",
        )


def optimize(
    policy: Any,
    reference: Any,
    optimizer: Any,
    scheduler: Any,
    sequences: list[_Sequence],
    config: TrainConfig,
    context: UpdateContext,
    start_step: int,
    steps_here: int,
) -> list[StepMetrics]:
    """Every optimizer step of the update: `epochs` passes, each dealt into minibatches of
    whole groups; the old log-probs come from the loaded policy, before the first step."""
    first_pass = _plan(sequences, config, 0, context)
    entropies: dict[str, list[float]] | None = {} if config.weighting == "entropy" else None
    old = old_logprobs(policy, reference, first_pass, context, entropies)
    if entropies is not None:  # every process weighs the whole batch with one threshold
        if context.world > 1:
            from accelerate.utils import gather_object

            entropies = {key: value for part in gather_object([entropies]) for key, value in part.items()}
        weigh_by_entropy(sequences, entropies, config.entropy_quantile)
    steps: list[StepMetrics] = []
    with progress_bar("train", total=steps_here, unit="steps") as advance:
        for epoch in range(config.epochs):
            plan = first_pass if epoch == 0 else _plan(sequences, config, epoch, context)
            for micro_batches, members in plan:
                step = start_step + len(steps) + 1
                steps.append(
                    train_step(policy, optimizer, scheduler, micro_batches, members, old, context, step, epoch)
                )
                advance(status=f"loss {steps[-1].loss:.4f}")
    return steps


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


ADAPTERS_OFF = "adapters-off"  # the reference of a LoRA update: the policy with its adapters disabled


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


def saved_optimizer(model: str) -> str | None:
    """The optimizer whose state a checkpoint holds (None: no state); checkpoints written
    before SGD existed hold AdamW's."""
    state = Path(model) / "trainer_state.json"
    if not (Path(model) / "optimizer.pt").exists() or not state.exists():
        return None
    hint = "train from a checkpoint cfiw train wrote, or one without optimizer.pt"
    return recorded_value(state, "optimizer", lambda name: name in OPTIMIZERS, hint, default="adamw")


def check_resumable(config: TrainConfig) -> None:
    """The optimizer state of `--model` is resumed: it must be the state of `--optimizer`."""
    saved = saved_optimizer(config.model)
    if saved is not None and saved != config.optimizer:
        raise CfiwError(
            f"{config.model} holds {saved} optimizer state, which --optimizer {config.optimizer} cannot resume",
            f"pass --optimizer {saved}, or start from a checkpoint without optimizer.pt",
        )


def build_optimizer(policy: Any, config: TrainConfig, steps_here: int, sharded: bool = False) -> tuple[Any, Any, int]:
    """AdamW or SGD and the schedule, resumed from the checkpoint's state when `--model` holds
    one (into each process's shard of a `sharded` policy); returns (optimizer, scheduler,
    optimizer steps taken before this call)."""
    import torch

    parameters = adapters.trainable_parameters(policy)  # all of them, or a LoRA policy's adapters
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    resume = Path(config.model)
    start_step = 0
    if (resume / "optimizer.pt").exists():
        saved = torch.load(resume / "optimizer.pt", map_location="cpu", weights_only=True)
        if sharded:
            sharding.load_optimizer_state(policy, optimizer, saved)
        else:
            optimizer.load_state_dict(saved)
        for group in optimizer.param_groups:
            group["lr"] = config.lr
            group["initial_lr"] = config.lr
        start_step = json.loads((resume / "trainer_state.json").read_text()).get("global_step", 0)
    total = config.total_steps or (start_step + steps_here)

    def schedule(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "cosine":
            progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    if start_step:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=start_step - 1)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler, start_step


@dataclass(frozen=True)
class UpdateContext:
    """What every step of one update shares."""

    accelerator: Any
    loss: LossConfig
    temperature: float  # T of softmax(logits / T): the rollouts' sampling temperature
    pad_id: int
    max_new_tokens: int  # the dr_grpo normalizer (1 when unused)
    grad_clip: float
    has_reference: bool
    autocast: Any  # the compute dtype under autocast (weights stay float32), or None for float32
    rank: int
    world: int
    sharded: bool  # FSDP: every process runs as many forward and backward passes as the others

    @classmethod
    def of(
        cls, config: TrainConfig, batch: Batch, accelerator: Any, pad_id: int, reference: Any, sharded: bool = False
    ) -> UpdateContext:
        return cls(
            accelerator=accelerator,
            loss=LossConfig(config.eps_low, config.eps_high, config.beta, config.loss_type),
            temperature=batch.sampling["temperature"],
            pad_id=pad_id,
            max_new_tokens=batch.sampling["max_new_tokens"] or 1,
            grad_clip=config.grad_clip,
            has_reference=reference is not None,
            autocast=compute_dtype(config, accelerator.device),
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            sharded=sharded,
        )


def compute_dtype(config: TrainConfig, device: Any) -> Any:
    """The dtype of the forward and backward passes under autocast (None: float32). The weights
    and the optimizer state stay float32; `auto` is bfloat16 on a bf16 GPU, float32 elsewhere."""
    import torch

    resolved = modeling.resolve_dtype(config.dtype, device)
    return None if resolved == torch.float32 else resolved


def old_logprobs(
    policy: Any, reference: Any, plan: list, context: UpdateContext, entropies: dict[str, list[float]] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:  # per rollout: [C_row] each
    """Per rollout: (log-probs `[C]` of the loaded policy, of the reference or None), computed
    with the micro-batches of the first pass so that its ratio is exactly 1. With `entropies`,
    each rollout's per-token entropies at T are put there too (this process's rollouts)."""
    import torch

    old: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    want_entropy = entropies is not None
    policy.eval()
    with torch.no_grad():
        for micro_batches, _ in plan:
            for batch in micro_batches:
                if not batch:  # a sharded policy: join the other processes' forward pass
                    _forward(policy, [_padding(context.pad_id)], context.pad_id, context.temperature, context.autocast)
                    continue
                logprobs, entropy = _forward(
                    policy, batch, context.pad_id, context.temperature, context.autocast, want_entropy
                )  # [B, C] each
                ref = None
                if reference == ADAPTERS_OFF:
                    adapted = context.accelerator.unwrap_model(policy)
                    with adapted.disable_adapter():
                        ref = _forward(adapted, batch, context.pad_id, context.temperature, context.autocast)[0]
                elif reference is not None:
                    ref = _forward(reference, batch, context.pad_id, context.temperature, context.autocast)[0]
                for row, s in enumerate(batch):
                    length = len(s.tokens) - s.prompt_length
                    mine = logprobs[row, logprobs.shape[1] - length :]  # [C_row]
                    old[s.rollout_id] = (mine, None if ref is None else ref[row, ref.shape[1] - length :])
                    if want_entropy:
                        entropies[s.rollout_id] = entropy[row, entropy.shape[1] - length :].tolist()
    policy.train()
    return old


SUMS = ("tokens", "pg_sum", "kl_sum", "clip_low_sum", "clip_high_sum", "ratio_sum", "entropy_sum", "loss")
SUMS += ("weight_sum", "weight_sq_sum", "rollout_diff_sum")


@dataclass
class StepMetrics:
    """One optimizer step: sums over its kept tokens (all processes), and what the row reports."""

    step: int
    epoch: int
    sequences: int
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUMS, 0.0))
    grad_norm: float = 0.0
    lr: float = 0.0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.sums["loss"]

    def row(self) -> dict[str, Any]:
        """One train_metrics row: per-token means over the step's kept tokens."""
        totals = self.sums
        tokens = max(totals["tokens"], 1.0)
        weight_mean = totals["weight_sum"] / tokens
        return {
            "step": self.step,
            "loss": totals["loss"],
            "pg_loss": totals["pg_sum"] / tokens,
            "kl": totals["kl_sum"] / tokens,
            "entropy": totals["entropy_sum"] / tokens,
            "clip_frac_low": totals["clip_low_sum"] / tokens,
            "clip_frac_high": totals["clip_high_sum"] / tokens,
            "grad_norm": self.grad_norm,
            "lr": self.lr,
            "tokens": int(totals["tokens"]),
            "seconds": self.seconds,
            "ratio_mean": totals["ratio_sum"] / tokens,
            "weight_mean": weight_mean,
            "weight_std": math.sqrt(max(totals["weight_sq_sum"] / tokens - weight_mean**2, 0.0)),
            "rollout_logprob_diff": totals["rollout_diff_sum"] / tokens,
            "epoch": self.epoch,
            "sequences": self.sequences,
        }


def train_step(
    policy: Any,
    optimizer: Any,
    scheduler: Any,
    micro_batches: list[list[_Sequence]],
    members: list[_Sequence],
    old: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    context: UpdateContext,
    step: int,
    epoch: int,
) -> StepMetrics:
    """One optimizer step on a minibatch (`members`, whole groups), accumulating gradients over
    this process's micro-batches. The normalizer counts the whole minibatch's tokens, so the
    sum of micro-batch losses is the minibatch loss, on any number of processes."""
    import torch

    started = time.perf_counter()
    accelerator, device = context.accelerator, context.accelerator.device
    metrics = StepMetrics(step, epoch, len(members))
    full_mask = right_aligned([s.mask for s in members], max(len(s.mask) for s in members))  # [N, C]
    normalizer = max(loss_normalizer(full_mask, context.loss.loss_type, context.max_new_tokens), 1.0)
    work = micro_batches or [[]]
    for index, batch in enumerate(work):
        last = index == len(work) - 1  # gradients are all-reduced once, after the last micro-batch
        with accelerator.no_sync(policy) if not last else contextlib.nullcontext():
            if not batch:  # no rollout for this process here: join the others' collectives with a zero loss
                logprobs, _ = _forward(
                    policy, [_padding(context.pad_id)], context.pad_id, context.temperature, context.autocast
                )
                accelerator.backward(logprobs.sum() * 0.0)
                continue
            _accumulate(policy, batch, old, normalizer, context, metrics.sums, device)
    # summed over the processes before the step: a non-finite loss on one stops them all, none waits
    metrics.sums = _sum_across(accelerator, metrics.sums)
    if not math.isfinite(metrics.sums["loss"]):
        raise CfiwError(
            f"the loss became {metrics.sums['loss']} at step {step}: nothing was saved, the policy is unchanged",
            "lower --lr (or check the rollouts' log-probs); the previous policy is kept",
        )
    if context.grad_clip <= 0:
        grad_norm = torch.tensor(0.0)
    elif context.sharded:  # the norm over every process's shard
        grad_norm = sharding.whole(torch.nn.utils.clip_grad_norm_(policy.parameters(), context.grad_clip))
    else:
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), context.grad_clip)
    metrics.lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics.grad_norm = float(grad_norm)
    metrics.seconds = time.perf_counter() - started
    return metrics


def _accumulate(
    policy: Any,
    batch: list[_Sequence],
    old: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    normalizer: float,
    context: UpdateContext,
    sums: dict[str, float],
    device: Any,
) -> None:
    """Forward and backward of one micro-batch; its loss is its share of the minibatch loss."""
    import torch

    logprobs, entropy = _forward(
        policy, batch, context.pad_id, context.temperature, context.autocast, want_entropy=True
    )  # [B, C] each
    longest = logprobs.shape[1]
    old_lp = _right_pad([old[s.rollout_id][0] for s in batch], longest)  # [B, C]
    ref = _right_pad([old[s.rollout_id][1] for s in batch], longest) if context.has_reference else None  # [B, C]
    mask = right_aligned([s.mask for s in batch], longest, device)  # [B, C]
    weights = right_aligned([s.weights for s in batch], longest, device)  # [B, C]
    sampled = right_aligned([s.rollout_logprobs for s in batch], longest, device)  # [B, C]
    advantages = torch.tensor([s.advantage for s in batch], device=device)  # [B]
    loss, metrics = policy_loss(logprobs, old_lp, advantages, mask, normalizer, weights, ref, context.loss)
    # DDP averages gradients over processes; the normalizer is already global.
    context.accelerator.backward(loss * context.world)
    for key, value in metrics.items():
        sums[key] += value
    sums["entropy_sum"] += float((entropy * mask).sum())
    sums["loss"] += float(loss.detach())
    sums["weight_sum"] += float((weights * mask).sum())
    sums["weight_sq_sum"] += float((weights * weights * mask).sum())
    sums["rollout_diff_sum"] += float(((old_lp - sampled).abs() * mask).sum())


@dataclass(frozen=True)
class Checkpoint:
    """What an update saves besides the tokenizer."""

    policy: Any
    weights: dict[str, Any] | None  # a full state dict gathered from a sharded policy, else None (the policy's own)
    optimizer: dict[str, Any]  # the optimizer's state_dict(), one process's layout
    scheduler: dict[str, Any]
    optimizer_name: str = "adamw"


def save(
    stage: StageRun,
    checkpoint: Checkpoint,
    tokenizer: Any,
    global_step: int,
    manifest: dict[str, Any],
    tables: dict[Path, pa.Table],
) -> StageResult:
    """The checkpoint (weights, tokenizer, optimizer and scheduler state) and each of `tables`,
    committed together: everything is written into the staged directory (tables that belong
    elsewhere are staged with it and moved out as the last step of the commit), so a kill at
    any moment leaves either the old policy or the whole update (see `staged_directory`)."""
    import torch

    def fill(staging: Path) -> None:
        if checkpoint.weights is not None:
            sharding.save(checkpoint.policy, checkpoint.weights, staging)
        else:
            adapters.save(checkpoint.policy, staging)
        tokenizer.save_pretrained(staging)
        torch.save(checkpoint.optimizer, staging / "optimizer.pt")
        torch.save(checkpoint.scheduler, staging / "scheduler.pt")
        state = {"global_step": global_step, "optimizer": checkpoint.optimizer_name}
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
        for path, table in tables.items():
            inside = path.parent.resolve() == stage.out.resolve()
            write_table(table, staging / path.name if inside else stage_file(staging, path), manifest)

    return stage.write_directory(fill, manifest, model=None if checkpoint.weights is not None else checkpoint.policy)


def _forward(
    model: Any, batch: list[_Sequence], pad_id: int, temperature: float, autocast: Any, want_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:  # [B, C], [B, C]
    """Log-probs and entropies `[B, C]` of a micro-batch's completion tokens at temperature T."""
    return completion_logprobs(
        model, [(s.tokens, s.prompt_length) for s in batch], pad_id, temperature, want_entropy, autocast
    )


def _padding(pad_id: int) -> _Sequence:
    """A one-token completion of weight 0: what a process without work of its own runs."""
    return _Sequence("", "", [pad_id] * 2, 1, 0.0, [0.0], [0.0], [0.0])


def _right_pad(rows: list[torch.Tensor], longest: int) -> torch.Tensor:  # [C_b] each -> [B, C]
    import torch

    return torch.stack([torch.nn.functional.pad(r, (longest - len(r), 0)) for r in rows])  # [B, C]


def _first_epoch_mean(rows: list[dict], key: str) -> float | None:
    """Token-weighted mean of a per-step metric over the first pass (each kept token once)."""
    first = [r for r in rows if r["epoch"] == 0]
    tokens = sum(r["tokens"] for r in first)
    return sum(r[key] * r["tokens"] for r in first) / tokens if tokens else None


def _sum_across(accelerator: Any, sums: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return sums
    from accelerate.utils import gather_object

    gathered = gather_object([sums])
    return {key: sum(part[key] for part in gathered) for key in sums}
