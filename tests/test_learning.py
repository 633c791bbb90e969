"""The update path learns: a task the policy can solve by sharpening, through rollout -> segment
-> score -> train (`cfiw loop`), in uniform and in cfiw mode.

The warm start writes "a + b = d.\\n#### d" with d uniform over 2..8 (a tiny model learns the
format, not the arithmetic), so it samples the right answer about one time in seven. Every
RL question has the gold answer 3: a policy that puts its mass on "... = 3.\\n#### 3" earns
reward 1. The calculation span decides the answer the model copies, so cfiw mode has real
spans with real deltas to weight.
"""

import json

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def warm_policy(tmp_path_factory, sharpening_task):
    policy, task = sharpening_task
    config = tmp_path_factory.mktemp("learning") / "task.toml"
    config.write_text(
        f'[model]\nid = "{policy}"\n[data]\ndataset = "{task}"\n'
        "[loop]\niterations = 20\nquestions = 16\neval_every = 100\neval_limit = 4\nprobe_questions = "
        "16\nprobe_samples = 8\nseed = 0\n"
        "[rollout]\ngroup_size = 8\nmax_new_tokens = 16\nbatch_size = 128\n"
        "[train]\nlr = 1e-3\nminibatches = 2\n"
    )
    return config


def sampled_reward(run, index):
    """The loop's probe: mean@8 at the rollout temperature on 16 fixed test questions."""
    return json.loads(pq.read_schema(run / "probe" / f"iter-{index:04d}.parquet").metadata[b"cfiw"])["metrics"][
        "mean@8"
    ]


@pytest.mark.parametrize("mode", ["uniform", "cfiw"])
def test_sampled_reward_rises_from_chance_to_mastery(cli, warm_policy, tmp_path, mode):
    run = tmp_path / mode
    result = cli("loop", "--config", warm_policy, "--run", run, "--weighting", mode)
    assert result.exit_code == 0, result.stderr
    before, after = sampled_reward(run, 0), sampled_reward(run, 20)
    first_rollouts = pq.read_table(run / "iter-0000" / "rollouts.parquet").column("reward").to_pylist()
    assert before <= 0.3 and sum(first_rollouts) / len(first_rollouts) <= 0.3, before
    assert after >= 0.8, (before, after)
    scores = pq.read_table(run / "iter-0000" / "scores.parquet").to_pylist()
    assert len(scores) > 64  # the method had spans to weight
    if mode == "cfiw":
        weights = pq.read_table(run / "iter-0000" / "weights.parquet").to_pylist()
        assert sum(set(w["token_weights"]) != {1.0} for w in weights) > 64
