"""Token weights in every mode and both profiles, with hand-computed values."""

import random

import pytest

from cfiw_cli.algo.weights import (
    SCORED_MODES,
    ScoredSpan,
    WeightConfig,
    entropy_weights,
    quantile,
    token_weights,
)

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


def test_conservation_leaves_eos_at_one_and_out_of_the_mean():
    # the seven tokens before EOS sum to 11.05, mean 1.578571...: each is divided by it
    conserved = token_weights(8, SPANS, "cfiw", ends_with_stop=True)
    assert conserved == approx([w / (11.05 / 7) for w in [2.0, 2.0, 1.4, 1.4, 1.25, 1.5, 1.5]] + [1.0])
    assert sum(conserved[:7]) / 7 == pytest.approx(1.0)
    for mode in ("uniform", *SCORED_MODES):  # the stop decision weighs the same in every mode
        assert token_weights(8, SPANS, mode, ends_with_stop=True, rng=random.Random(0))[7] == 1.0
    # without a stop token (a truncated completion) every token takes part in the mean
    truncated = token_weights(7, SPANS, "cfiw", ends_with_stop=False)
    assert truncated == approx([w / (11.05 / 7) for w in [2.0, 2.0, 1.4, 1.4, 1.25, 1.5, 1.5]])


def test_inverted_by_hand():
    # Î' = (max Î + min Î) - Î = 1.5 - [1, 1, .6, .6, .5] = [.5, .5, .9, .9, 1]
    expected = [1.25, 1.25, 1.85, 1.85, 2.0, 1.5, 1.5, 1.0]
    assert token_weights(8, SPANS, "inverted", RAW, ends_with_stop=True) == approx(expected)


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
    assert sorted(kept[:4]) == approx(sorted(swapped[:4]))  # the multiset of span-level importances is kept


def test_random_replaces_the_importances_with_seeded_uniform_draws():
    weights = token_weights(8, SPANS, "random", RAW, ends_with_stop=True, rng=random.Random(7))
    # I_t ~ U(0, 1) on the 5 reasoning tokens, min-max scaled to [0.5, 1]: the largest draw gets
    # the boost (2.0) and the smallest 0.5 + 1.5 * 0.5 = 1.25; answer and EOS as in cfiw.
    draws = _draws(7, 5)
    low, high = min(draws), max(draws)
    assert weights[:5] == approx([0.5 + 1.5 * (0.5 + 0.5 * (d - low) / (high - low)) for d in draws])
    assert max(weights[:5]) == pytest.approx(2.0) and min(weights[:5]) == pytest.approx(1.25)
    assert weights[5:] == approx([1.5, 1.5, 1.0])
    # the same seed gives the same weights, another seed others; the scores play no part
    assert token_weights(8, SPANS, "random", RAW, ends_with_stop=True, rng=random.Random(7)) == weights
    assert token_weights(8, SPANS, "random", RAW, ends_with_stop=True, rng=random.Random(8)) != weights
    other_deltas = [ScoredSpan("numeric", 0, 5, 9.0), SPANS[2]]
    assert token_weights(8, other_deltas, "random", RAW, ends_with_stop=True, rng=random.Random(7)) == weights


def _draws(seed, count):
    rng = random.Random(seed)
    return [rng.random() for _ in range(count)]


def test_uniform_and_unscored_rollouts_are_all_ones():
    assert token_weights(8, SPANS, "uniform") == [1.0] * 8
    answer_only = [ScoredSpan("answer", 5, 7)]
    unscored = [ScoredSpan("numeric", 0, 5, None), ScoredSpan("answer", 5, 7)]  # a span left out of scoring
    for mode in ("uniform", *SCORED_MODES):
        assert token_weights(6, [], mode) == [1.0] * 6
        assert token_weights(6, [ScoredSpan("numeric", 0, 2, 0.5)], mode) == [1.0] * 6  # no answer span
        # an answer but no scored reasoning span: exactly as uniform, not the boost
        assert token_weights(8, answer_only, mode, ends_with_stop=True) == [1.0] * 8
        assert token_weights(8, unscored, mode, ends_with_stop=True) == [1.0] * 8


