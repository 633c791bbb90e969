"""LoRA: adapters alone are trained and saved, the reference is the base model (adapters
disabled), every stage samples and scores with the adapted model, and a LoRA loop resumes."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import assert_same_tables, kill_when, run_chained, tokenizer_files
from test_errors import assert_clean_error

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "cfiw_manifest.json"}
TRAIN_STATE = {"optimizer.pt", "scheduler.pt", "trainer_state.json"}


def loop_argv(config: Path, run: Path) -> list[str]:
    return [str(BIN / "cfiw"), "loop", "--config", str(config), "--run", str(run), "--lora-r", "4"]


@pytest.fixture(scope="module")
def lora_config(sharpening_task, tmp_path_factory) -> Path:
    policy, task = sharpening_task
    config = tmp_path_factory.mktemp("lora") / "task.toml"
    config.write_text(
        f'[model]\nid = "{policy}"\n[data]\ndataset = "{task}"\n'
        "[loop]\niterations = 2\nquestions = 8\neval_every = 100\neval_limit = 4\nprobe_questions = 4\n"
        "probe_samples = 4\nseed = 0\nkeep_policies = 1\n"
        "[rollout]\ngroup_size = 8\nmax_new_tokens = 16\nbatch_size = 128\n"
        "[train]\nlr = 1e-2\nminibatches = 2\nbeta = 0.05\nlora_alpha = 8.0\n"
    )
    return config


@pytest.fixture(scope="module")
def lora_run(lora_config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lora-run") / "run"
    done = subprocess.run(loop_argv(lora_config, run), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def test_the_checkpoint_holds_the_adapters_alone(lora_run, sharpening_task):
    from safetensors import safe_open

    policy = lora_run / "policy"
    assert {p.name for p in policy.iterdir()} == ADAPTER_FILES | TRAIN_STATE | tokenizer_files()
    with safe_open(policy / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
        assert any(weights.get_tensor(n).abs().max() > 0 for n in names if ".lora_B." in n)  # B moved from 0
    import torch

    state = torch.load(policy / "optimizer.pt", weights_only=True)["state"]
    assert len(state) == len(names)  # AdamW moments of the adapters only
    recorded = json.loads((policy / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(sharpening_task[0].resolve()) and recorded["r"] == 4
    assert recorded["target_modules"] == sorted(recorded["target_modules"])  # the same bytes in every process
    assert json.loads((policy / "trainer_state.json").read_text())["global_step"] == 4  # 2 iterations x 2 steps
    kept = lora_run / "policies"
    assert {p.name for p in (kept / "iter-0001").iterdir()} == {"adapter_model.safetensors", "cfiw_manifest.json"} | (
        TRAIN_STATE
    )
    assert (kept / "adapter_config.json").exists() and (lora_run / "best" / "adapter_model.safetensors").exists()


def test_the_reference_is_the_base_model_and_the_policy_is_adapted(lora_run, sharpening_task):
    """The KL term's log-probs come from the policy with its adapters disabled: they equal the
    base checkpoint's exactly, while the adapted policy's differ."""
    from accelerate import Accelerator

    from cfiw_cli import update
    from cfiw_cli.configs import TrainConfig
    from cfiw_cli.modeling import load_model
    from cfiw_cli.pipeline import train

    rollouts = str(lora_run / "iter-0001" / "rollouts.parquet")
    config = TrainConfig(model=str(lora_run / "policy"), rollouts=rollouts, out="unused", weighting="uniform")
    batch = train.read_batch(config)
    policy = train.load_policy(config, None, batch.rollouts)
    sequences = train.build_sequences(config, batch.rollouts, None, None)[0]
    base = load_model(str(sharpening_task[0]), "float32")
    plans = {}
    for reference in (update.ADAPTERS_OFF, base):
        context = update.UpdateContext.of(config, batch.sampling, Accelerator(cpu=True), 0, reference)
        plans[reference is base] = update.old_logprobs(
            policy, reference, update.plan_epoch(sequences, config, 0, context), context
        )
    disabled, loaded = plans[False], plans[True]
    assert disabled.keys() == loaded.keys() and len(disabled) == len(sequences)
    for rollout_id, (adapted, reference) in disabled.items():
        assert reference.equal(loaded[rollout_id][1])  # adapters off = the base checkpoint, bit for bit
        assert adapted.equal(loaded[rollout_id][0])
    assert any(not adapted.equal(reference) for adapted, reference in disabled.values())


def test_stages_given_adapters_use_the_adapted_model(lora_run, sharpening_task, tmp_path, cli):
    """A rollout from the LoRA checkpoint samples what the same weights merged into a full model
    sample, and not what the base model samples."""
    from cfiw_cli.modeling import load_model

    merged = tmp_path / "merged"
    load_model(str(lora_run / "policy"), "float32").merge_and_unload().save_pretrained(merged)
    for name in tokenizer_files():
        (merged / name).write_bytes((lora_run / "policy" / name).read_bytes())
    policy, task = sharpening_task
    common = ["--dataset", task, "--limit", "4", "-g", "4", "--max-new-tokens", "16", "--temperature", "1.0"]
    rows = {}
    for name, model in (("lora", lora_run / "policy"), ("merged", merged), ("base", policy)):
        result = cli("rollout", "--model", model, *common, "--out", tmp_path / f"{name}.parquet")
        assert result.exit_code == 0, result.stderr
        rows[name] = pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
    assert [r["completion_ids"] for r in rows["lora"]] == [r["completion_ids"] for r in rows["merged"]]
    for lora, merged_row in zip(rows["lora"], rows["merged"], strict=True):
        assert lora["completion_logprobs"] == pytest.approx(merged_row["completion_logprobs"], abs=1e-4)
    assert [r["completion_ids"] for r in rows["lora"]] != [r["completion_ids"] for r in rows["base"]]
    spans, scores = tmp_path / "spans.parquet", tmp_path / "scores.parquet"
    assert (
        cli("segment", "-r", tmp_path / "lora.parquet", "--model", lora_run / "policy", "--out", spans).exit_code == 0
    )
    result = cli("score", "-r", tmp_path / "lora.parquet", "-s", spans, "--model", lora_run / "policy", "--out", scores)
    assert result.exit_code == 0, result.stderr
    result = cli("eval", "--model", lora_run / "policy", "--dataset", task, "--limit", "2", "--out", tmp_path / "e.pq")
    assert result.exit_code == 0, result.stderr


def test_the_chained_commands_write_the_loops_files(lora_run, lora_config, tmp_path):
    run = tmp_path / "staged"
    commands = subprocess.run(
        loop_argv(lora_config, run) + ["--dry-run"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    trains = [line for line in commands.splitlines() if line.startswith("cfiw train")]
    assert trains and all("--lora-r 4" in line and "--reference" not in line for line in trains)
    run_chained(commands, ROOT)
    assert_same_tables(lora_run, run)


def test_a_killed_lora_loop_resumes_to_the_same_files(lora_run, lora_config, tmp_path):
    run = tmp_path / "killed"
    kill_when(loop_argv(lora_config, run), run / "iter-0001" / "rollouts.parquet", ROOT)  # the second iteration began
    assert not (run / "iter-0001" / "train_metrics.parquet").exists()
    done = subprocess.run(loop_argv(lora_config, run), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_tables(lora_run, run)
    for name in ("adapter_model.safetensors", "optimizer.pt"):
        assert (run / "policy" / name).read_bytes() == (lora_run / "policy" / name).read_bytes(), name


def test_sft_trains_and_saves_adapters(cli, tiny_model, mini_dataset, tmp_path):
    out = tmp_path / "sft"
    args = ["sft", "--model", tiny_model, "--dataset", mini_dataset, "--steps", "3", "--batch-size", "4"]
    result = cli(*args, "--lr", "1e-2", "--lora-r", "2", "--lora-target-modules", "q_proj,v_proj", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"} | (
        {"cfiw_manifest.json"} | tokenizer_files()
    )
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == ["q_proj", "v_proj"]
    sampled = cli("rollout", "--model", out, "--dataset", mini_dataset, "--limit", "2", "--out", tmp_path / "r.parquet")
    assert sampled.exit_code == 0, sampled.stderr


def test_lora_mistakes_are_one_line_errors(cli, tiny_model, mini_dataset, tmp_path):
    from conftest import COMPLETIONS, write_rollouts

    from cfiw_cli.modeling import load_tokenizer

    rollouts = write_rollouts(tmp_path / "r.parquet", load_tokenizer(str(tiny_model)), COMPLETIONS[:4])
    base = ["train", "--model", tiny_model, "--rollouts", rollouts, "--weighting", "uniform", "--temperature", "1.0"]
    assert_clean_error(
        cli(*base, "--lora-r", "4", "--beta", "0.1", "--reference", tiny_model, "--out", tmp_path / "a"), "--reference"
    )
    assert_clean_error(cli(*base, "--lora-r", "4", "--lora-target-modules", ",", "--out", tmp_path / "b"), "names no")
    assert_clean_error(
        cli(*base, "--lora-r", "4", "--lora-target-modules", "no_such_proj", "--out", tmp_path / "c"), "LoRA"
    )
    assert cli(*base, "--lora-r", "4", "--no-dynamic-sampling", "--out", tmp_path / "d").exit_code == 0
    mismatch = cli(
        "train", "--model", tmp_path / "d", "--rollouts", rollouts, "--weighting", "uniform", "--temperature", "1",
        "--lora-r", "2",
        "--out", tmp_path / "e",
    )  # fmt: skip
    assert_clean_error(mismatch, "r = 4", "--lora-r 2")
    moved = tmp_path / "moved"
    (tmp_path / "d").rename(moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "x")}))
    assert_clean_error(cli("rollout", "--model", moved, "--dataset", mini_dataset, "--out", tmp_path / "f.parquet"))


def test_two_processes_train_the_adapters_one_process_trains(lora_run, sharpening_task, tmp_path):
    """LoRA under DDP: the adapters' gradients are averaged like any others, and the reference
    (adapters disabled) is each process's own base model."""
    from safetensors.torch import load_file

    rollouts = lora_run / "iter-0001" / "rollouts.parquet"
    update = ["train", "--model", str(sharpening_task[0]), "--rollouts", str(rollouts), "--weighting", "uniform"]
    update += ["--lora-r", "4", "--beta", "0.05", "--epochs", "2", "--lr", "1e-3"]
    one = subprocess.run(
        [str(BIN / "cfiw"), *update, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300
    )
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29631"]
    two = subprocess.run(
        [*launch, "-m", "cfiw_cli", *update, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two"))
    assert sorted(a) == sorted(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    kls = [pq.read_table(tmp_path / name / "train_metrics.parquet").column("kl").to_pylist() for name in ("one", "two")]
    assert kls[1] == pytest.approx(kls[0], abs=1e-6) and kls[0][-1] > 0  # the second epoch has left the base
