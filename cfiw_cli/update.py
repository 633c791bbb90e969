"""The update engine: how one GRPO/DAPO update turns kept rollouts into optimizer steps.

`cfiw train` prepares the sequences (advantages, token weights, masks) and saves the result;
this module does what happens between: plan the minibatches (whole groups, seeded per
epoch) and their micro-batches (at most `micro_batch_tokens` padded tokens), recompute the
old log-probs with the first pass's micro-batches (so its ratio is exactly 1), then take one
optimizer step per minibatch, accumulating gradients over micro-batches. Loss normalizers
count the whole minibatch, so a step equals the single-process one on any number of
processes; a sharded (FSDP) policy runs as many passes on every process as the busiest.
`cfiw gradients` reuses the planning and the forward pass to measure gradients instead.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cfiw_cli import adapters, checkpoint, guard, modeling, sharding
from cfiw_cli.algo.loss import LOG_RATIO_LIMIT, LossConfig, loss_normalizer, policy_loss
from cfiw_cli.algo.weights import entropy_weights, quantile
from cfiw_cli.batching import consecutive_runs
from cfiw_cli.configs import TrainConfig
from cfiw_cli.console import progress_bar
from cfiw_cli.errors import CfiwError
from cfiw_cli.logprobs import completion_logprobs

if TYPE_CHECKING:
    import torch

ADAPTERS_OFF = "adapters-off"  # the reference of a LoRA update: the policy with its adapters disabled


@dataclass
class TrainSequence:
    """One kept rollout as the update sees it: tokens, advantage, and per-token weight and mask."""

    rollout_id: str
    group: str  # prompt_id: the GRPO group
    tokens: list[int]  # prompt + completion
    prompt_length: int
    advantage: float
    weights: list[float]  # one per completion token
    mask: list[float]  # 1 for completion tokens that count
    rollout_logprobs: list[float]  # what the sampler recorded, one per completion token
    ends_with_stop: bool = False  # its last token is the stop token (weighs 1 in every mode)


def weigh_by_entropy(sequences: list[TrainSequence], entropies: dict[str, list[float]], q: float) -> None:
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


def plan_minibatches(
    sequences: list[TrainSequence], minibatches: int, seed: int, epoch: int
) -> list[list[TrainSequence]]:
    """Whole GRPO groups, shuffled (seeded per epoch), dealt into min(minibatches, groups)
    minibatches whose group counts differ by at most one."""
    groups: dict[str, list[TrainSequence]] = {}
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


def micro_batches(sequences: list[TrainSequence], budget: int) -> list[list[TrainSequence]]:
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


def plan_epoch(
    sequences: list[TrainSequence], config: TrainConfig, epoch: int, context: UpdateContext
) -> list[tuple[list[list[TrainSequence]], list[TrainSequence]]]:
    """Epoch -> (this process's micro-batches, all members) per minibatch (same on every process).
    A sharded policy: every process gets as many micro-batches as the busiest, empty ones added."""
    rank, world = context.rank, context.world
    plan = []
    for members in plan_minibatches(sequences, config.minibatches, config.seed, epoch):
        mine = micro_batches(members[rank::world], config.micro_batch_tokens)
        if context.sharded:
            busiest = max(len(micro_batches(members[r::world], config.micro_batch_tokens)) for r in range(world))
            mine = mine + [[]] * (busiest - len(mine))
        plan.append((mine, members))
    return plan


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
    sequences: list[TrainSequence],
    config: TrainConfig,
    context: UpdateContext,
    start_step: int,
    steps_here: int,
) -> list[StepMetrics]:
    """Every optimizer step of the update: `epochs` passes, each dealt into minibatches of
    whole groups; the old log-probs come from the loaded policy, before the first step."""
    first_pass = plan_epoch(sequences, config, 0, context)
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
            plan = first_pass if epoch == 0 else plan_epoch(sequences, config, epoch, context)
            for micro_batches, members in plan:
                step = start_step + len(steps) + 1
                steps.append(
                    train_step(policy, optimizer, scheduler, micro_batches, members, old, context, step, epoch)
                )
                advance(status=f"loss {steps[-1].loss:.4f}")
    return steps


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
    saved, start_step = checkpoint.optimizer_state(config.model)
    if saved is not None:
        if sharded:
            sharding.load_optimizer_state(policy, optimizer, saved)
        else:
            optimizer.load_state_dict(saved)
        for group in optimizer.param_groups:
            group["lr"] = config.lr
            group["initial_lr"] = config.lr
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
        cls,
        config: TrainConfig,
        sampling: dict[str, Any],
        accelerator: Any,
        pad_id: int,
        reference: Any,
        sharded: bool = False,
    ) -> UpdateContext:
        """`sampling`: the rollouts' temperature and length limit (`sampling_settings`)."""
        return cls(
            accelerator=accelerator,
            loss=LossConfig(config.eps_low, config.eps_high, config.beta, config.loss_type),
            temperature=sampling["temperature"],
            pad_id=pad_id,
            max_new_tokens=sampling["max_new_tokens"] or 1,
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
                    forward(policy, [], context)
                    continue
                logprobs, entropy = forward(policy, batch, context, want_entropy)  # [B, C] each
                ref = None
                if reference == ADAPTERS_OFF:
                    adapted = context.accelerator.unwrap_model(policy)
                    with adapted.disable_adapter():
                        ref = forward(adapted, batch, context)[0]
                elif reference is not None:
                    ref = forward(reference, batch, context)[0]
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
    micro_batches: list[list[TrainSequence]],
    members: list[TrainSequence],
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
    work, problems = micro_batches or [[]], []
    for index, batch in enumerate(work):
        last = index == len(work) - 1  # gradients are all-reduced once, after the last micro-batch
        with accelerator.no_sync(policy) if not last else contextlib.nullcontext():
            if not batch:  # no rollout for this process here: join the others' collectives with a zero loss
                logprobs, _ = forward(policy, [], context)
                accelerator.backward(logprobs.sum() * 0.0)
                continue
            problem = _accumulate(policy, batch, old, normalizer, context, metrics.sums, device, step)
            problems += [problem] if problem else []
    # summed over the processes before the step: a non-finite loss on one stops them all, none waits
    metrics.sums = _sum_across(accelerator, metrics.sums)
    if not math.isfinite(metrics.sums["loss"]):
        found = problems[0] if problems else f"the loss became {metrics.sums['loss']} at step {step} on another process"
        raise CfiwError(f"{found}: nothing was saved, the policy is unchanged", guard.HINT)
    guard.check_gradients(policy, accelerator, step, [s.rollout_id for s in members], _sum_across)
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
    batch: list[TrainSequence],
    old: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    normalizer: float,
    context: UpdateContext,
    sums: dict[str, float],
    device: Any,
    step: int,
) -> str | None:
    """Forward and backward of one micro-batch; its loss is its share of the minibatch loss.
    A non-finite loss is not raised here (the other processes would wait for this one) but
    described (`guard.describe_loss`) for `train_step` to raise once every process knows."""
    import torch

    logprobs, entropy = forward(policy, batch, context, want_entropy=True)  # [B, C] each
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
    value = float(loss.detach())
    sums["loss"] += value
    problem = None
    if not math.isfinite(value):
        inputs = {"log-probs": logprobs, "old log-probs": old_lp, "reference log-probs": ref}
        log_ratio = torch.clamp(logprobs.detach() - old_lp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)  # as the loss has it
        inputs |= {"ratio": torch.exp(log_ratio), "weights": weights}
        problem = guard.describe_loss(inputs, mask, [s.rollout_id for s in batch], step, value)
    sums["weight_sum"] += float((weights * mask).sum())
    sums["weight_sq_sum"] += float((weights * weights * mask).sum())
    sums["rollout_diff_sum"] += float(((old_lp - sampled).abs() * mask).sum())
    return problem


def forward(
    model: Any, batch: list[TrainSequence], context: UpdateContext, want_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:  # [B, C], [B, C]
    """Log-probs and entropies `[B, C]` of a micro-batch's completion tokens at the update's
    temperature, padding and compute dtype. An empty batch is a one-token stand-in of weight 0:
    what a process without work of its own runs to join the others' collectives."""
    batch = batch or [_padding(context.pad_id)]
    return completion_logprobs(
        model,
        [(s.tokens, s.prompt_length) for s in batch],
        context.pad_id,
        context.temperature,
        want_entropy,
        context.autocast,
    )


def _padding(pad_id: int) -> TrainSequence:
    """A one-token completion of weight 0: what a process without work of its own runs."""
    return TrainSequence("", "", [pad_id] * 2, 1, 0.0, [0.0], [0.0], [0.0])


def _right_pad(rows: list[torch.Tensor], longest: int) -> torch.Tensor:  # [C_b] each -> [B, C]
    import torch

    return torch.stack([torch.nn.functional.pad(r, (longest - len(r), 0)) for r in rows])  # [B, C]


def _sum_across(accelerator: Any, sums: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return sums
    from accelerate.utils import gather_object

    gathered = gather_object([sums])
    return {key: sum(part[key] for part in gathered) for key in sums}
