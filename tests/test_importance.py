"""Fast span importance equals one naive forward pass per masked variant (fp32, < 1e-4)."""

import random

import pytest
import torch

from cfiw_cli.algo.importance import MASK_MODES, ScoringItem, naive_scores, score_items, variant_suffix

TOLERANCE = 1e-4


def make_items(vocab: int) -> list[ScoringItem]:
    rng = random.Random(0)

    def tokens(n):
        return [rng.randrange(4, vocab) for _ in range(n)]

    prompt = tokens(12)
    return [
        # span at the very start of the completion and one right before the answer
        ScoringItem(prompt + tokens(30), 38, [(12, 16), (20, 27), (30, 38)], prompt_length=12),
        # same prompt (shared prompt forward), one span only, a one-token answer right after it
        ScoringItem(prompt + tokens(9), 20, [(12, 20)], prompt_length=12),
        # a long rollout packed with short ones, no prompt sharing information
        ScoringItem(tokens(150) + tokens(60), 205, [(s, s + 9) for s in range(150, 200, 10)]),
        # a span starting at token 1 (a one-token prompt)
        ScoringItem(tokens(1) + tokens(10), 8, [(1, 3), (3, 8)], prompt_length=1),
        ScoringItem(tokens(5) + tokens(4), 8, [(5, 8)], prompt_length=5),
    ]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request, tiny_model, tiny_llama):
    from transformers import AutoModelForCausalLM

    path = tiny_model if request.param == "qwen2" else tiny_llama
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("batch_tokens", [48, 100_000])  # many small calls / everything in one call
def test_every_delta_equals_the_naive_forward(model, mode, batch_tokens):
    items = make_items(model.config.vocab_size)
    fast = score_items(model, items, mode, pad_id=3, batch_tokens=batch_tokens, cache_tokens=batch_tokens * 4)
    for item, result in zip(items, fast, strict=True):
        reference = naive_scores(model, item, mode, pad_id=3)
        assert abs(result.base - reference.base) < TOLERANCE
        assert len(result.masked) == len(item.spans)
        for got, want in zip(result.deltas, reference.deltas, strict=True):
            assert abs(got - want) < TOLERANCE, (mode, item.spans, got, want)
    # masking changes something: not every delta is zero
    assert any(abs(d) > 1e-3 for result in fast for d in result.deltas)


def test_the_three_modes_differ(model):
    items = make_items(model.config.vocab_size)[:1]
    deltas = {mode: score_items(model, items, mode, pad_id=3)[0].deltas for mode in MASK_MODES}
    assert deltas["pad"] != deltas["delete"] != deltas["knockout"]


def test_suffixes_run_only_what_follows_the_span():
    item = ScoringItem(list(range(10, 30)), 17, [(5, 8), (12, 17)], prompt_length=5)
    # knockout: positions from the span end, nothing before it
    v = variant_suffix(item, 0, 0, "knockout", pad_id=0)
    assert v.past == 5 and v.positions == list(range(8, 19)) and v.tokens == item.tokens[8:19]
    # delete: the token before the span, then the rest renumbered
    v = variant_suffix(item, 0, 0, "delete", pad_id=0)
    assert v.past == 4 and v.tokens == [item.tokens[4]] + item.tokens[8:19] and v.positions == list(range(4, 16))
    # pad: pad tokens in place of the span, positions unchanged
    v = variant_suffix(item, 0, 1, "pad", pad_id=0)
    assert v.past == 12 and v.tokens == [0] * 5 + item.tokens[17:19] and v.positions == list(range(12, 19))
    # knockout of a span that ends at the answer: the first answer token keeps its base log-prob
    v = variant_suffix(item, 0, 1, "knockout", pad_id=0)
    assert v.base_first and v.targets == item.tokens[18:]


def test_identical_items_are_scored_once(model):
    items = make_items(model.config.vocab_size)
    # a group whose samples wrote the same completion: the copies cost nothing and get the same numbers
    doubled = [items[0], items[1], items[0], items[2], items[0], items[1]]
    once, twice = {}, {}
    alone = score_items(model, items[:3], "pad", pad_id=3, stats=once)
    advanced = []
    together = score_items(model, doubled, "pad", pad_id=3, stats=twice, on_items=advanced.append)
    assert twice == once  # the same tokens and forward calls as the three distinct items
    assert sum(advanced) == len(doubled)  # progress still counts every item
    for got, want in zip(together, [alone[0], alone[1], alone[0], alone[2], alone[0], alone[1]], strict=True):
        assert got == want
    # items that differ in their spans only are not merged
    split = ScoringItem(items[0].tokens, items[0].target_start, items[0].spans[:1], items[0].prompt_length)
    merged = score_items(model, [items[0], split], "pad", pad_id=3)
    assert len(merged[1].masked) == 1 and merged[1].masked == pytest.approx(alone[0].masked[:1], abs=TOLERANCE)
