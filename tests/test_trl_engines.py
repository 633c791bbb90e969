"""CFIW inside TRL wherever TRL's batch goes: split over `steps_per_generation`, reused for
`num_iterations`, accumulated, sampled by continuous batching, trained as a LoRA adapter. Each
test records what the trainer weighed and what reached TRL's loss, and checks the loss saw the
weights of the policy that sampled, once per generated batch."""

import pytest

from cfiw_cli.integrations.trl import CFIWConfig

PROMPT = "Tom has 1 apple and gets 2 more. How many apples does Tom have?"


def reward(completions, answer, **_):
    return [1.0 if c.strip().endswith(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


def recorded_run(policy, tmp_path, monkeypatch, cfiw=None, peft_config=None, **settings):
    """Train with CFIWGRPOTrainer; returns (trainer, weighed batches, inputs of every loss call)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from cfiw_cli.integrations import trl as integration

    weighed, losses = [], []
    weigh, compute_loss = integration.weigh, GRPOTrainer._compute_loss

    def recording_weigh(config, model, tokenizer, rollouts):
        batch = weigh(config, model, tokenizer, rollouts)
        columns = [rollouts.column(c).to_pylist() for c in ("prompt_ids", "completion_ids")]
        weighed.append([(p, c, w["token_weights"]) for p, c, w in zip(*columns, batch.weights, strict=True)])
        return batch

    def recording_loss(self, model, inputs):
        losses.append({k: v.detach().clone() for k, v in inputs.items() if hasattr(v, "detach")})
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(integration, "weigh", recording_weigh)
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", recording_loss)
    tokenizer = integration.load_tokenizer(str(policy))
    data = Dataset.from_list([{"prompt": PROMPT, "answer": "3"}] * 64)
    options = dict(
        output_dir=str(tmp_path / "out"), num_generations=4, max_completion_length=24, learning_rate=1e-3,
        report_to="none", use_cpu=True, seed=0, save_strategy="no", bf16=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = integration.CFIWGRPOTrainer(
        model=str(policy), reward_funcs=reward, args=GRPOConfig(**(options | settings)), train_dataset=data,
        processing_class=tokenizer, cfiw=cfiw or CFIWConfig(), peft_config=peft_config,
    )  # fmt: skip
    trainer.train()
    monkeypatch.undo()
    return trainer, weighed, losses


def rows_of(inputs):
    """(prompt ids, completion ids, advantage row) of each row a loss call saw."""
    for prompt, prompt_mask, completion, mask, advantages in zip(
        inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"],
        inputs["advantages"], strict=True,
    ):  # fmt: skip
        length = int(mask.sum())
        yield prompt[prompt_mask.bool()].tolist(), completion[:length].tolist(), advantages[:length]


def check_losses_saw_the_weights(weighed, losses, uses):
    """Every row of every loss call carries A x the weights its generated batch gave it, and each
    generated row reaches the loss `uses` times (steps_per_generation slices x num_iterations)."""
    import torch

    weights_of = {}
    for batch in weighed:
        for prompt, completion, weights in batch:
            weights_of.setdefault((tuple(prompt), tuple(completion)), []).append(weights)
    seen, varied = 0, 0
    for inputs in losses:
        assert inputs["advantages"].dim() == 2
        for prompt, completion, advantages in rows_of(inputs):
            candidates = weights_of[(tuple(prompt), tuple(completion))]
            if not completion:
                continue
            # A x w for one scalar A: the ratio to the weights is constant along the completion
            assert any(
                torch.allclose(advantages, advantages[0] / w[0] * torch.tensor(w), atol=1e-6)
                for w in candidates
                if w[0] != 0
            ), (prompt, completion)
            seen += 1
            varied += advantages.abs().sum() > 0 and len(set(advantages.tolist())) > 1
    generated = sum(len(b) for b in weighed)
    assert seen == uses * generated - uses * sum(1 for b in weighed for _, c, _ in b if not c)
    assert varied > 0  # some rewarded group's advantages varied along its completions


@pytest.mark.slow
def test_split_reused_and_accumulated_batches_keep_their_weights(sharpening_task, tmp_path, monkeypatch):
    """4 optimizer steps, 2 accumulation steps each, batches generated for 2 slices and reused
    for 2 iterations: 2 generated batches, each weighed once, each row in 2 loss calls."""
    policy, _ = sharpening_task
    trainer, weighed, losses = recorded_run(
        policy, tmp_path, monkeypatch, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        steps_per_generation=2, num_iterations=2, max_steps=4,
    )  # fmt: skip
    assert len(weighed) == 2 and all(len(b) == 8 for b in weighed)  # 4 x 2 rows per generation
    assert len(losses) == 8 and trainer.state.global_step == 4
    assert all("old_per_token_logps" in inputs for inputs in losses)  # reused batches are off-policy
    check_losses_saw_the_weights(weighed, losses, uses=2)


@pytest.mark.slow
def test_a_lora_adapter_is_weighed_with_the_adapted_policy(sharpening_task, tmp_path, monkeypatch):
    """Under PEFT the scorer runs the adapted model; a fresh adapter is the base model, so the
    first batch's weights are those of the base policy, computed alone."""
    from peft import LoraConfig

    from cfiw_cli import modeling
    from cfiw_cli.integrations.trl import batch_tables, token_weights_of

    policy, _ = sharpening_task
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, weighed, losses = recorded_run(
        policy, tmp_path, monkeypatch, peft_config=lora, per_device_train_batch_size=8, max_steps=2,
        num_iterations=1,
    )  # fmt: skip
    assert type(trainer.model).__name__.startswith("Peft") and len(weighed) == 2
    check_losses_saw_the_weights(weighed, losses, uses=1)
    first = weighed[0]
    model = modeling.load_model(str(policy), "float32").eval()
    tokenizer = modeling.load_tokenizer(str(policy))
    stops = [bool(c) and c[-1] == tokenizer.eos_token_id for _, c, _ in first]
    table = batch_tables(
        [p for p, _, _ in first], [c for _, c, _ in first], stops,
        [f"r{i}" for i in range(len(first))], [f"g{i // 4}" for i in range(len(first))],
    )  # fmt: skip
    alone = token_weights_of(CFIWConfig(), model, tokenizer, table)
    assert any(w != 1.0 for _, _, weights in first for w in weights)
    for (_, _, weights), expected in zip(first, alone, strict=True):
        assert max((abs(a - b) for a, b in zip(weights, expected, strict=True)), default=0) < 1e-5


@pytest.mark.slow
def test_continuous_batching_generation_is_weighed(sharpening_task, tmp_path, monkeypatch):
    """TRL's transformers-paged (continuous batching) generation: the batch it samples is weighed
    and the loss sees the weights."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5"):
        pytest.skip("transformers 4.x sizes its continuous-batching cache from CUDA memory: it cannot run on a CPU")
    policy, _ = sharpening_task
    _, weighed, losses = recorded_run(
        policy, tmp_path, monkeypatch, use_transformers_paged=True, per_device_train_batch_size=8, max_steps=1,
    )  # fmt: skip
    assert len(weighed) == 1 and len(weighed[0]) == 8
    check_losses_saw_the_weights(weighed, losses, uses=1)


def test_an_old_trl_is_refused_with_one_line(monkeypatch):
    import trl

    from cfiw_cli.errors import CfiwError
    from cfiw_cli.integrations import trl as integration

    monkeypatch.setattr(trl, "__version__", "0.25.0")
    with pytest.raises(CfiwError, match=r"TRL 0\.25\.0 cannot take per-token advantages") as caught:
        integration._trainer_class()
    assert "trl>=0.26.0" in caught.value.hint


@pytest.mark.slow
def test_what_cannot_work_is_refused_when_the_trainer_is_built(sharpening_task, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    from cfiw_cli.errors import CfiwError
    from cfiw_cli.integrations.trl import CFIWGRPOTrainer

    policy, _ = sharpening_task
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      report_to="none", use_cpu=True, bf16=False)  # fmt: skip
    build = lambda data, cfiw: CFIWGRPOTrainer(  # noqa: E731
        model=str(policy), reward_funcs=reward, args=args, train_dataset=data, cfiw=cfiw
    )
    no_gold = Dataset.from_list([{"prompt": PROMPT}] * 8)
    with pytest.raises(CfiwError, match="no 'gold' or 'answer' column"):
        build(no_gold, CFIWConfig(target="gold"))
    (tmp_path / "taken").write_text("")
    with pytest.raises(CfiwError, match="is a file"):
        build(no_gold, CFIWConfig(log_dir=str(tmp_path / "taken")))
    assert build(no_gold, CFIWConfig()).cfiw.target == "own"  # the model's own answer needs no gold
