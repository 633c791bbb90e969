"""One dtype rule for the loop and the separate commands, and the resolved dtype in manifests.
On CPU `auto` is float32; bfloat16 is asked for explicitly here to exercise the rule."""

import json

import pyarrow.parquet as pq
import pytest

from cfiw_cli.configs import RolloutConfig, TrainConfig
from cfiw_cli.modeling import load_model, load_tokenizer
from cfiw_cli.pipeline import rollout, train

pytestmark = pytest.mark.slow


def manifest(path):
    return json.loads(pq.read_schema(path).metadata[b"cfiw"])


def test_a_given_float32_model_samples_what_the_checkpoint_loaded_in_bfloat16_samples(
    cli, tiny_model, mini_dataset, tmp_path
):
    """The loop hands its float32 policy to rollout; with --dtype bfloat16 the stage must sample
    exactly what `cfiw rollout --dtype bfloat16` samples after loading the checkpoint itself."""
    common = dict(model=str(tiny_model), dataset=str(mini_dataset), limit=4, group_size=2, max_new_tokens=12)
    policy = load_model(str(tiny_model), "float32")
    config = RolloutConfig(**common, dtype="bfloat16", temperature=1.0, out=str(tmp_path / "given.parquet"))
    rollout.run(config, model=policy, tokenizer=load_tokenizer(str(tiny_model)))
    assert next(policy.parameters()).dtype.is_floating_point and str(next(policy.parameters()).dtype) == "torch.float32"

    args = ["rollout", "--model", tiny_model, "--dataset", mini_dataset, "--limit", "4", "--group-size", "2"]
    args += ["--max-new-tokens", "12", "--temperature", "1.0", "--dtype", "bfloat16"]
    assert cli(*args, "--out", tmp_path / "loaded.parquet").exit_code == 0
    given, loaded = pq.read_table(tmp_path / "given.parquet"), pq.read_table(tmp_path / "loaded.parquet")
    assert given.equals(loaded)  # the same tokens and the same bfloat16 log-probs
    assert manifest(tmp_path / "given.parquet")["dtype"] == manifest(tmp_path / "loaded.parquet")["dtype"] == "bfloat16"

    assert cli(*args[:-2], "--out", tmp_path / "auto.parquet").exit_code == 0
    assert manifest(tmp_path / "auto.parquet")["dtype"] == "float32"  # auto resolves to float32 on a CPU
    fp32 = pq.read_table(tmp_path / "auto.parquet").column("completion_logprobs").to_pylist()
    assert fp32 != loaded.column("completion_logprobs").to_pylist()  # bfloat16 did compute differently


def test_train_computes_in_the_dtype_asked_and_records_it(tiny_model, mini_dataset, tmp_path):
    config = RolloutConfig(
        model=str(tiny_model), dataset=str(mini_dataset), limit=4, group_size=4, max_new_tokens=12,
        temperature=1.0, out=str(tmp_path / "rollouts.parquet"),
    )  # fmt: skip
    rollout.run(config)
    losses = {}
    for dtype in ("auto", "bfloat16"):
        out = tmp_path / dtype
        update = TrainConfig(
            model=str(tiny_model), rollouts=config.out, out=str(out), weighting="uniform", dynamic_sampling=False,
            dtype=dtype, lr=1e-3,
        )  # fmt: skip
        train.run(update)
        recorded = json.loads((out / "cfiw_manifest.json").read_text())
        assert recorded["dtype"] == ("float32" if dtype == "auto" else "bfloat16")
        assert str(load_model(str(out), "auto").dtype) == "torch.float32"  # the weights stay float32
        losses[dtype] = pq.read_table(out / "train_metrics.parquet").column("entropy").to_pylist()
    assert losses["auto"] != losses["bfloat16"] and losses["auto"] == pytest.approx(losses["bfloat16"], rel=0.05)


def test_loop_dtype_reaches_every_stage(cli, tmp_path):
    result = cli("loop", "--preset", "tiny", "--run", tmp_path / "r", "--dry-run", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    for command in ("rollout", "score", "eval", "train"):
        lines = [line for line in result.stdout.splitlines() if line.split()[1:2] == [command]]
        assert lines and all("--dtype bfloat16" in line for line in lines), command
