"""Training throughput of `cfiw train`, and what importance weighting adds to a step.

Builds a tiny model and a batch of rollouts (GSM8K-format arithmetic solutions, half of them
marked wrong so every group has a learning signal), segments and scores it, then times
`cfiw_cli.stages.train.run` in `uniform` mode (plain DAPO) and in `cfiw` mode on the same
batch. Prints training tokens/s, peak memory, and the cfiw/uniform time ratio.

    python benchmarks/train_bench.py           # numbers quoted in the README
    python benchmarks/train_bench.py --quick   # seconds; smoke test
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path


def write_batch(path: Path, tokenizer, questions: int, group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cfiw_cli.schemas import ROLLOUTS
    from cfiw_cli.tasks.arith import make_problems
    from cfiw_cli.tasks.gsm8k import build_prompt, parse_gold

    rows = []
    for q, problem in enumerate(make_problems(questions, seed=0, max_steps=3, filler_rate=0.5)):
        prompt = build_prompt(problem["question"], tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(problem["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for sample in range(group):
            correct = sample % 2 == 0
            rows.append(
                {
                    "rollout_id": f"0:q-{q}:{sample}", "iteration": 0, "prompt_id": f"q-{q}", "sample_idx": sample,
                    "question": problem["question"], "gold": parse_gold(problem["answer"]), "prompt_text": prompt,
                    "completion_text": problem["answer"], "prompt_ids": prompt_ids, "completion_ids": completion_ids,
                    "completion_logprobs": [0.0] * len(completion_ids), "finish_reason": "stop",
                    "pred": parse_gold(problem["answer"]), "reward": 1.0 if correct else 0.0, "correct": correct,
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROLLOUTS), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.group, args.layers, args.hidden, args.minibatches, args.repeats = 4, 2, 2, 64, 2, 1

    import torch

    from cfiw_cli.modeling import load_tokenizer
    from cfiw_cli.stages import score, segment, tiny_model, train

    work = Path(tempfile.mkdtemp(prefix="cfiw-train-bench-"))
    model = tiny_model.run(tiny_model.TinyModelConfig(out=str(work / "model"), layers=args.layers, hidden=args.hidden))
    tokenizer = load_tokenizer(str(model))
    files = {name: str(work / "iter-0000" / f"{name}.parquet") for name in ("rollouts", "spans", "scores")}
    write_batch(Path(files["rollouts"]), tokenizer, args.questions, args.group)
    segment.run(segment.SegmentConfig(rollouts=files["rollouts"], model=str(model), out=files["spans"]))
    score.run(score.ScoreConfig(model=str(model), rollouts=files["rollouts"], spans=files["spans"], out=files["scores"]))

    def measure(mode: str) -> tuple[float, dict]:
        times, metrics = [], {}
        for repeat in range(args.repeats):
            config = train.TrainConfig(
                model=str(model), rollouts=files["rollouts"], spans=files["spans"], scores=files["scores"], weighting=mode,
                out=str(work / f"policy-{mode}"), lr=1e-5, minibatches=args.minibatches, seed=repeat,
            )
            started = time.perf_counter()
            metrics = train.run(config, force=True).metrics
            times.append(time.perf_counter() - started)
        return statistics.median(times), metrics

    measure("uniform")  # warm-up
    results = {mode: measure(mode) for mode in ("uniform", "cfiw")}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; model: {args.layers} layers, hidden {args.hidden}")
    print(f"{args.questions} questions x G={args.group}, {args.minibatches} optimizer steps per run; median of {args.repeats} runs")
    print(f"{'mode':>8} {'seconds':>8} {'tokens':>7} {'tokens/s':>9}")
    for mode, (seconds, metrics) in results.items():
        print(f"{mode:>8} {seconds:>8.2f} {metrics['tokens']:>7} {metrics['tokens'] / seconds:>9.1f}")
    print(f"peak memory (max RSS of this process): {peak_mb:.0f} MB")
    ratio = results["cfiw"][0] / results["uniform"][0]
    print(f"ratio cfiw / uniform step time: {ratio:.3f} (weights add {100 * (ratio - 1):+.1f}%)")


if __name__ == "__main__":
    main()
