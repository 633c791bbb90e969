"""CFIW's cost inside TRL: the share of a GRPOTrainer step spent segmenting and scoring.

A warm tiny policy (a random-init Qwen2, 2 layers, hidden 64, then 150 SFT steps on
"a + b = d. #### d" solutions, so its completions have calculation and answer spans) trains
with TRL for --steps optimizer steps three ways from the same seed: stock `GRPOTrainer`,
stock with `top_entropy_quantile=0.2` (TRL's own token selection, the second reference), and
`CFIWGRPOTrainer` in cfiw mode. Prints each one's median step time, the seconds CFIW spent
weighing (segment + exact scoring + weights, timed around `weigh`) and that as a
share of its step, and the ratio of CFIW's step to stock's.

    python benchmarks/trl_bench.py            # 8 questions x G=8, 48 new tokens, 16 steps
    python benchmarks/trl_bench.py --quick    # smaller, for smoke tests
    python benchmarks/trl_bench.py --shape qwen-0.5b --device cuda   # on a GPU, in bf16

`--shape qwen-0.5b` builds the policy with Qwen2.5-0.5B's layer sizes and padded vocabulary
(24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864, 151,936 embedding rows), randomly
initialised and warm-started by the same SFT, so the scorer and TRL's step run at real shape.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

QUESTION = "Tom has 1 apple and gets 2 more. How many apples does Tom have?"


SHAPES = {
    "tiny": {"vocab_size": 300},
    "qwen-0.5b": {"vocab_size": 300, "pad_vocab": 151_936, "layers": 24, "hidden": 896, "heads": 14, "kv_heads": 2,
                  "intermediate": 4864},
}  # fmt: skip


def warm_policy(work: Path, sft_steps: int, shape: str) -> Path:
    from cfiw_cli.configs import SftConfig, TinyModelConfig
    from cfiw_cli.tools import sft, tiny_model

    rng = random.Random(0)
    rows = []
    for _ in range(400):
        total = rng.randint(2, 8)
        first = rng.randint(1, total - 1)
        rows.append({"question": QUESTION, "answer": f"{first} + {total - first} = {total}.\n#### {total}"})
    (work / "warm").mkdir(parents=True)
    (work / "warm" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = tiny_model.run(
        TinyModelConfig(out=str(work / "base"), dataset=str(work / "warm" / "train.jsonl"), **SHAPES[shape])
    ).path
    sft.run(SftConfig(model=str(base), dataset=str(work / "warm"), out=str(work / "policy"), steps=sft_steps,
                      lr=3e-3, batch_size=16))  # fmt: skip
    return work / "policy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda trains in bf16")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.group_size, args.max_new_tokens, args.steps, args.sft_steps = 2, 4, 24, 2, 60

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cfiw_cli.integrations import trl as integration
    from cfiw_cli.tasks.gsm8k import reward

    work = Path(tempfile.mkdtemp(prefix="cfiw-trl-bench-"))
    policy = warm_policy(work, args.sft_steps, args.shape)
    on_gpu = args.device == "cuda"
    tokenizer = integration.load_tokenizer(str(policy))
    data = Dataset.from_list([{"prompt": QUESTION, "gold": "3"}] * (args.questions * (args.steps + 1)))

    def correct(completions, gold, **_):
        return [reward(text, answer) for text, answer in zip(completions, gold, strict=True)]

    weighing: list[float] = []
    timed = integration.weigh

    def weigh(*a, **k):
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            return timed(*a, **k)
        finally:
            if on_gpu:
                torch.cuda.synchronize()
            weighing.append(time.perf_counter() - started)

    integration.weigh = weigh

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], None

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)

    def train(trainer_class, name: str, **extra) -> tuple[float, float]:
        weighing.clear()
        clock = StepClock()
        config = GRPOConfig(
            output_dir=str(work / name), max_steps=args.steps, num_generations=args.group_size,
            per_device_train_batch_size=args.questions * args.group_size, max_completion_length=args.max_new_tokens,
            temperature=1.0, learning_rate=1e-4, report_to="none", save_strategy="no", use_cpu=not on_gpu, seed=0,
            bf16=on_gpu, logging_steps=10_000, disable_tqdm=True, **extra.pop("grpo", {}),
        )  # fmt: skip
        trainer = trainer_class(
            model=str(policy), reward_funcs=correct, args=config, train_dataset=data, processing_class=tokenizer,
            callbacks=[clock], **extra,
        )  # fmt: skip
        trainer.train()
        steps = clock.seconds[1:] or clock.seconds  # the first step also warms up
        return statistics.median(steps), sum(weighing[1:] or weighing) / max(len(steps), 1)

    card = torch.cuda.get_device_name() if on_gpu else f"cpu, torch threads: {torch.get_num_threads()}"
    print(f"device: {card}, policy shape: {args.shape}, dtype: {'bfloat16' if on_gpu else 'float32'}")
    print(f"{args.questions} questions x G={args.group_size}, up to {args.max_new_tokens} new tokens, "
          f"{args.steps} steps (the first left out); median step seconds")  # fmt: skip
    print(f"{'trainer':>36} {'step s':>8} {'weighing s':>11} {'share':>7} {'vs stock':>9}")
    train(GRPOTrainer, "warm-up")  # the first trainer in a process pays one-off costs: none of the three does
    stock, _ = train(GRPOTrainer, "stock")
    rows = [("GRPOTrainer (stock)", stock, 0.0)]
    entropy, _ = train(GRPOTrainer, "entropy", grpo={"top_entropy_quantile": 0.2})
    rows.append(("GRPOTrainer, top_entropy_quantile 0.2", entropy, 0.0))
    cfiw, weighed = train(integration.CFIWGRPOTrainer, "cfiw", cfiw=integration.CFIWConfig(weighting="cfiw"))
    rows.append(("CFIWGRPOTrainer (cfiw)", cfiw, weighed))
    for name, seconds, weigh in rows:
        print(f"{name:>36} {seconds:>8.3f} {weigh:>11.3f} {weigh / seconds:>6.1%} {seconds / stock:>8.2f}x")
    print(f"ratio cfiw step / stock step: {cfiw / stock:.2f}; weighing share of the cfiw step: {weighed / cfiw:.1%}")


if __name__ == "__main__":
    main()
