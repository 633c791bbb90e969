"""`--revision`: a hub model is loaded at the commit its revision resolves to, and that commit
is recorded in the manifest and decides whether an output is up to date. Offline, against a
local hub cache laid out as huggingface_hub lays it out (refs/ name commits, snapshots/ hold
each commit's files)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

REPO = "cfiw-test/tiny"
MAIN, V1 = "1" * 40, "2" * 40  # two commits; refs/main and refs/v1 point at them


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model):
    """A hub cache holding REPO at two commits: main (the tiny model) and v1 (other weights)."""
    from cfiw_cli.tools.tiny_model import TinyModelConfig, run

    root = tmp_path_factory.mktemp("hub")
    other = run(TinyModelConfig(out=str(root / "other-weights"), seed=1)).path
    repo = root / "cache" / "models--cfiw-test--tiny"
    for commit, source in ((MAIN, tiny_model), (V1, other)):
        shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    return {"cache": root / "cache", "refs": repo / "refs", "main": Path(tiny_model), "v1": other}


def cfiw(hub, cwd, *args):
    env = {**os.environ, "HF_HUB_CACHE": str(hub["cache"]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cfiw_cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env
    )


def rollout(hub, cwd, model, out, *extra):
    args = ["rollout", "--model", model, "--dataset", hub["dataset"], "--limit", "2", "--group-size", "2"]
    return cfiw(hub, cwd, *args, "--max-new-tokens", "6", "--temperature", "1.0", "--out", out, *extra)


def recorded_model(path):
    return json.loads(pq.read_schema(path).metadata[b"cfiw"])["inputs"]["model"]


def completions(path):
    return pq.read_table(path).column("completion_ids").to_pylist()


def test_revision_is_resolved_loaded_and_recorded(hub, tmp_path, mini_dataset):
    hub = {**hub, "dataset": mini_dataset}
    done = rollout(hub, tmp_path, REPO, "main.parquet")
    assert done.returncode == 0, done.stderr
    assert recorded_model(tmp_path / "main.parquet") == {"path": REPO, "sha256": None, "revision": MAIN}

    done = rollout(hub, tmp_path, REPO, "v1.parquet", "--revision", "v1")
    assert done.returncode == 0, done.stderr
    assert recorded_model(tmp_path / "v1.parquet")["revision"] == V1
    # the weights of v1 were loaded: the same samples as the v1 snapshot read as a local directory
    assert rollout(hub, tmp_path, hub["v1"], "local-v1.parquet").returncode == 0
    assert completions(tmp_path / "v1.parquet") == completions(tmp_path / "local-v1.parquet")
    assert completions(tmp_path / "v1.parquet") != completions(tmp_path / "main.parquet")
    assert "revision" not in recorded_model(tmp_path / "local-v1.parquet")  # a directory has a sha256 instead


def test_moved_branch_recomputes_and_unknown_revision_is_an_error(hub, tmp_path, mini_dataset):
    hub = {**hub, "dataset": mini_dataset}
    assert rollout(hub, tmp_path, REPO, "r.parquet").returncode == 0
    again = rollout(hub, tmp_path, REPO, "r.parquet")
    assert again.returncode == 0 and "up to date" in again.stderr
    (hub["refs"] / "main").write_text(V1)  # the branch moves to another commit
    try:
        moved = rollout(hub, tmp_path, REPO, "r.parquet")
        assert moved.returncode == 0 and "up to date" not in moved.stderr
        assert recorded_model(tmp_path / "r.parquet")["revision"] == V1
    finally:
        (hub["refs"] / "main").write_text(MAIN)

    unknown = rollout(hub, tmp_path, REPO, "x.parquet", "--revision", "no-such-branch")
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert unknown.stderr.startswith("Error: cannot resolve revision 'no-such-branch' of cfiw-test/tiny")
    assert not (tmp_path / "x.parquet").exists()


def test_a_run_resolves_each_hub_revision_once(hub, monkeypatch):
    """Inside `pinned_revisions` (the loop) a branch that moves keeps its first commit, and the
    hub cache is read once; outside, every call sees the branch as it is."""
    import huggingface_hub

    from cfiw_cli import modeling

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub["cache"]))
    lookups = []
    resolve = modeling._resolve_on_hub
    monkeypatch.setattr(modeling, "_resolve_on_hub", lambda *args: lookups.append(args) or resolve(*args))
    try:
        with modeling.pinned_revisions():
            assert modeling.resolve_revision(REPO, None) == MAIN
            (hub["refs"] / "main").write_text(V1)  # the branch moves during the run
            assert [modeling.resolve_revision(REPO, None) for _ in range(3)] == [MAIN] * 3
            assert modeling.resolve_revision(REPO, "v1") == V1
        assert lookups == [(REPO, None), (REPO, "v1")]
        assert modeling.resolve_revision(REPO, None) == V1
    finally:
        (hub["refs"] / "main").write_text(MAIN)
