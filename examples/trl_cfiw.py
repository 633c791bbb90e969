"""GRPO with TRL, each token's advantage weighted by counterfactual importance.

    python examples/trl_cfiw.py MODEL_DIR DATASET_DIR     # e.g. runs/tiny-sft data/arith

Any TRL setting works as usual (vLLM, DeepSpeed, PEFT, several processes): only the trainer
class and its `cfiw` settings are cfiw's.
"""

import sys

import torch
from datasets import Dataset
from trl import GRPOConfig

from cfiw_cli.integrations.trl import CFIWConfig, CFIWGRPOTrainer, load_tokenizer
from cfiw_cli.tasks.gsm8k import build_prompt, load_questions, reward

model, data = sys.argv[1], sys.argv[2]
tokenizer = load_tokenizer(model)
rows = load_questions(data, "train", limit=64)
dataset = Dataset.from_list([{"prompt": build_prompt(r["question"], tokenizer), "gold": r["gold"]} for r in rows])


def correct(completions, gold, **_):
    """1 when the completion's final number is the gold answer."""
    return [reward(text, answer) for text, answer in zip(completions, gold, strict=True)]


trainer = CFIWGRPOTrainer(
    model=model,
    reward_funcs=correct,
    args=GRPOConfig(
        output_dir="runs/trl-example",
        max_steps=4,
        num_generations=8,
        per_device_train_batch_size=32,
        max_completion_length=96,
        temperature=0.7,
        learning_rate=5e-5,
        report_to="none",
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
    ),
    train_dataset=dataset,
    processing_class=tokenizer,
    # cfiw train's settings and defaults; each batch is logged for `cfiw sql runs/trl-example`
    cfiw=CFIWConfig(weighting="cfiw", importance_floor=0.5, log_dir="runs/trl-example"),
)
trainer.train()
trainer.save_model("runs/trl-example")
