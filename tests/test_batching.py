"""Packing rows under a token budget, and left padding."""

from cfiw_cli.batching import consecutive_runs, left_pad, left_padded_batch


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
