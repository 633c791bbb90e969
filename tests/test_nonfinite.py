"""Where a NaN can arise in bf16 training, and the guard that stops it where it arises.

The candidates, each reproduced on the CPU:
- a large log-ratio: exp overflows; the loss stays finite, its gradient is NaN (fixed: the
  log-ratio is clamped, as verl does);
- NaN from fully masked query rows (a reduced-precision attention kernel may return NaN for a
  left-padded row's padding): simulated by a hook, it spreads into the row's real tokens through
  attention (0 x NaN), so the guard names it in sampling and in training;
- -inf logits meeting the Gumbel draw, and a zero-length completion in a batch: both already
  stay finite (the tests pin that).
And a NaN gradient behind a finite loss stops before the optimizer step, naming the parameter.
"""

import math

import pyarrow.parquet as pq
import pytest
import torch

from cfiw_cli import modeling


def test_a_large_log_ratio_keeps_the_gradient_finite():
    from cfiw_cli.algo.loss import policy_loss

    # log-ratio 100 on token 0: exp(100) overflows float32. With A > 0 the clipped branch wins,
    # so the loss is finite, -(1.28 + 1) / 2 = -1.14; unclamped, its backward returned NaN for
    # token 0 (0 from the min times the infinite ratio). Clamped, token 0's gradient is 0 (the
    # clipped branch does not move) and token 1's is -A / 2 = -0.5.
    logprobs = torch.tensor([[0.0, -1.0]], requires_grad=True)  # [1, 2]
    old = torch.tensor([[-100.0, -1.0]])  # [1, 2]
    loss, _ = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), 2.0)
    loss.backward()
    assert math.isclose(float(loss), -1.14, abs_tol=1e-6)
    assert logprobs.grad.tolist() == [[0.0, -0.5]]
    # with A < 0 the unclipped branch wins: the loss is e^20 x 1 / 2, large but finite, not inf
    logprobs.grad = None
    loss, _ = policy_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 2), 2.0)
    loss.backward()
    assert math.isfinite(float(loss)) and torch.isfinite(logprobs.grad).all()


def test_minus_infinity_logits_meet_the_gumbel_draw(monkeypatch):
    from cfiw_cli.generation import _SamplingDistribution

    scores = torch.tensor([[2.0, float("-inf"), 1.0, float("-inf")], [0.0, 0.5, float("-inf"), 3.0]])  # [2, 4]
    for extreme in (0.0, 1.0):  # the uniform draw at both ends: -log(-log(u)) would be -inf or inf
        monkeypatch.setattr(torch, "rand", lambda n, generator=None, device=None, v=extreme: torch.full((n,), v))
        processor = _SamplingDistribution(temperature=0.7, top_p=0.9, seeds=[1, 2])
        noisy = processor(torch.zeros(2, 1, dtype=torch.long), scores.clone())  # [2, 4]
        assert not torch.isnan(noisy).any()
        assert torch.isneginf(noisy[scores.isneginf()]).all()  # an excluded token stays excluded
        chosen = noisy.argmax(-1)  # [2]
        assert not scores.gather(1, chosen[:, None]).isneginf().any()
        processor.record(chosen)
        assert torch.isfinite(processor.chosen_logprobs[0]).all()


def test_a_zero_length_completion_keeps_the_batch_finite(tiny_model):
    from cfiw_cli.algo.loss import LossConfig, policy_loss
    from cfiw_cli.logprobs import completion_logprobs

    model = modeling.load_model(str(tiny_model), "float32")
    pad = modeling.load_tokenizer(str(tiny_model)).pad_token_id
    sequences = [([5, 6, 7], 3), ([5, 6, 7, 8, 9], 3), ([4, 5], 2)]  # rows 0 and 2 have no completion token
    mask = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        logprobs, entropy = completion_logprobs(model, sequences, pad, want_entropy=True)  # [3, 2]
        assert logprobs.shape == (3, 2) and torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
        config = LossConfig(loss_type=loss_type)
        loss, _ = policy_loss(logprobs, logprobs.detach(), torch.tensor([1.0, -1.0, 0.5]), mask, 2.0, config=config)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        assert math.isfinite(float(loss)) and all(g is None or torch.isfinite(g).all() for g in grads)


