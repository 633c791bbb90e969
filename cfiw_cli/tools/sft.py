"""`cfiw sft`: a supervised warm start on a dataset's reference solutions, with TRL's `SFTTrainer`.

Each example is a prompt-completion pair: the prompt is exactly what `cfiw rollout` sends
(`build_prompt`: instruction, chat template), the completion is the dataset's `answer`, and
TRL appends the EOS token and computes the loss on completion tokens only. The checkpoint
(model + tokenizer + `cfiw_manifest.json` with the loss curve) is written as `<out>.tmp`
and renamed, and holds no optimizer state: the RL run that follows starts its own. With
`--lora-r` only LoRA adapters are trained and saved (see `cfiw_cli.adapters`).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

from cfiw_cli import adapters, modeling
from cfiw_cli.configs import TRACKING_FIELDS, SftConfig
from cfiw_cli.console import info, progress_bar
from cfiw_cli.errors import CfiwError
from cfiw_cli.stage import StageResult, StageRun, guard_tracking_dir
from cfiw_cli.tasks.gsm8k import build_prompt, load_questions
from cfiw_cli.tracking import Tracker, beside_output, check_report_to, prefixed


def examples(rows: list[dict], tokenizer: Any, template: str | None, chat: bool) -> list[dict[str, str]]:
    """Prompt-completion pairs with the prompt `cfiw rollout` would send for each question."""

    return [
        {"prompt": build_prompt(row["question"], tokenizer, template, chat), "completion": row["answer"]}
        for row in rows
    ]


def _progress_callback(advance: Any, tracker: Tracker | None = None) -> Any:
    """The progress bar, and each logged loss and learning rate to `tracker` (live curves)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            advance(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                advance(0, status=f"loss {logs['loss']:.3f}")
            if logs and tracker is not None:
                tracker.log(prefixed("sft", logs), state.global_step)

    return Progress()


def _sft_arguments(config: SftConfig, output_dir: str, bf16: bool, cpu: bool) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_schedule,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        completion_only_loss=True,
        gradient_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        use_cpu=cpu,
        logging_steps=max(1, config.steps // 50),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def check(config: SftConfig) -> None:
    """What needs the environment: the tracker's library. The fields' own limits and the rules
    that tie them together are checked when the config is built."""
    check_report_to(config.report_to)


def run(config: SftConfig, force: bool = False) -> StageResult:
    check(config)
    inputs = {"model": config.model, "dataset": config.dataset}
    guard_tracking_dir(config, inputs)
    modeling.check_model_ref(config.model)
    with modeling.pinned_revisions():  # a hub id is resolved once, before the dataset loads
        modeling.resolve_revision(config.model, config.revision)
        rows = load_questions(config.dataset, config.split, config.offset, config.limit)
        with StageRun(
            "sft", config, inputs, force=force, revision=config.revision, directory=True, exclude=TRACKING_FIELDS
        ) as stage:
            if stage.up_to_date:
                return stage.skipped()
            return _fine_tune(config, stage, rows)


def _fine_tune(config: SftConfig, stage: StageRun, rows: list[dict]) -> StageResult:
    import datasets  # only now: an up-to-date warm start needs neither datasets nor TRL
    import torch
    from transformers import PrinterCallback
    from trl import SFTTrainer

    modeling.quiet_libraries()
    dev = modeling.device()
    tokenizer = modeling.load_tokenizer(config.model, stage.commit)
    pairs = examples(rows, tokenizer, config.prompt_template, config.chat_template)
    longest_prompt = max(len(tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]) for pair in pairs)
    if longest_prompt >= config.max_length:
        raise CfiwError(
            f"--max-length {config.max_length} leaves no solution token after the longest prompt "
            f"({longest_prompt} tokens)",
            f"pass a --max-length above {longest_prompt}, e.g. {longest_prompt + 512}",
        )
    train_set = datasets.Dataset.from_list(pairs)
    # Weights stay float32 (the optimizer's master copy); on a bf16 GPU the forward runs in bf16.
    bf16 = modeling.resolve_dtype(config.dtype, dev) == torch.bfloat16
    model = modeling.load_model(config.model, "float32", dev, stage.commit)
    model = adapters.for_training(model, adapters.LoraSettings.of(config), config.model, stage.commit)
    with (
        tempfile.TemporaryDirectory(prefix="cfiw-sft-") as scratch,
        progress_bar("sft", total=config.steps, unit="steps") as advance,
    ):
        with warnings.catch_warnings():  # TRL still passes the argument transformers renamed
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated")
            args = _sft_arguments(config, scratch, bf16, dev.type == "cpu")
        tracker = beside_output(config)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            processing_class=tokenizer,
            callbacks=[_progress_callback(advance, tracker)],
        )
        trainer.remove_callback(PrinterCallback)  # our progress bar shows the loss; logs stay in the manifest
        result = trainer.train()
        if tracker is not None:
            tracker.close()
    history = [
        {"step": entry["step"], "loss": entry["loss"], "lr": entry.get("learning_rate")}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    seconds = stage.seconds
    metrics = {
        "steps": config.steps,
        "examples": len(rows),
        "epochs": config.steps * config.batch_size / len(rows),
        "train_loss": result.training_loss,
        "final_loss": history[-1]["loss"] if history else None,
        "loss_curve": history,
    }
    manifest = stage.manifest(
        rows=len(rows), metrics=metrics, device=modeling.describe_device(dev), seed=config.seed,
        dtype="bfloat16" if bf16 else "float32",  # of the forward pass; the saved weights are float32
    )  # fmt: skip

    def fill(staging: Path) -> None:
        adapters.save(trainer.model, staging)
        tokenizer.save_pretrained(staging)

    result = stage.write_directory(fill, manifest)
    info(
        f"fine-tuned {config.model} for {config.steps} steps on {len(rows)} solutions in {seconds:.0f}s: final "
        f"loss {metrics['final_loss']:.4f}; saved {stage.out}"
    )
    return result
