"""Chunked completion log-probs equal the naive full log-softmax at temperature T, values and gradients."""

import pytest
import torch

from cfiw_cli.logprobs import completion_logprobs


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


SEQUENCES = [  # (prompt + completion ids, prompt length): different prompt and completion lengths
    ([5, 17, 42, 9, 300, 301, 12, 77, 2], 4),
    ([8, 8, 100, 101, 102, 103, 104], 2),
    ([11, 400, 12], 1),
]


def naive(model, sequences, pad_id, temperature):
    """The full `[B, W, V]` logits and their log-softmax: what the chunked version must equal."""
    width = max(len(t) for t, _ in sequences)
    ids = torch.tensor([[pad_id] * (width - len(t)) + t for t, _ in sequences])
    attention = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t, _ in sequences])
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits / temperature  # [B, W, V]
    logp = logits.log_softmax(-1)
    longest = max(len(t) - p for t, p in sequences)
    out = torch.zeros(len(sequences), longest)
    entropy = torch.zeros(len(sequences), longest)
    for row, (tokens, prompt) in enumerate(sequences):
        offset = width - len(tokens)
        for j, token in enumerate(tokens[prompt:]):
            position = offset + prompt + j - 1  # the position that predicts completion token j
            column = longest - (len(tokens) - prompt) + j
            out[row, column] = logp[row, position, token]
            entropy[row, column] = -(logp[row, position].exp() * logp[row, position]).sum()
    return out, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_elements", [1 << 26, 1000])  # one chunk; several, under checkpointing
def test_values_entropies_and_gradients_equal_the_naive_way(model, temperature, chunk_elements):
    model.zero_grad()
    expected, expected_entropy = naive(model, SEQUENCES, 0, temperature)
    weights = torch.linspace(0.5, 2.0, expected.numel()).reshape(expected.shape)
    (expected * weights).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logprobs, entropy = completion_logprobs(
        model, SEQUENCES, 0, temperature, want_entropy=True, chunk_elements=chunk_elements
    )
    assert logprobs.shape == expected.shape == (3, 5)
    assert torch.allclose(logprobs, expected, atol=1e-5)
    assert torch.allclose(entropy, expected_entropy, atol=1e-5)
    assert logprobs[2, :3].abs().sum() == 0 and entropy[2, :3].abs().sum() == 0  # slots without a token
    (logprobs * weights).sum().backward()
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected_grads[name], atol=1e-5), name
    model.zero_grad()


def test_temperature_changes_the_distribution(model):
    with torch.no_grad():
        at_one, _ = completion_logprobs(model, SEQUENCES, 0, 1.0)
        at_low, _ = completion_logprobs(model, SEQUENCES, 0, 0.5)
    assert (at_one - at_low).abs().max() > 1e-3


def test_no_grad_pass_equals_the_grad_pass_bit_for_bit(model):
    # the old log-probs (no grad) and the first training forward must agree exactly: ratio == 1
    with torch.no_grad():
        old, _ = completion_logprobs(model, SEQUENCES, 0, 0.7, chunk_elements=1000)
    new, _ = completion_logprobs(model, SEQUENCES, 0, 0.7, want_entropy=True, chunk_elements=1000)
    assert torch.equal(old, new.detach())
