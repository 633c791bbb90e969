"""`cfiw trl-train`: a TRL GRPO run with CFIW weights, built from a loop preset in one line.

The preset gives the model (`model.id`), the data (`data.dataset`, its train split) and the
settings; the reward is cfiw's own (the extracted answer equals the gold number). The prompts
are the ones `cfiw rollout` sends (the instruction, in the chat template when the tokenizer has
one). TRL's `GRPOConfig` takes the preset's sampling and update settings:

    rollout.group_size       -> num_generations
    rollout.max_new_tokens   -> max_completion_length
    rollout.temperature      -> temperature        rollout.top_p -> top_p
    loop.questions x G       -> generation_batch_size (one generation per optimizer step group)
    train.minibatches        -> steps_per_generation (each a per-device batch of questions x G / minibatches)
    train.lr, eps_low/high, beta, loss_type, grad_clip, mask_truncated
                             -> learning_rate, epsilon/epsilon_high, beta, loss_type, max_grad_norm,
                                mask_truncated_completions

and `CFIWConfig` takes the loop's weighting and profile and the train, score and segment
sections' CFIW settings. Each generated batch is logged in the output directory as a run's
iteration (`OUT/iter-NNNN/`), so `cfiw sql OUT` and `cfiw analyze OUT` read the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cfiw_cli.configs import RolloutConfig, TrainConfig
from cfiw_cli.errors import CfiwError
from cfiw_cli.integrations import trl as integration
from cfiw_cli.integrations.trl import CFIWConfig
from cfiw_cli.tasks.gsm8k import build_prompt, load_questions, reward

CFIW_SECTIONS = ("train", "score", "segment")


def cfiw_settings(config: dict[str, Any]) -> CFIWConfig:
    """The preset's CFIW settings: the loop's weighting and profile, the rest from its sections."""
    names = {f.name for f in dataclasses.fields(CFIWConfig)}
    chosen = {key: value for section in CFIW_SECTIONS for key, value in config.get(section, {}).items() if key in names}
    loop = config.get("loop", {})
    chosen |= {key: loop[key] for key in ("weighting", "profile", "seed") if key in loop}
    return CFIWConfig(**chosen)


def grpo_settings(config: dict[str, Any], out: str, steps: int, use_cpu: bool) -> dict[str, Any]:
    """GRPOConfig's keyword arguments from the preset (see the module's docstring)."""
    rollout = RolloutConfig(model="m", dataset="d", out="o", **config.get("rollout", {}))
    train_section = {k: v for k, v in config.get("train", {}).items() if k in TrainConfig.__dataclass_fields__}
    train = TrainConfig(model="m", rollouts="r", out="o", weighting="uniform", **train_section)
    questions = int(config.get("loop", {}).get("questions", 8))
    generation = questions * rollout.group_size
    if generation % train.minibatches:
        raise CfiwError(
            f"loop.questions x rollout.group_size ({generation}) is not a multiple of train.minibatches "
            f"({train.minibatches})",
            "choose sizes that divide",
        )
    return {
        "output_dir": out,
        "max_steps": steps,
        "num_generations": rollout.group_size,
        "max_completion_length": rollout.max_new_tokens,
        "temperature": max(rollout.temperature, 1e-6),
        "top_p": rollout.top_p,
        "generation_batch_size": generation,
        "per_device_train_batch_size": generation // train.minibatches,
        "learning_rate": train.lr,
        "epsilon": train.eps_low,
        "epsilon_high": train.eps_high,
        "beta": train.beta,
        "loss_type": train.loss_type,
        "max_grad_norm": train.grad_clip,
        "mask_truncated_completions": train.mask_truncated,
        "seed": train.seed,
        "use_cpu": use_cpu,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "bf16": False,
    }


def run(config: dict[str, Any], out: str, steps: int, use_cpu: bool) -> Any:
    """Train with `CFIWGRPOTrainer` for `steps` optimizer steps and save the policy in `out`."""
    from datasets import Dataset
    from trl import GRPOConfig

    model = str(config["model"]["id"])
    data = config["data"]
    tokenizer = integration.load_tokenizer(model)
    rollout = config.get("rollout", {})
    rows = load_questions(data["dataset"], data.get("train_split", "train"))
    template, chat = rollout.get("prompt_template"), rollout.get("chat_template", True)
    dataset = Dataset.from_list(
        [{"prompt": build_prompt(r["question"], tokenizer, template, chat), "gold": r["gold"]} for r in rows]
    )

    def correct(completions: list[str], gold: list[str], **_: Any) -> list[float]:
        return [reward(text, answer) for text, answer in zip(completions, gold, strict=True)]

    trainer = integration.CFIWGRPOTrainer(  # built on first use: importing this module does not import TRL
        model=model,
        reward_funcs=correct,
        args=GRPOConfig(**grpo_settings(config, out, steps, use_cpu)),
        train_dataset=dataset,
        processing_class=tokenizer,
        cfiw=dataclasses.replace(cfiw_settings(config), log_dir=out),
    )
    trainer.train()
    trainer.save_model(out)
    return trainer