def test_flat_importance_gives_the_middle_weight():
    # all deltas 0: I = 0.2 everywhere, spread 0 -> Î = 0.5 -> w = 0.5 + 1.5 * 0.5 = 1.25,
    # below the answer's 1.5 (not the boost 2.0)
    flat = [ScoredSpan("numeric", 0, 5, 0.0), ScoredSpan("answer", 5, 7)]
    assert token_weights(7, flat, "cfiw", RAW) == approx([1.25] * 5 + [1.5, 1.5])
    assert token_weights(7, flat, "inverted", RAW) == approx([1.25] * 5 + [1.5, 1.5])


def test_a_spread_below_min_spread_is_noise_not_signal():
    # span A's delta 2e-6 over 2 tokens: spread 1e-6 nats, below 1e-3 -> flat
    noise = [ScoredSpan("numeric", 0, 2, 2e-6), ScoredSpan("numeric", 2, 5, 0.0), ScoredSpan("answer", 5, 7)]
    assert token_weights(7, noise, "cfiw", RAW) == approx([1.25] * 5 + [1.5, 1.5])
    # a 7-nat spread is signal: A gets the boost, the rest the minimum Î = 0.5
    signal = [ScoredSpan("numeric", 0, 2, 14.0), ScoredSpan("numeric", 2, 5, 0.0), ScoredSpan("answer", 5, 7)]
    assert token_weights(7, signal, "cfiw", RAW) == approx([2.0, 2.0, 1.25, 1.25, 1.25, 1.5, 1.5])
    # min_spread is a parameter: at 0 the 1e-6 spread is scaled like the 7-nat one
    assert token_weights(7, noise, "cfiw", WeightConfig(conserve=False, min_spread=0.0)) == approx(
        [2.0, 2.0, 1.25, 1.25, 1.25, 1.5, 1.5]
    )


def test_every_constant_is_a_parameter():
    config = WeightConfig(floor=0.0, boost=3.0, min_weight=1.0, answer_weight=2.0, conserve=False)
    # I = [.5, .5, .1, .1, 0] -> Î = 0.5 + 0.5 I / 0.5 = [1, 1, .6, .6, .5]; w = 1 + 2 Î
    assert token_weights(8, SPANS, "cfiw", config, ends_with_stop=True) == approx(
        [3.0, 3.0, 2.2, 2.2, 2.0, 2.0, 2.0, 1.0]
    )


# The authors' trainer, worked by hand. Completion "3 = 3. ok #### 3<eos>" as 8 tokens:
TEXTS = ["3", " =", " 3", ".", " ok", " ####", " 3", "<eos>"]
# span A = "3 = 3" [0, 3), delta 0.6; span B = ". ok" [3, 5), delta 0; answer [5, 7); EOS at 7.
AUTHOR_SPANS = [ScoredSpan("calculation", 0, 3, 0.6), ScoredSpan("scaffolding", 3, 5, 0.0), ScoredSpan("answer", 5, 7)]
AUTHORS = WeightConfig(conserve=False, profile="authors")


def test_authors_profile_by_hand():
    # I: A = 0.2 + 0.6 = 0.8 (the full drop on each token), B = 0.2 -> Î = [1, 1, 1, .5, .5];
    # answer and EOS Î = 0.
    # " =" is a formatting token with Î > 0: Î = 0.1 -> w = 0.5 + 1.5 * 0.1 = 0.65.
    expected = [2.0, 0.65, 2.0, 1.25, 1.25, 1.5, 1.5, 1.0]
    assert token_weights(8, AUTHOR_SPANS, "cfiw", AUTHORS, ends_with_stop=True, token_texts=TEXTS) == approx(expected)
    # the cfiw profile has no formatting rule
    assert token_weights(8, AUTHOR_SPANS, "cfiw", RAW, ends_with_stop=True) == approx(
        [2.0, 2.0, 2.0, 1.25, 1.25, 1.5, 1.5, 1.0]
    )
    # conservation: the seven tokens before EOS sum to 10.15, mean 1.45
    conserved = token_weights(
        8, AUTHOR_SPANS, "cfiw", WeightConfig(profile="authors"), ends_with_stop=True, token_texts=TEXTS
    )
    assert conserved == approx([w / 1.45 for w in expected[:7]] + [1.0])