def nan_in_padding(model):
    """What a reduced-precision attention kernel may return for fully masked query rows: NaN in
    the first layer's output wherever the attention mask is 0 (left padding)."""
    masks = {}

    def remember(module, args, kwargs):
        masks["attention"] = kwargs.get("attention_mask")

    def poison(module, args, output):
        attention = masks.get("attention")
        if attention is not None and attention.dim() == 2 and (attention == 0).any():
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] == attention.shape[1]:  # the prompt's pass (decode steps hold one column)
                hidden[attention == 0] = float("nan")
        return output

    model.model.register_forward_pre_hook(remember, with_kwargs=True)
    model.model.layers[0].register_forward_hook(poison)
    return model


def test_nan_in_padding_spreads_into_the_real_tokens():
    """Why it matters: the pad rows' NaN reaches the same row's real tokens through attention."""
    from cfiw_cli.logprobs import completion_logprobs

    torch.manual_seed(0)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = nan_in_padding(Qwen2ForCausalLM(config).eval())
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, [([5, 6, 7, 8, 9], 3), ([3, 4, 5, 6, 7, 8, 9, 10], 5)], 0)
    assert torch.isnan(logprobs[0, 1:]).all()  # row 0 was padded: its completion is NaN
    assert torch.isfinite(logprobs[1]).all()  # row 1 was not


@pytest.fixture
def rollouts(tiny_model, mini_dataset, cli, tmp_path):
    out = tmp_path / "rollouts.parquet"
    done = cli("rollout", "--model", tiny_model, "--dataset", mini_dataset, "--limit", "4", "--group-size", "2",
               "--max-new-tokens", "12", "--temperature", "1.0", "--out", out)  # fmt: skip
    assert done.exit_code == 0, done.stderr
    return out


def poisoned_loading(monkeypatch, poison):
    load = modeling.load_model

    def loading(*args, **kwargs):
        return poison(load(*args, **kwargs))

    monkeypatch.setattr(modeling, "load_model", loading)


@pytest.mark.slow
def test_nan_while_sampling_is_named_and_nothing_is_written(tiny_model, mini_dataset, cli, tmp_path, monkeypatch):
    poisoned_loading(monkeypatch, nan_in_padding)
    out = tmp_path / "rollouts.parquet"
    done = cli("rollout", "--model", tiny_model, "--dataset", mini_dataset, "--limit", "4", "--group-size", "2",
               "--max-new-tokens", "12", "--temperature", "1.0", "--out", out)  # fmt: skip
    assert done.exit_code == 1 and "Traceback" not in done.stderr
    assert "non-finite log-prob" in done.stderr and "of rollout 0:" in done.stderr and "while sampling" in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_nan_while_training_is_named_and_the_policy_is_unchanged(tiny_model, rollouts, cli, tmp_path, monkeypatch):
    poisoned_loading(monkeypatch, nan_in_padding)
    out = tmp_path / "policy"
    done = cli("train", "--model", tiny_model, "--rollouts", rollouts, "--weighting", "uniform",
               "--no-dynamic-sampling", "--no-mask-truncated", "--out", out)  # fmt: skip
    assert done.exit_code == 1 and "Traceback" not in done.stderr
    assert "non-finite log-probs at step 1 in rollouts 0:" in done.stderr and "policy is unchanged" in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_nan_gradient_behind_a_finite_loss_stops_before_the_step(tiny_model, rollouts, cli, tmp_path, monkeypatch):
    def nan_gradient(model):
        weight = model.model.layers[1].mlp.up_proj.weight
        weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return model

    poisoned_loading(monkeypatch, nan_gradient)
    out = tmp_path / "policy"
    done = cli("train", "--model", tiny_model, "--rollouts", rollouts, "--weighting", "uniform",
               "--no-dynamic-sampling", "--no-mask-truncated", "--out", out)  # fmt: skip
    assert done.exit_code == 1 and "Traceback" not in done.stderr
    assert "non-finite gradient in model.layers.1.mlp.up_proj.weight" in done.stderr
    assert "at step 1, from rollouts 0:" in done.stderr and "optimizer step was not taken" in done.stderr
    assert not out.exists()
    written = pq.read_table(rollouts)  # the input is untouched
    assert written.num_rows == 8
