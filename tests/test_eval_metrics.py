"""Accuracy, pass@k and maj@k with Wilson intervals, on hand-made records."""

import pytest

from cfiw_cli.pipeline.eval import accuracy_metrics
from cfiw_cli.stats import wilson_interval


def test_wilson_interval_known_values():
    # 8 of 10: p = .8, z = 1.96 -> (0.4902, 0.9433) (textbook value)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 4)[0] == 0.0 and wilson_interval(4, 4)[1] == 1.0


def record(prompt, pred, gold="5"):
    return {"prompt_id": prompt, "pred": pred, "gold": gold, "correct": pred == gold}


def test_pass_and_majority_at_k():
    records = [
        record("a", "5"),
        record("a", "4"),
        record("a", "4"),  # pass yes, majority 4 -> wrong
        record("b", "5"),
        record("b", "5"),
        record("b", None),  # pass yes, majority 5 -> right
        record("c", "1"),
        record("c", "2"),
        record("c", "3"),  # pass no, tie -> earliest "1" -> wrong
    ]
    metrics = accuracy_metrics(records)
    assert metrics["accuracy"] == pytest.approx(3 / 9)
    assert metrics["pass@3"] == pytest.approx(2 / 3)
    assert metrics["maj@3"] == pytest.approx(1 / 3)
    assert metrics["questions"] == 3 and metrics["n"] == 9


def test_greedy_has_no_pass_at_k():
    metrics = accuracy_metrics([record("a", "5"), record("b", "6")])
    assert metrics["accuracy"] == 0.5 and not any(k.startswith("pass@") for k in metrics)


def test_mean_at_k_interval_is_over_questions():
    # per-question shares 2/3, 1/3, 0: mean 1/3; their sample std is 1/3, so SE = (1/3) / sqrt(3)
    records = [
        record("a", "5"),
        record("a", "5"),
        record("a", "4"),
        record("b", "5"),
        record("b", "1"),
        record("b", None),
    ]
    records += [record("c", "1"), record("c", "2"), record("c", "3")]
    metrics = accuracy_metrics(records)
    se = (1 / 3) / 3**0.5
    assert metrics["mean@3"] == pytest.approx(1 / 3) and metrics["mean@3_se"] == pytest.approx(se)
    # 1/3 - 1.96 SE = -0.044, clipped at 0
    assert metrics["mean@3_ci_low"] == 0.0 and metrics["mean@3_ci_high"] == pytest.approx(1 / 3 + 1.959964 * se)


def test_t_quantiles_match_the_tables():
    from cfiw_cli.stats import t_quantile

    # two-sided 95% critical values of Student's t (any statistics table)
    for df, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(0.95, 10) == pytest.approx(1.812, abs=1e-3)