def test_authors_add_the_full_drop_to_every_token_of_a_span():
    # (a) Two spans with equal drops, of 3 and 1 tokens: tokens 0-2 in C = [0, 3) with delta
    # 0.3, token 3 in D = [3, 4) with delta 0.3, token 4 in none; answer [5, 7), EOS at 7.
    spans = [ScoredSpan("numeric", 0, 3, 0.3), ScoredSpan("numeric", 3, 4, 0.3), ScoredSpan("answer", 5, 7)]
    texts = ["a", "b", "c", "d", "e", " ####", " 3", "<eos>"]
    # authors: I = [.5, .5, .5, .5, .2] -> Î = [1, 1, 1, 1, .5] -> w = [2, 2, 2, 2, 1.25]
    assert token_weights(8, spans, "cfiw", AUTHORS, ends_with_stop=True, token_texts=texts) == approx(
        [2.0, 2.0, 2.0, 2.0, 1.25, 1.5, 1.5, 1.0]
    )
    # cfiw divides by length: I = [.3, .3, .3, .5, .2] -> Î = .5 + .5 (I - .2) / .3
    # = [2/3, 2/3, 2/3, 1, .5] -> w = .5 + 1.5 Î = [1.5, 1.5, 1.5, 2, 1.25]
    assert token_weights(8, spans, "cfiw", RAW, ends_with_stop=True) == approx(
        [1.5, 1.5, 1.5, 2.0, 1.25, 1.5, 1.5, 1.0]
    )


def test_the_formatting_rule_weighs_a_correct_minus_below_a_wrong_plus():
    # (d) "5 - 4" and "5 + 4" as the only span, each with Î = 1 on every token: the ` -`
    # operator is a formatting token (x0.1: w = 0.5 + 1.5 * 0.1 = 0.65), ` +` is not (w = 2).
    spans = [ScoredSpan("calculation", 0, 3, 1.0), ScoredSpan("answer", 4, 5)]
    for operator, weight in ((" -", 0.65), (" +", 2.0)):
        texts = ["5", operator, " 4", ".", " ####", "<eos>"]
        weights = token_weights(6, spans, "cfiw", AUTHORS, ends_with_stop=True, token_texts=texts)
        assert weights[1] == pytest.approx(weight)


def test_the_importance_floor_sets_the_range_of_the_mapping():
    # SPANS: I = [.7, .7, .3, .3, .2]; (I - min) / (max - min) = [1, 1, .2, .2, 0]
    # F = 0: Î = [1, 1, .2, .2, 0] -> w = .5 + 1.5 Î = [2, 2, .8, .8, .5]: [min_weight, boost]
    assert token_weights(8, SPANS, "cfiw", WeightConfig(conserve=False, importance_floor=0.0), True) == approx(
        [2.0, 2.0, 0.8, 0.8, 0.5, 1.5, 1.5, 1.0]
    )
    # F = 0.8: Î = .8 + .2 x = [1, 1, .84, .84, .8] -> w = [2, 2, 1.76, 1.76, 1.7]
    assert token_weights(8, SPANS, "cfiw", WeightConfig(conserve=False, importance_floor=0.8), True) == approx(
        [2.0, 2.0, 1.76, 1.76, 1.7, 1.5, 1.5, 1.0]
    )
    # F = 1 switches reweighting within the reasoning off: every reasoning token at the boost
    assert token_weights(8, SPANS, "cfiw", WeightConfig(conserve=False, importance_floor=1.0), True) == approx(
        [2.0] * 5 + [1.5, 1.5, 1.0]
    )
    # inverted at F = 0 flips within [0, 1]: Î' = 1 - Î = [0, 0, .8, .8, 1] -> [.5, .5, 1.7, 1.7, 2]
    inverted = WeightConfig(conserve=False, importance_floor=0.0)
    assert token_weights(8, SPANS, "inverted", inverted, True) == approx([0.5, 0.5, 1.7, 1.7, 2.0, 1.5, 1.5, 1.0])
    # flat importance sits at the floor: F = 0 gives every reasoning token min_weight
    flat = [ScoredSpan("numeric", 0, 5, 0.0), ScoredSpan("answer", 5, 7)]
    assert token_weights(7, flat, "cfiw", WeightConfig(conserve=False, importance_floor=0.0)) == approx(
        [0.5] * 5 + [1.5, 1.5]
    )
    # the authors' profile takes the dial too: Î = [1, 1, 1, 0, 0] -> " =" keeps 0.1 x 1
    authors = WeightConfig(conserve=False, profile="authors", importance_floor=0.0)
    assert token_weights(8, AUTHOR_SPANS, "cfiw", authors, True, token_texts=TEXTS) == approx(
        [2.0, 0.65, 2.0, 0.5, 0.5, 1.5, 1.5, 1.0]
    )


