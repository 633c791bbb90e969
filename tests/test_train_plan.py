"""How `train` deals rollouts into minibatches, and where it reads the sampling settings from."""

import math

import pyarrow as pa
import pytest

from cfiw_cli.algo.loss import group_advantages
from cfiw_cli.errors import CfiwError
from cfiw_cli.pipeline.train import TrainConfig, sampling_settings
from cfiw_cli.update import TrainSequence, plan_minibatches


def sequences(groups: int, size: int, seed: int = 0) -> list[TrainSequence]:
    import random

    rng = random.Random(seed)
    rewards = [float(rng.random() < 0.5) for _ in range(groups * size)]
    for g in range(groups):  # every group has a signal
        rewards[g * size], rewards[g * size + 1] = 1.0, 0.0
    names = [f"q-{i // size}" for i in range(groups * size)]
    advantages = group_advantages(rewards, names)
    return [
        TrainSequence(f"0:{names[i]}:{i % size}", names[i], [1, 2, 3], 1, a, [1.0, 1.0], [1.0, 1.0], [0.0, 0.0])
        for i, a in enumerate(advantages)
    ]


@pytest.mark.parametrize("groups, size, minibatches", [(8, 4, 2), (7, 8, 3), (5, 2, 4), (3, 4, 8), (16, 8, 4)])
def test_minibatches_keep_groups_whole(groups, size, minibatches):
    batch = sequences(groups, size, seed=groups)
    for epoch in range(3):
        plan = plan_minibatches(batch, minibatches, seed=1, epoch=epoch)
        assert len(plan) == min(minibatches, groups)
        assert sorted(s.rollout_id for step in plan for s in step) == sorted(s.rollout_id for s in batch)
        counts = [len({s.group for s in step}) for step in plan]
        assert max(counts) - min(counts) <= 1  # as even as whole groups allow
        for step in plan:
            per_group: dict[str, list[float]] = {}
            for s in step:
                per_group.setdefault(s.group, []).append(s.advantage)
            for group, advantages in per_group.items():
                assert len(advantages) == size, group  # the whole group is in this minibatch
                assert math.fsum(advantages) == pytest.approx(0.0, abs=1e-9), group  # GRPO's baseline holds


def test_minibatch_order_is_seeded_per_epoch():
    batch = sequences(8, 4)
    first = [[s.rollout_id for s in step] for step in plan_minibatches(batch, 4, seed=0, epoch=0)]
    assert first == [[s.rollout_id for s in step] for step in plan_minibatches(batch, 4, seed=0, epoch=0)]
    assert first != [[s.rollout_id for s in step] for step in plan_minibatches(batch, 4, seed=0, epoch=1)]
    assert plan_minibatches([], 4, seed=0, epoch=0) == []


def rollouts_table(**columns):
    return pa.table({"rollout_id": ["a", "b"], **{k: pa.array(v) for k, v in columns.items()}})


def test_sampling_settings_from_columns_flags_and_defaults(tmp_path, capsys):
    path = str(tmp_path / "missing.parquet")  # no manifest can be read: settings come from columns or flags
    config = TrainConfig(model="m", rollouts=path, out="o", weighting="uniform")
    assert sampling_settings(config, rollouts_table(temperature=[0.7, 0.7], max_new_tokens=[64, 64])) == {
        "temperature": 0.7,
        "temperature_source": "rollouts",
        "max_new_tokens": 64,
    }
    overridden = TrainConfig(model="m", rollouts=path, out="o", temperature=0.6, max_new_tokens=32, weighting="uniform")
    assert sampling_settings(overridden, rollouts_table(temperature=[0.7, 0.7])) == {
        "temperature": 0.6,
        "temperature_source": "--temperature",
        "max_new_tokens": 32,
    }
    # greedy rollouts record their log-probs at T = 1
    assert sampling_settings(config, rollouts_table(temperature=[0.0, 0.0]))["temperature"] == 1.0
    unknown = sampling_settings(config, rollouts_table())
    assert unknown == {"temperature": 1.0, "temperature_source": "default", "max_new_tokens": None}
    assert "does not record its sampling temperature" in capsys.readouterr().err


def test_sampling_settings_errors(tmp_path):
    path = str(tmp_path / "missing.parquet")
    with pytest.raises(CfiwError, match="several values"):
        sampling_settings(
            TrainConfig(model="m", rollouts=path, out="o", weighting="uniform"), rollouts_table(temperature=[0.7, 1.0])
        )
    with pytest.raises(CfiwError, match="dr_grpo needs the length limit") as caught:
        sampling_settings(
            TrainConfig(model="m", rollouts=path, out="o", loss_type="dr_grpo", weighting="uniform"),
            rollouts_table(temperature=[1.0, 1.0]),
        )
    assert "--max-new-tokens" in caught.value.hint
