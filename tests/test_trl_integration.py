"""CFIW inside TRL's GRPOTrainer: the same settings as `cfiw train`, the same weights as
`cfiw train` on the same rollouts, and stock GRPO, bit for bit, in `uniform` mode."""

import dataclasses

import pytest

from cfiw_cli.configs import ScoreConfig, SegmentConfig, TrainConfig
from cfiw_cli.errors import CfiwError
from cfiw_cli.integrations.trl import CFIWConfig


def test_the_settings_are_the_stages_declarations():
    sources = (TrainConfig, ScoreConfig, SegmentConfig)
    for field in dataclasses.fields(CFIWConfig):
        if field.name == "log_dir":  # the integration's own setting
            continue
        source = next(c for c in sources if field.name in c.__dataclass_fields__)
        declared = source.__dataclass_fields__[field.name]
        assert field.default == declared.default and dict(field.metadata) == dict(declared.metadata), field.name
    for bad in ({"weighting": "nope"}, {"importance_floor": 1.5}, {"min_tokens": 60, "max_tokens": 50}):
        with pytest.raises(CfiwError):
            CFIWConfig(**bad)
    with pytest.raises(CfiwError, match="top_entropy_quantile"):
        CFIWConfig(weighting="entropy")
    with pytest.raises(CfiwError, match="synth labels"):
        CFIWConfig(weighting="oracle")
    with pytest.raises(CfiwError, match="own answer"):
        CFIWConfig(profile="authors", target="gold")


PROMPT = "Tom has 1 apple and gets 2 more. How many apples does Tom have?"


def grpo(policy, tmp_path, trainer_class, steps=2, **extra):
    from datasets import Dataset
    from trl import GRPOConfig

    from cfiw_cli.integrations.trl import load_tokenizer

    tokenizer = load_tokenizer(str(policy))
    data = Dataset.from_list([{"prompt": PROMPT, "answer": "3"}] * 16)

    def reward(completions, answer, **_):
        return [1.0 if c.strip().endswith(a) else 0.0 for c, a in zip(completions, answer, strict=True)]

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
        max_completion_length=24, max_steps=steps, learning_rate=1e-3, logging_steps=1, report_to="none",
        use_cpu=True, seed=0, save_strategy="no", bf16=False, temperature=1.0,
    )  # fmt: skip
    trainer = trainer_class(
        model=str(policy), reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer, **extra
    )
    trainer.train()
    return trainer


@pytest.mark.slow
def test_uniform_is_stock_grpo_bit_for_bit(sharpening_task, tmp_path):
    from trl import GRPOTrainer

    from cfiw_cli.integrations.trl import CFIWGRPOTrainer

    policy, _ = sharpening_task
    stock = grpo(policy, tmp_path / "stock", GRPOTrainer)
    ours = grpo(policy, tmp_path / "ours", CFIWGRPOTrainer, cfiw=CFIWConfig(weighting="uniform"))
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (stock, ours)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    theirs, mine = stock.model.state_dict(), ours.model.state_dict()
    assert theirs.keys() == mine.keys() and all(theirs[k].equal(mine[k]) for k in theirs)


