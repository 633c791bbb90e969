"""Token weights in every mode, with hand-computed values."""

import random

import pytest

from cfiw_cli.algo.weights import ScoredSpan, WeightConfig, token_weights

# 8 completion tokens: reasoning [0, 5), answer [5, 7), EOS at 7.
# span A = [0, 2) with delta 1.0, span B = [2, 4) with delta 0.2, token 4 in no span.
SPANS = [ScoredSpan("calculation", 0, 2, 1.0), ScoredSpan("scaffolding", 2, 4, 0.2), ScoredSpan("answer", 5, 7)]
RAW = WeightConfig(conserve=False)


def approx(values):
    return pytest.approx(values, abs=1e-9)


def test_cfiw_by_hand():
    # I = floor + delta/len: A: 0.2 + 1.0/2 = 0.7, B: 0.2 + 0.2/2 = 0.3, token 4: 0.2
    # Î = 0.5 + 0.5 (I - 0.2) / (0.7 - 0.2) = [1, 1, .6, .6, .5]
    # w = 0.5 + 1.5 Î = [2, 2, 1.4, 1.4, 1.25]; answer 1.5; EOS 1
    expected = [2.0, 2.0, 1.4, 1.4, 1.25, 1.5, 1.5, 1.0]
    assert token_weights(8, SPANS, "cfiw", RAW, ends_with_stop=True) == approx(expected)
    conserved = token_weights(8, SPANS, "cfiw", ends_with_stop=True)
    assert conserved == approx([w / (sum(expected) / 8) for w in expected])
    assert sum(conserved) / 8 == pytest.approx(1.0)


def test_inverted_by_hand():
    # Î' = (max Î + min Î) - Î = 1.5 - [1, 1, .6, .6, .5] = [.5, .5, .9, .9, 1]
    expected = [1.25, 1.25, 1.85, 1.85, 2.0, 1.5, 1.5, 1.0]
    assert token_weights(8, SPANS, "inverted", RAW, ends_with_stop=True) == approx(expected)
    cfiw = token_weights(8, SPANS, "cfiw", RAW, ends_with_stop=True)[:5]
    inverted = token_weights(8, SPANS, "inverted", RAW, ends_with_stop=True)[:5]
    order = sorted(range(5), key=lambda t: cfiw[t])
    assert sorted(range(5), key=lambda t: -inverted[t]) == order  # the order of span weights is reversed


def test_shuffled_permutes_the_span_deltas():
    # swapped deltas: A gets 0.2 -> I = .3, B gets 1.0 -> I = .7: Î = [.6, .6, 1, 1, .5]
    swapped = [1.4, 1.4, 2.0, 2.0, 1.25, 1.5, 1.5, 1.0]
    kept = token_weights(8, SPANS, "cfiw", RAW, ends_with_stop=True)
    seen = set()
    for seed in range(20):
        weights = token_weights(8, SPANS, "shuffled", RAW, ends_with_stop=True, rng=random.Random(seed))
        assert weights == approx(kept) or weights == approx(swapped)
        seen.add(tuple(round(w, 6) for w in weights))
    assert len(seen) == 2  # both placements occur
    # the multiset of span-level importances is kept
    assert sorted(kept[:4]) == approx(sorted(swapped[:4]))


def test_uniform_and_no_spans_are_all_ones():
    assert token_weights(8, SPANS, "uniform") == [1.0] * 8
    for mode in ("cfiw", "inverted", "shuffled"):
        assert token_weights(6, [], mode) == [1.0] * 6
        assert token_weights(6, [ScoredSpan("numeric", 0, 2, 0.5)], mode) == [1.0] * 6  # no answer span


def test_flat_importance_gives_boost_everywhere_in_reasoning():
    spans = [ScoredSpan("numeric", 0, 5, 0.0), ScoredSpan("answer", 5, 7)]
    assert token_weights(7, spans, "cfiw", RAW) == approx([2.0] * 5 + [1.5, 1.5])


def test_every_constant_is_a_parameter():
    config = WeightConfig(floor=0.0, boost=3.0, min_weight=1.0, answer_weight=2.0, conserve=False)
    # I = [.5, .5, .1, .1, 0] -> Î = 0.5 + 0.5 I / 0.5 = [1, 1, .6, .6, .5]; w = 1 + 2 Î
    assert token_weights(8, SPANS, "cfiw", config, ends_with_stop=True) == approx([3.0, 3.0, 2.2, 2.2, 2.0, 2.0, 2.0, 1.0])


def test_unknown_mode():
    with pytest.raises(ValueError):
        token_weights(3, [], "magic")
