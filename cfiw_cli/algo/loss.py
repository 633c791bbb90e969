"""The clipped policy-gradient surrogate with per-token weights (DAPO defaults).

For completion token t of a sequence with advantage A:

    rho_t = exp(logp_t - logp_old_t)
    L_t   = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3 estimator, only if beta > 0)

Each L_t is multiplied by its weight w_t (all ones reproduce plain DAPO/GRPO) and by the
completion mask (truncated completions and padding are 0), then aggregated:

- `dapo`:    sum over all tokens of the batch / number of tokens;
- `grpo`:    per-sequence mean over its tokens, then mean over sequences;
- `dr_grpo`: sum over all tokens / (sequences * max_new_tokens).

All log-probs are of softmax(logits / T) at the rollouts' sampling temperature T (the
caller computes them; `cfiw_cli.logprobs`), as in TRL and verl; top-p is not applied.

Differences from the papers: the normalizer is passed in (`loss_normalizer`), computed over
the whole optimizer step (every micro-batch and process), so gradient accumulation and
data-parallel training give the gradient of the full-batch loss, as TRL does for `dapo`.
For `grpo` the per-sequence mean divides by the sequence's own token count; for `dr_grpo`
`max_new_tokens` is the rollouts' sampling limit (not the longest completion). The weight
multiplies the KL term too, as in the authors' trainer. The log-ratio is clamped to [-20, 20]
before `exp`, as verl does: beyond 88 `exp` overflows to inf, and although the loss stays
finite where the clipped branch wins, its backward pass multiplies that branch's zero gradient
by the infinite ratio and returns NaN; within [-20, 20] nothing changes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
LOG_RATIO_LIMIT = 20.0  # |logp - logp_old| beyond this is clamped before exp (see the module docstring)
REWARD_SCALINGS = ("group", "batch", "none")


@dataclass(frozen=True)
class LossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0
    loss_type: str = "dapo"


def loss_normalizer(mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> float:  # mask [B, T]
    """What the summed per-token terms of a batch are divided by (see the module docstring)."""
    if loss_type == "dapo":
        return float(mask.sum())
    if loss_type == "grpo":
        return float(mask.shape[0])
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * max_new_tokens)
    raise ValueError(f"unknown loss type {loss_type!r}")


def policy_loss(
    logprobs: torch.Tensor,  # [B, T] log-probs of the taken tokens under the current policy
    old_logprobs: torch.Tensor,  # [B, T] under the policy that is being improved (recomputed before step 1)
    advantages: torch.Tensor,  # [B]
    mask: torch.Tensor,  # [B, T] 1 for completion tokens that count
    normalizer: float,
    weights: torch.Tensor | None = None,  # [B, T] per-token weights (None: all ones)
    ref_logprobs: torch.Tensor | None = None,  # [B, T] reference policy, needed when beta > 0
    config: LossConfig = LossConfig(),
) -> tuple[torch.Tensor, dict[str, float]]:  # a scalar loss, and detached sums
    """(loss, metrics) for one micro-batch; metrics are detached sums over its masked tokens."""
    import torch

    mask = mask.to(logprobs.dtype)
    log_ratio = torch.clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    advantage = advantages[:, None]  # [B, 1]
    unclipped = ratio * advantage  # [B, T]
    clipped = torch.clamp(ratio, 1 - config.eps_low, 1 + config.eps_high) * advantage  # [B, T]
    pg = -torch.min(unclipped, clipped)  # [B, T]
    kl = torch.zeros_like(pg)
    if config.beta > 0:
        log_ratio = ref_logprobs - logprobs  # [B, T]
        kl = torch.exp(log_ratio) - log_ratio - 1  # [B, T]
    per_token = pg + config.beta * kl  # [B, T]
    if weights is not None:
        per_token = per_token * weights
    masked = per_token * mask  # [B, T]
    if config.loss_type == "grpo":
        lengths = mask.sum(1).clamp(min=1)  # [B]
        loss = (masked.sum(1) / lengths).sum() / normalizer
    else:
        loss = masked.sum() / normalizer
    with torch.no_grad():
        low = ((ratio < 1 - config.eps_low) & (advantage < 0)).to(mask.dtype) * mask
        high = ((ratio > 1 + config.eps_high) & (advantage > 0)).to(mask.dtype) * mask
        metrics = {
            "tokens": float(mask.sum()),
            "pg_sum": float((pg * mask).sum()),
            "kl_sum": float((kl * mask).sum()),
            "clip_low_sum": float(low.sum()),
            "clip_high_sum": float(high.sum()),
            "ratio_sum": float((ratio * mask).sum()),
        }
    return loss, metrics


def equal_reward_groups(rewards: list[float], groups: list[str]) -> set[str]:
    """The groups whose rewards are all equal: their advantages are 0, and dynamic sampling
    drops them."""
    seen: dict[str, set[float]] = {}
    for reward, group in zip(rewards, groups, strict=True):
        seen.setdefault(group, set()).add(reward)
    return {group for group, values in seen.items() if len(values) == 1}


def group_advantages(rewards: list[float], groups: list[str], scale: str = "group") -> list[float]:
    """A = (r - mean of its group) / (std + 1e-4); std of the group (`group`), of the whole batch
    (`batch`), or no scaling (`none`). Standard deviations are unbiased, as in TRL and verl."""

    if scale not in REWARD_SCALINGS:
        raise ValueError(f"unknown reward scaling {scale!r}")
    members: dict[str, list[float]] = {}
    for reward, group in zip(rewards, groups, strict=True):
        members.setdefault(group, []).append(reward)
    means = {g: statistics.fmean(v) for g, v in members.items()}
    stds = {g: statistics.stdev(v) if len(v) > 1 else 0.0 for g, v in members.items()}
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    out = []
    for reward, group in zip(rewards, groups, strict=True):
        centered = reward - means[group]
        if scale == "group":
            out.append(centered / (stds[group] + 1e-4))
        elif scale == "batch":
            out.append(centered / (batch_std + 1e-4))
        else:
            out.append(centered)
    return out