def test_oracle_weights_by_hand():
    # reasoning tokens 0-4: 0, 1 and 4 lie on lines that feed the answer, 2 and 3 do not.
    relevant = [True, True, False, False, True]
    # w = [2, 2, .5, .5, 2] (boost / min_weight), answer 1.5, EOS 1; no span score is read
    assert token_weights(8, SPANS, "oracle", RAW, True, relevant=relevant) == approx(
        [2.0, 2.0, 0.5, 0.5, 2.0, 1.5, 1.5, 1.0]
    )
    # conservation: the seven tokens before EOS sum to 10.0, mean 10/7
    assert token_weights(8, SPANS, "oracle", WeightConfig(), True, relevant=relevant) == approx(
        [w * 0.7 for w in [2.0, 2.0, 0.5, 0.5, 2.0, 1.5, 1.5]] + [1.0]
    )
    # the same under the authors' profile (no formatting rule: the oracle reads no scores)
    assert token_weights(8, SPANS, "oracle", AUTHORS, True, relevant=relevant) == approx(
        [2.0, 2.0, 0.5, 0.5, 2.0, 1.5, 1.5, 1.0]
    )
    # no answer span: all ones, as in every mode
    assert token_weights(8, SPANS[:2], "oracle", RAW, True, relevant=relevant) == [1.0] * 8
    with pytest.raises(ValueError, match="ground-truth relevance"):
        token_weights(8, SPANS, "oracle", RAW, True)


def test_entropy_weights_by_hand():
    # q = 0.8 of [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]: position 0.8 x 5 = 4 -> 0.5 exactly
    assert quantile([0.6, 0.1, 0.5, 0.2, 0.4, 0.3], 0.8) == pytest.approx(0.5)
    # linear between order statistics: q = 0.5 of [1, 2, 3, 4] is at position 1.5 -> 2.5
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    # at or above the threshold weighs 1, the rest 0; a final stop token weighs 1
    assert entropy_weights([0.5, 0.49, 0.7, 0.0], 0.5, ends_with_stop=True) == [1.0, 0.0, 1.0, 1.0]
    assert entropy_weights([0.5, 0.49, 0.7, 0.0], 0.5, ends_with_stop=False) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="entropy_weights"):
        token_weights(8, SPANS, "entropy", RAW, True)


