"""Non-finite values stopped where they arise, named, before they reach a checkpoint.

A NaN in a log-prob, a ratio, the loss or a gradient would otherwise travel on: a NaN gradient
turns every parameter it touches into NaN at the optimizer step, the next rollout samples from
NaN logits, and the run stops much later, far from its cause (on a GPU, often as a device-side
assert). The checks here run where the values are made and raise a `CfiwError` that names the
tensor, the step and the rollouts involved:

- `check_sampled`: after a rollout batch, every chosen token's log-prob (NaN logits give NaN
  log-probs, whatever token the argmax then took);
- `describe_loss`: when a micro-batch's loss is not finite, which of its inputs was first
  (log-probs, old log-probs, reference log-probs, ratio, weights) and in which rollouts;
- `check_gradients`: before every optimizer step, the gradients (a finite loss can still have
  a NaN gradient), naming the first parameter that holds one.

Each check is one reduction on the device and one host sync per batch or step; the time they
take is summed in `SECONDS` (benchmarks/train_bench.py reports it as a share of the step).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from cfiw_cli.errors import CfiwError

if TYPE_CHECKING:
    import torch

SECONDS = {"total": 0.0}  # time spent in the checks, for the benchmark
HINT = "lower --lr, or train in float32 (--dtype float32); the previous policy is kept"


def _shown(ids: list[str], limit: int = 4) -> str:
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def check_sampled(records: list[dict]) -> None:
    """Every sampled token's log-prob is finite; else name the first rollout and token."""
    started = time.perf_counter()
    try:
        for record in records:
            for position, value in enumerate(record["completion_logprobs"]):
                if not math.isfinite(value):
                    raise CfiwError(
                        f"non-finite log-prob ({value}) of token {position} of rollout {record['rollout_id']} while "
                        "sampling: the policy's logits held NaN or inf",
                        "sample in float32 (--dtype float32); if the policy came from training, its last "
                        "update went wrong: " + HINT,
                    )
    finally:
        SECONDS["total"] += time.perf_counter() - started


def describe_loss(
    tensors: dict[str, torch.Tensor | None],  # name -> [B, C]
    mask: torch.Tensor,  # [B, C]
    ids: list[str],
    step: int,
    loss: float,
) -> str:
    """Which input of a non-finite micro-batch loss was non-finite first, and in which rollouts."""
    import torch

    for name, tensor in tensors.items():
        if tensor is None:
            continue
        bad = ~torch.isfinite(tensor.detach()) & mask.bool()  # [B, C]
        rows = bad.any(1).nonzero().flatten().tolist()
        if rows:
            return f"non-finite {name} at step {step} in rollouts {_shown([ids[r] for r in rows])}"
    return f"the loss became {loss} at step {step} (rollouts {_shown(ids)}) from finite inputs"


def check_gradients(policy: Any, accelerator: Any, step: int, ids: list[str], sum_across: Any) -> None:
    """Every gradient is finite on every process before the optimizer step; else name the first
    parameter whose gradient is not."""
    import torch

    started = time.perf_counter()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    # one fused norm per gradient (as clip_grad_norm_ computes them): inf or NaN wherever a value is
    finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()) if grads else True
    bad = sum_across(accelerator, {"bad": 0.0 if finite else 1.0})["bad"]
    SECONDS["total"] += time.perf_counter() - started
    if not bad:
        return
    where = "on another process"
    if not finite:
        name, grad = next(
            (n, p.grad) for n, p in policy.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
        )
        kind = "NaN" if torch.isnan(grad).any() else "inf"
        where = f"in {name} ({int((~torch.isfinite(grad)).sum())} of {grad.numel()} values {kind})"
    raise CfiwError(
        f"a non-finite gradient {where} at step {step}, from rollouts {_shown(ids)}: the optimizer step was not "
        "taken, nothing was saved, the policy is unchanged",
        HINT,
    )
