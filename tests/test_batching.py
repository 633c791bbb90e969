"""Packing rows under a token budget, and left padding."""

import random

from cfiw_cli.batching import consecutive_runs, least_padded_runs, left_pad, left_padded_batch


def test_runs_stay_within_the_budget_in_the_given_order():
    # sizes 3, 5, 2, 4 with budget 10: [3, 5] pads to 2 x 5 = 10 (fits); adding 2 gives 3 x 5 = 15
    # (cut); [2, 4] pads to 2 x 4 = 8
    assert consecutive_runs([0, 1, 2, 3], [3, 5, 2, 4], 10) == [[0, 1], [2, 3]]


def test_a_row_wider_than_the_budget_runs_alone():
    assert consecutive_runs([0, 1, 2], [2, 12, 2], 10) == [[0], [1], [2]]


def test_cached_prefixes_bound_the_runs_too():
    # widths 2, 2: 2 x 2 = 4 fits a budget of 10, but with pasts 6 and 9, 2 x (9 + 2) = 22 > 20
    assert consecutive_runs([0, 1], [2, 2], 10, pasts=[6, 9], past_budget=20) == [[0], [1]]
    assert consecutive_runs([0, 1], [2, 2], 10, pasts=[6, 9], past_budget=22) == [[0, 1]]


def test_left_padding():
    assert left_pad([[1, 2, 3], [4]], 0) == [[1, 2, 3], [0, 0, 4]]
    ids, attention = left_padded_batch([[5, 6], [7]], 9, "cpu")
    assert ids.tolist() == [[5, 6], [9, 7]]
    assert attention.tolist() == [[1, 1], [0, 1]]


def test_least_padded_runs_cut_where_padding_is_least():
    # sizes 10, 9, 2, 2, budget 30, a call costs 2 tokens: greedy runs [10, 9, 2] + [2] pad to
    # 30 + 2 (+ 2 calls) = 36; [10, 9] + [2, 2] to 20 + 4 (+ 4) = 28; [10] + [9] + [2, 2] to
    # 23 + 6 = 29; four calls 23 + 8 = 31
    assert least_padded_runs([10, 9, 2, 2], 30, 2) == [[0, 1], [2, 3]]
    assert consecutive_runs([0, 1, 2, 3], [10, 9, 2, 2], 30) == [[0, 1, 2], [3]]
    # a call cost of 5 tokens: [10, 9, 2, 2] in one call is 40 + 5 > [10, 9] + [2, 2] = 24 + 10
    assert least_padded_runs([10, 9, 2, 2], 40, 5) == [[0, 1], [2, 3]]
    # a call cost of 30: one call (40 + 30) beats two (24 + 60)
    assert least_padded_runs([10, 9, 2, 2], 40, 30) == [[0, 1, 2, 3]]
    # the past bound: rows x (longest past + widest) <= past_budget
    assert least_padded_runs([2, 2], 100, 100, pasts=[6, 9], past_budget=21) == [[0], [1]]


def test_least_padded_runs_are_valid_and_never_cost_more_than_greedy_runs():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
        pasts = [rng.randint(0, 80) for _ in sizes]
        budget = rng.choice([50, 100, 400])
        runs = least_padded_runs(sizes, budget, 8, pasts, 4 * budget)
        assert sorted(i for run in runs for i in run) == list(range(len(sizes)))
        for run in runs:
            width, past = max(sizes[i] for i in run), max(pasts[i] for i in run)
            assert len(run) == 1 or (len(run) * width <= budget and len(run) * (past + width) <= 4 * budget)
        order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
        greedy = consecutive_runs(order, sizes, budget, pasts, 4 * budget)
        cost = [sum(len(r) * max(sizes[i] for i in r) + 8 for r in rs) for rs in (runs, greedy)]
        assert cost[0] <= cost[1]