def test_authors_inversion_spans_the_whole_completion():
    # Î over the completion = [1, 1, 1, .5, .5, 0, 0, (EOS) 0]: max 1, min 0 -> Î' = 1 - Î
    # = [0, 0, 0, .5, .5, 1, 1]; " =" now has Î' = 0, so the 0.1 rule leaves it; the answer is
    # overridden by answer_weight. Reasoning lands in [0.5, 1.25], never above the answer.
    expected = [0.5, 0.5, 0.5, 1.25, 1.25, 1.5, 1.5, 1.0]
    assert token_weights(8, AUTHOR_SPANS, "inverted", AUTHORS, ends_with_stop=True, token_texts=TEXTS) == approx(
        expected
    )
    # the cfiw profile flips within the reasoning region: 1.5 - [1, 1, 1, .5, .5] = [.5, .5, .5, 1, 1]
    assert token_weights(8, AUTHOR_SPANS, "inverted", RAW, ends_with_stop=True) == approx(
        [1.25, 1.25, 1.25, 2.0, 2.0, 1.5, 1.5, 1.0]
    )


def test_authors_rollouts_without_scored_spans():
    answer_only = [ScoredSpan("answer", 5, 7)]
    # cfiw: Î = 0.5 on the reasoning region (" =" -> 0.05 -> w 0.575), answer 1.5
    assert token_weights(8, answer_only, "cfiw", AUTHORS, ends_with_stop=True, token_texts=TEXTS) == approx(
        [1.25, 0.575, 1.25, 1.25, 1.25, 1.5, 1.5, 1.0]
    )
    # inverted returns before inverting, with Î = 1 on the reasoning region (" =" -> 0.1 -> 0.65)
    assert token_weights(8, answer_only, "inverted", AUTHORS, ends_with_stop=True, token_texts=TEXTS) == approx(
        [2.0, 0.65, 2.0, 2.0, 2.0, 1.5, 1.5, 1.0]
    )


def test_authors_random_draws_over_the_whole_completion():
    draws = _draws(3, 7)  # one per token but EOS, used as Î directly (no min-max scaling)
    expected = [0.5 + 1.5 * d for d in draws]
    expected[1] = 0.5 + 1.5 * 0.1 * draws[1]  # " =" is a formatting token
    expected[5:7] = [1.5, 1.5]
    weights = token_weights(
        8, AUTHOR_SPANS, "random", AUTHORS, ends_with_stop=True, rng=random.Random(3), token_texts=TEXTS
    )
    assert weights == approx(expected + [1.0])


def test_authors_profile_needs_token_texts():
    with pytest.raises(ValueError, match="text of every completion token"):
        token_weights(8, AUTHOR_SPANS, "cfiw", AUTHORS, ends_with_stop=True)


def test_unknown_mode_and_profile():
    with pytest.raises(ValueError):
        token_weights(3, [], "magic")
    with pytest.raises(ValueError):
        token_weights(3, [], "cfiw", WeightConfig(profile="magic"))


def test_every_mode_and_profile_has_its_own_rule():
    """The registry lists every pair train accepts; only entropy, weighed elsewhere, has none."""
    from cfiw_cli.algo.weights import MODES, PROFILES, WEIGHTINGS

    assert set(WEIGHTINGS) == {(m, p) for m in MODES for p in PROFILES if m != "entropy"}
    # the authors' rules and the cfiw profile's differ for every score-reading mode
    texts = ["a"] * 8
    for mode in SCORED_MODES:
        ours = token_weights(8, SPANS, mode, RAW, ends_with_stop=True, rng=random.Random(1), token_texts=texts)
        theirs = token_weights(
            8, SPANS, mode, WeightConfig(conserve=False, profile="authors"), ends_with_stop=True,
            rng=random.Random(1), token_texts=texts,
        )  # fmt: skip
        assert ours != theirs, mode


def test_a_pair_without_a_rule_is_an_error_not_a_fallback(monkeypatch):
    from cfiw_cli.algo import weights

    monkeypatch.delitem(weights.WEIGHTINGS, ("inverted", "authors"))
    with pytest.raises(ValueError, match="no weighting rule for mode 'inverted' under profile 'authors'"):
        token_weights(8, SPANS, "inverted", WeightConfig(profile="authors"), ends_with_stop=True, token_texts=["a"] * 8)
    assert token_weights(8, SPANS, "inverted", ends_with_stop=True) != [1.0] * 8  # the cfiw profile's rule stays
