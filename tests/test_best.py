"""best/ keeps the run's best evaluated policy without optimizer state; kept policies can be capped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cfiw_cli.policies import BEST_RECORD, prune_kept, update_best

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def policy_dir(path, weights: bytes):
    path.mkdir(parents=True, exist_ok=True)
    for name, content in (("config.json", b"{}"), ("model.safetensors", weights), ("optimizer.pt", b"adam")):
        (path / name).write_bytes(content)
    return path


def test_best_is_replaced_only_by_a_higher_value(tmp_path):
    policy, best = tmp_path / "policy", tmp_path / "best"
    assert update_best(policy_dir(policy, b"one"), best, 1, "probe mean@8", 0.25)
    assert sorted(p.name for p in best.iterdir()) == [BEST_RECORD, "config.json", "model.safetensors"]
    assert not update_best(policy_dir(policy, b"two"), best, 2, "probe mean@8", 0.25)  # a tie keeps the earlier
    assert not update_best(policy, best, 3, "probe mean@8", 0.125)
    assert (best / "model.safetensors").read_bytes() == b"one"
    assert update_best(policy_dir(policy, b"four"), best, 4, "probe mean@8", 0.5)
    assert (best / "model.safetensors").read_bytes() == b"four"
    assert json.loads((best / BEST_RECORD).read_text()) == {"iteration": 4, "metric": "probe mean@8", "value": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "policy"]  # no staging left behind


def test_prune_keeps_the_newest_kept_policies(tmp_path):
    policies = tmp_path / "policies"
    for i in (2, 4, 6, 8):
        (policies / f"iter-{i:04d}").mkdir(parents=True)
    (policies / "config.json").write_text("{}")  # shared files stay
    assert prune_kept(tmp_path, 0) == []
    removed = prune_kept(tmp_path, 2)
    assert [p.name for p in removed] == ["iter-0002", "iter-0004"]
    assert sorted(p.name for p in policies.iterdir()) == ["config.json", "iter-0006", "iter-0008"]


@pytest.mark.slow
def test_the_loop_caps_its_kept_policies(tiny_model, tmp_path):
    run = tmp_path / "run"
    argv = [BIN / "cfiw", "loop", "--preset", "tiny", "--run", run, "--model", tiny_model, "--iterations", "3"]
    small = ["loop.questions=4", "rollout.group_size=2", "rollout.max_new_tokens=8", "loop.eval_limit=4"]
    small += ["loop.probe_questions=2", "loop.probe_samples=2", "loop.keep_policies=1"]
    argv += [word for value in small for word in ("--set", value)] + ["--keep-checkpoints", "1"]
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (run / "policies").glob("iter-*")) == ["iter-0002"]  # iteration 1's was removed
    assert (run / "best" / BEST_RECORD).exists()