@pytest.mark.slow
def test_cfiw_trains_with_per_token_advantages(sharpening_task, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    from cfiw_cli.integrations.trl import CFIWGRPOTrainer

    seen = []
    compute_loss = GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        seen.append((inputs["advantages"].clone(), inputs["completion_mask"].clone()))
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    policy, _ = sharpening_task
    grpo(policy, tmp_path, CFIWGRPOTrainer, cfiw=CFIWConfig(weighting="cfiw"))
    assert seen and all(advantages.dim() == 2 for advantages, _ in seen)
    # some group had rewards that differ, and there the weights vary along the completion
    varied = [
        row[mask.bool()]
        for advantages, masks in seen
        for row, mask in zip(advantages, masks, strict=True)
        if mask.any()
    ]
    assert any(len(set(row.tolist())) > 1 for row in varied if row.abs().sum() > 0)


@pytest.mark.slow
def test_the_weights_are_cfiw_trains_on_the_same_rollouts(sharpening_task, cli, tmp_path):
    """Rollouts written to Parquet, then segment, score and train in each mode: the weights
    train writes equal the integration's, computed in memory from the same rollouts."""
    import pyarrow.parquet as pq

    from cfiw_cli import modeling
    from cfiw_cli.integrations.trl import token_weights_of

    policy, task = sharpening_task
    run = tmp_path / "it"
    common = ["--model", policy]
    rollouts, spans, scores = run / "rollouts.parquet", run / "spans.parquet", run / "scores.parquet"
    steps = [
        ["rollout", *common, "--dataset", task, "--limit", "4", "--group-size", "4", "--max-new-tokens", "24",
         "--temperature", "1.0", "--out", rollouts],
        ["segment", *common, "--rollouts", rollouts, "--out", spans],
        ["score", *common, "--rollouts", rollouts, "--spans", spans, "--out", scores],
    ]  # fmt: skip
    for step in steps:
        done = cli(*step)
        assert done.exit_code == 0, done.stderr
    model = modeling.load_model(str(policy), "float32").eval()
    tokenizer = modeling.load_tokenizer(str(policy))
    table = pq.read_table(rollouts)
    compared = 0
    for mode in ("cfiw", "inverted", "shuffled", "random"):
        done = cli(
            "train", *common, "--rollouts", rollouts, "--spans", spans, "--scores", scores, "--weighting", mode,
            "--no-dynamic-sampling", "--lr", "0", "--out", tmp_path / f"policy-{mode}",
        )  # fmt: skip
        assert done.exit_code == 0, done.stderr
        written = pq.read_table(tmp_path / f"policy-{mode}" / "weights.parquet").to_pylist()
        ours = token_weights_of(CFIWConfig(weighting=mode), model, tokenizer, table)
        assert [r["rollout_id"] for r in written] == table.column("rollout_id").to_pylist()
        for row, mine in zip(written, ours, strict=True):
            assert len(row["token_weights"]) == len(mine)
            assert max((abs(a - b) for a, b in zip(row["token_weights"], mine, strict=True)), default=0) < 1e-6
            compared += any(w != 1.0 for w in mine)
    assert compared > 0  # some rollouts were reweighed, not all left at 1

    # inverted reweighs the other way: on every reasoning token it moves, a rollout's cfiw and
    # inverted weights sum to one constant (the scaled importance Î' = max + min - Î), so the
    # tokens cfiw raises above that midpoint, inverted lowers below it
    cfiw = token_weights_of(CFIWConfig(weighting="cfiw", conserve=False), model, tokenizer, table)
    inverted = token_weights_of(CFIWConfig(weighting="inverted", conserve=False), model, tokenizer, table)
    moved = 0
    for row_a, row_b in zip(cfiw, inverted, strict=True):
        pairs = [(a, b) for a, b in zip(row_a, row_b, strict=True) if a != b]
        if pairs:
            total = pairs[0][0] + pairs[0][1]
            assert all(abs(a + b - total) < 1e-9 and (a > total / 2) == (b < total / 2) for a, b in pairs)
            moved += len(pairs)
    assert moved > 0


@pytest.mark.slow
def test_trl_train_runs_a_preset_in_one_line_and_the_example_runs(sharpening_task, cli, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    policy, task = sharpening_task
    sizes = ["loop.questions=4", "rollout.group_size=4", "rollout.max_new_tokens=24"]
    common = ["--preset", "tiny", "--steps", "2", "--set", f'model.id="{policy}"', "--set", f'data.dataset="{task}"']
    common += [word for s in sizes for word in ("--set", s)]
    done = cli("trl-train", *common, "--out", tmp_path / "run")
    assert done.exit_code == 0, done.stderr
    assert (tmp_path / "run" / "model.safetensors").exists()
    logged = sorted(p.name for p in (tmp_path / "run").glob("iter-*/*.parquet"))
    # train.minibatches = 2: the 2 steps train on one generated batch, logged as iteration 0
    assert logged == [f"{k}.parquet" for k in ("rollouts", "scores", "spans", "weights")]
    again = cli("trl-train", *common, "--out", tmp_path / "run")  # a second run never overwrites the batches
    assert again.exit_code == 1 and "already holds logged batches" in again.stderr
    refused = cli("trl-train", *common, "--out", tmp_path / "bad", "--set", "loop.weighting=entropy")
    assert refused.exit_code == 1 and "top_entropy_quantile" in refused.stderr and "Traceback" not in refused.stderr
    example = Path(__file__).resolve().parents[1] / "examples" / "trl_cfiw.py"
    ran = subprocess.run(
        [sys.executable, str(example), str(policy), str(task)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert (tmp_path / "runs" / "trl-example" / "model.safetensors").exists()
    assert (tmp_path / "runs" / "trl-example" / "iter-0000" / "weights.parquet").exists()


# Two processes of `accelerate launch` train with CFIWGRPOTrainer at lr 0 (the policy stays the
# one that sampled); each records the rollouts it weighed and the weights it gave them.
TWO_PROCESSES = """
import json, sys
from datasets import Dataset
from trl import GRPOConfig
from cfiw_cli.integrations import trl as integration

policy, out = sys.argv[1], sys.argv[2]
seen, weigh = [], integration.weigh
def recording(config, model, tokenizer, rollouts):
    batch = weigh(config, model, tokenizer, rollouts)
    weights = [row["token_weights"] for row in batch.weights]
    columns = [rollouts.column(c).to_pylist() for c in ("prompt_ids", "completion_ids", "finish_reason")]
    seen.extend({"prompt": p, "completion": c, "finish": f, "weights": w} for p, c, f, w in zip(*columns, weights))
    return batch
integration.weigh = recording
data = Dataset.from_list([{"prompt": "Tom has 1 apple and gets 2 more. How many apples does Tom have?"}] * 16)
args = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=24,
                  max_steps=2, learning_rate=0.0, report_to="none", use_cpu=True, seed=0, save_strategy="no",
                  bf16=False, disable_tqdm=True)
trainer = integration.CFIWGRPOTrainer(model=policy, reward_funcs=lambda completions, **_: [0.0] * len(completions),
    args=args, train_dataset=data, processing_class=integration.load_tokenizer(policy))
trainer.train()
with open(f"{out}/seen-{trainer.accelerator.process_index}.json", "w") as f:
    json.dump({"world": trainer.accelerator.num_processes, "seen": seen}, f)
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()  # the process group goes down before the interpreter does
"""


@pytest.mark.slow
def test_two_processes_weigh_their_shares_as_one_process_weighs_them(sharpening_task, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from cfiw_cli import modeling
    from cfiw_cli.integrations.trl import batch_tables, token_weights_of

    policy, _ = sharpening_task
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES)
    accelerate = Path(sys.executable).parent / "accelerate"
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29631"]
    done = subprocess.run(
        [*launch, str(script), str(policy), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((tmp_path / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["world"] == 2 and r["seen"] for r in records)
    rows = [row for record in records for row in record["seen"]]
    # one process, the same policy, every row of both processes in one batch
    model = modeling.load_model(str(policy), "float32").eval()
    tokenizer = modeling.load_tokenizer(str(policy))
    table = batch_tables(
        [r["prompt"] for r in rows],
        [r["completion"] for r in rows],
        [r["finish"] == "stop" for r in rows],
        [f"r{i}" for i in range(len(rows))],
        [f"g{i // 4}" for i in range(len(rows))],
    )
    alone = token_weights_of(CFIWConfig(), model, tokenizer, table)
    for row, mine in zip(rows, alone, strict=True):
        assert max((abs(a - b) for a, b in zip(row["weights"], mine, strict=True)), default=0) < 1e-5
    assert any(w != 1.0 for row in rows for w in row["weights"])  # some completion was reweighed
