"""The sampling distribution recorded by rollouts is the one `generate` draws from."""

import pytest
import torch

from cfiw_cli.generation import Completion, _SamplingDistribution, cut_at_stop


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (0.6, 0.5), (1.3, 0.95)])
def test_matches_transformers_warpers(temperature, top_p):
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(4, 50) * 3  # [B, V]
    ours = _SamplingDistribution(temperature, top_p)(None, scores.clone())
    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    )
    reference = warpers(None, scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    finite = torch.isfinite(reference)
    assert torch.allclose(ours[finite], reference[finite], atol=1e-6)


def test_records_logprob_of_the_token_chosen_each_step():
    sampler = _SamplingDistribution(1.0, 1.0)
    step0 = torch.tensor([[0.0, 1.0, 2.0]])
    sampler(torch.tensor([[5]]), step0)
    sampler(torch.tensor([[5, 2]]), torch.zeros(1, 3))  # token 2 was chosen at step 0
    sampler.record(torch.tensor([1]))  # token 1 chosen at step 1
    recorded = torch.stack(sampler.chosen_logprobs, 1)[0]
    assert torch.allclose(recorded, torch.stack([step0.log_softmax(-1)[0, 2], torch.log(torch.tensor(1 / 3))]))


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 9, 7], [-1, -2, -3, -4], {9}) == Completion([5, 6, 9], [-1, -2, -3], "stop")
    assert cut_at_stop([5, 6], [-1, -2], {9}) == Completion([5, 6], [-1, -2], "length")
    assert cut_at_stop([9, 9], [-1, -2], {9}).ids == [9]
