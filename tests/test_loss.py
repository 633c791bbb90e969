"""The clipped, weighted policy loss with hand-computed values, and TRL's aggregations."""

import math

import pytest
import torch

from cfiw_cli.algo.loss import LossConfig, group_advantages, loss_normalizer, policy_loss


def one_token(ratio, advantage, eps_high=0.28, weight=None):
    logprobs = torch.tensor([[math.log(ratio)]])
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1)
    weights = None if weight is None else torch.tensor([[weight]])
    loss, metrics = policy_loss(
        logprobs, old, torch.tensor([advantage]), mask, 1.0, weights, config=LossConfig(eps_high=eps_high)
    )
    return float(loss), metrics


@pytest.mark.parametrize(
    "ratio, advantage, expected",
    [
        (1.1, 1.0, -1.1),  # inside the clip range: -rho * A
        (1.5, 1.0, -1.28),  # above 1 + eps_high with A > 0: clipped to 1.28
        (1.5, -1.0, 1.5),  # above the range with A < 0: min picks the unclipped -1.5 -> loss 1.5
        (0.5, -1.0, 0.8),  # below 1 - eps_low with A < 0: clipped to 0.8 -> loss 0.8
        (0.5, 1.0, -0.5),  # below the range with A > 0: unclipped 0.5 is the min
        (1.0, 0.0, 0.0),  # no advantage, no loss
    ],
)
def test_clipped_surrogate_by_hand(ratio, advantage, expected):
    assert one_token(ratio, advantage)[0] == pytest.approx(expected, abs=1e-6)


def test_asymmetric_upper_clip():
    assert one_token(1.25, 1.0, eps_high=0.28)[0] == pytest.approx(-1.25)  # within 1.28
    assert one_token(1.25, 1.0, eps_high=0.2)[0] == pytest.approx(-1.2)  # clipped at 1.2


def test_clip_fractions():
    assert one_token(1.5, 1.0)[1]["clip_high_sum"] == 1 and one_token(1.5, 1.0)[1]["clip_low_sum"] == 0
    assert one_token(0.5, -1.0)[1]["clip_low_sum"] == 1


def test_weights_scale_each_token_term():
    assert one_token(1.1, 1.0, weight=2.0)[0] == pytest.approx(-2.2)
    assert one_token(1.1, 1.0, weight=0.0)[0] == 0.0


def test_kl_term_k3():
    # ref - logp = d: k3 = e^d - d - 1; with d = 0.5 and beta 0.1, rho = 1, A = 0: loss = 0.1 * (e^.5 - 1.5)
    logprobs, ref = torch.tensor([[0.0]]), torch.tensor([[0.5]])
    loss, metrics = policy_loss(
        logprobs, logprobs, torch.tensor([0.0]), torch.ones(1, 1), 1.0, ref_logprobs=ref, config=LossConfig(beta=0.1)
    )
    assert float(loss) == pytest.approx(0.1 * (math.exp(0.5) - 1.5))
    assert metrics["kl_sum"] == pytest.approx(math.exp(0.5) - 1.5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_aggregations_equal_trl_formulas(loss_type):
    torch.manual_seed(0)
    batch, length, max_new = 4, 7, 10
    logprobs = torch.randn(batch, length) * 0.1 - 2
    old = logprobs + torch.randn(batch, length) * 0.2
    advantages = torch.randn(batch)
    mask = (torch.rand(batch, length) > 0.3).float()
    mask[:, 0] = 1
    # TRL's GRPOTrainer: per_token_loss = -min(coef_1 * A, coef_2 * A), then
    ratio = torch.exp(logprobs - old)
    per_token = -torch.min(ratio * advantages[:, None], torch.clamp(ratio, 0.8, 1.28) * advantages[:, None])
    trl = {
        "dapo": (per_token * mask).sum() / mask.sum(),  # normalized by active tokens in the batch
        "grpo": ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean(),  # sequence mean, then mean
        "dr_grpo": (per_token * mask).sum() / (batch * max_new),  # global constant
    }[loss_type]
    ours, _ = policy_loss(
        logprobs,
        old,
        advantages,
        mask,
        loss_normalizer(mask, loss_type, max_new),
        torch.ones(batch, length),
        config=LossConfig(loss_type=loss_type),
    )
    assert float(ours) == pytest.approx(float(trl), abs=1e-6)


def test_split_micro_batches_sum_to_the_full_batch_loss():
    torch.manual_seed(1)
    logprobs, old = torch.randn(6, 5), torch.randn(6, 5)
    advantages, mask = torch.randn(6), torch.ones(6, 5)
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        norm = loss_normalizer(mask, loss_type, 8)
        config = LossConfig(loss_type=loss_type)
        full, _ = policy_loss(logprobs, old, advantages, mask, norm, config=config)
        parts = sum(
            float(
                policy_loss(
                    logprobs[i : i + 2], old[i : i + 2], advantages[i : i + 2], mask[i : i + 2], norm, config=config
                )[0]
            )
            for i in range(0, 6, 2)
        )
        assert parts == pytest.approx(float(full), abs=1e-6)


def test_group_advantages_by_hand():
    # group a: rewards 1, 0 -> mean .5, unbiased std .7071 -> +-0.5/0.7072
    advantages = group_advantages([1.0, 0.0, 0.0, 0.0], ["a", "a", "b", "b"])
    assert advantages[0] == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4))
    assert advantages[1] == pytest.approx(-advantages[0])
    assert advantages[2:] == [0.0, 0.0]  # equal rewards: no advantage
    assert group_advantages([1.0, 0.0], ["a", "a"], "none") == [0.5, -0.5]
    batch = group_advantages([1.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"], "batch")
    assert batch[0] == pytest.approx(0.5 / (0.5 + 1e-4))  # batch std of [1, 0, 1, 1] is 0.5
