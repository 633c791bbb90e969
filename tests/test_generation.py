"""The sampling distribution recorded by rollouts is the one `generate` draws from."""

import pytest
import torch

from cfiw_cli.generation import Completion, _SamplingDistribution, cut_at_stop, generate, sequence_seed


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


def test_gumbel_max_draws_from_the_softmax():
    """One step of 20,000 rows, each with its own stream: the argmax of scores + noise follows
    softmax(scores) = (0.665, 0.245, 0.090, 0) for scores (2, 1, 0, -inf)."""
    rows = 20_000
    scores = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]]).expand(rows, 4)  # [B, V]
    sampler = _SamplingDistribution(1.0, 1.0, seeds=range(rows))
    chosen = sampler(None, scores.clone()).argmax(-1)  # [B]: what greedy `generate` picks
    frequencies = torch.bincount(chosen, minlength=4) / rows
    expected = torch.tensor([2.0, 1.0, 0.0, float("-inf")]).softmax(-1)
    assert frequencies[3] == 0  # a token outside the support is never drawn
    assert torch.allclose(frequencies, expected, atol=0.015)  # the standard error is at most 0.0034
    # the log-probs recorded are those of the distribution itself, not of the noisy scores
    assert torch.allclose(sampler._last_logprobs[0], expected.log())


def test_sequence_seeds_are_stable_and_distinct():
    assert sequence_seed(3, "train-0", 1) == sequence_seed(3, "train-0", 1)
    seeds = {sequence_seed(seed, f"train-{q}", s) for seed in (0, 1) for q in range(20) for s in range(8)}
    assert len(seeds) == 2 * 20 * 8 and all(0 <= s < 2**63 for s in seeds)


def test_a_sequences_sample_does_not_depend_on_its_batch(tiny_model):
    """The same prompts and seeds, sampled one per call and then all in one batch in reverse
    order (other padding, other neighbours): the same tokens and log-probs."""
    from cfiw_cli.modeling import load_model, load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), "float32")
    prompts = [tokenizer(text)["input_ids"] for text in ("1 + 1 =", "Tom has 3 apples and", "7", "2 * 4 = 8; 8 -")]
    seeds = [sequence_seed(5, f"q-{i}", 0) for i in range(len(prompts))]
    options = dict(stop_ids=stop_token_ids(model, tokenizer), max_new_tokens=12, temperature=1.0, top_p=0.9)
    alone = [
        generate(model, tokenizer, [p], batch_size=1, seeds=[s], **options)[0]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    together = generate(model, tokenizer, prompts[::-1], batch_size=4, seeds=seeds[::-1], **options)[::-1]
    assert [c.ids for c in alone] == [c.ids for c in together]
    for one, batched in zip(alone, together, strict=True):
        assert torch.allclose(torch.tensor(one.logprobs), torch.tensor(batched.logprobs), atol=1e-5)
    other = generate(model, tokenizer, prompts, batch_size=4, seeds=[s + 1 for s in seeds], **options)
    assert [c.ids for c in other] != [c.ids for c in alone]  # the seed does decide the sample


def test_the_growing_cache_samples_what_the_default_cache_samples(tiny_model, monkeypatch):
    """Sampling with the in-place cache gives the tokens and log-probs of transformers' own
    concatenating cache, bit for bit, over more steps than its first allocation holds."""
    import cfiw_cli.generation as generation
    from cfiw_cli.kv_cache import SLACK
    from cfiw_cli.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), "float32")
    prompts = [tokenizer(text)["input_ids"] for text in ("1 + 1 =", "Tom has 3 apples and", "7", "2 * 4 = 8; 8 -")]
    seeds = [sequence_seed(3, f"q-{i}", 0) for i in range(len(prompts))]
    options = dict(stop_ids=[], max_new_tokens=SLACK + 40, temperature=1.0, top_p=1.0, batch_size=4, seeds=seeds)
    grown = generate(model, tokenizer, prompts, **options)
    monkeypatch.setattr(generation, "growing_cache", lambda: None)
    default = generate(model, tokenizer, prompts, **options)
    assert [c.ids for c in grown] == [c.ids for c in default]
    assert [c.logprobs for c in grown] == [c.logprobs for c in default]
    assert all(len(c.ids) == SLACK + 40 for c in grown)  # the buffers grew at least once


def test_a_growing_layer_holds_what_a_dynamic_layer_holds():
    """Updates, a batch selection and a crop leave the same keys and values as transformers'
    `DynamicLayer`, while the buffers are reallocated only when full."""
    from transformers.cache_utils import DynamicLayer

    from cfiw_cli.kv_cache import SLACK, growing_cache

    growing = growing_cache().layer_class_to_replicate
    mine, reference = growing(), DynamicLayer()
    torch.manual_seed(0)
    prefill = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)  # [B, H, T, D]
    for layer in (mine, reference):
        layer.update(*prefill)
    first_buffer = mine.buffers[0]
    assert first_buffer.shape[-2] == 5 + SLACK
    for _ in range(SLACK + 1):
        step = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        keys, values = mine.update(*step)
        expected_keys, expected_values = reference.update(*step)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert mine.buffers[0] is not first_buffer  # 5 + SLACK + 1 positions: it grew once
    keep = torch.tensor([2, 0])
    mine.batch_select_indices(keep)
    reference.batch_select_indices(keep)
    mine.crop(-3)
    reference.crop(-3)
    assert torch.equal(mine.keys, reference.keys) and torch.equal(mine.values, reference.values)
    assert mine.get_seq_length() == reference.get_seq_length() == 5 + SLACK + 1 - 3
