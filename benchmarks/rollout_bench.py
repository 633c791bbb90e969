"""Batched `cfiw rollout` against one sequence per `generate` call, on the same tiny model; then
the in-place KV cache against transformers' concatenating one.

Both go through `cfiw_cli.pipeline.rollout.run` with the model already loaded, so the ratio is
the gain of batching alone. Prints the median of --repeats runs for each batch size and the
speed-up of each over one-at-a-time.

The cache table samples --cache-questions x G=8 sequences in one batch, up to
--cache-new-tokens each (the testbed's shape: 256 sequences, completions of 150-300 tokens),
once with `cfiw_cli.kv_cache`'s growing cache and once with transformers' `DynamicCache`,
checks that both sample the same tokens and log-probs, and prints the ratio.

The backend table samples --questions x G sequences with each `--backend` (transformers'
`generate`, and its continuous batching), greedily and at temperature 1, and prints tokens/s,
the ratio to `generate`, and whether the two sampled the same tokens (greedy decoding should;
sampling draws from another random stream and does not).

    python benchmarks/rollout_bench.py            # defaults: 16 questions x G=4, 48 new tokens
    python benchmarks/rollout_bench.py --quick    # a few seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-questions", type=int, default=32)
    parser.add_argument("--cache-new-tokens", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.group_size, args.max_new_tokens, args.repeats = 4, 2, 8, 1
        args.layers, args.hidden, args.vocab_size = 2, 64, 512
        args.cache_questions, args.cache_new_tokens = 4, 80

    import torch

    from cfiw_cli.modeling import describe_device, device, load_model, load_tokenizer
    from cfiw_cli.pipeline import rollout
    from cfiw_cli.tasks.arith import make_problems
    from cfiw_cli.tools import tiny_model

    work = Path(tempfile.mkdtemp(prefix="cfiw-rollout-bench-"))
    model_dir = tiny_model.run(
        tiny_model.TinyModelConfig(
            out=str(work / "model"), layers=args.layers, hidden=args.hidden, vocab_size=args.vocab_size
        )
    ).path
    dataset = work / "questions.jsonl"
    rows = make_problems(max(args.questions, args.cache_questions), seed=0)
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir), "float32")
    sequences = args.questions * args.group_size

    def measure(
        batch_size: int, repeats: int, questions: int = args.questions, group: int = args.group_size,
        new_tokens: int = args.max_new_tokens, name: str = "r", backend: str = "generate", temperature: float = 1.0,
    ) -> tuple[float, int]:  # fmt: skip
        times, tokens = [], 0
        for repeat in range(repeats):
            config = rollout.RolloutConfig(
                model=str(model_dir),
                dataset=str(dataset),
                out=str(work / f"{name}-{batch_size}-{repeat}.parquet"),
                limit=questions,
                group_size=group,
                max_new_tokens=new_tokens,
                batch_size=batch_size,
                seed=repeat,
                backend=backend,
                temperature=temperature,
            )
            started = time.perf_counter()
            result = rollout.run(config, force=True, model=model, tokenizer=tokenizer)
            times.append(time.perf_counter() - started)
            tokens = result.metrics["completion_tokens"]
        return statistics.median(times), tokens

    print(f"device: {describe_device(device())}, torch threads: {torch.get_num_threads()}")
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab_size}; "
        f"{args.questions} questions x G={args.group_size} = {sequences} sequences, "
        f"up to {args.max_new_tokens} new tokens; median of {args.repeats}"
    )
    print(f"{'batch size':>10} {'seconds':>9} {'tokens':>7} {'tokens/s':>9} {'vs one-at-a-time':>17}")
    measure(sequences, 1)  # warm-up: first-call allocations are not part of either side
    baseline = None
    for batch_size in (1, args.group_size, sequences):
        seconds, tokens = measure(batch_size, args.repeats)
        rate = tokens / seconds
        baseline = baseline or rate
        print(f"{batch_size:>10} {seconds:>9.2f} {tokens:>7} {rate:>9.1f} {rate / baseline:>16.2f}x")
    print(f"ratio batched ({sequences}) / one at a time: {rate / baseline:.2f}")
    compare_caches(args, measure, work)
    compare_backends(args, measure, work)


def compare_caches(args, measure, work: Path) -> None:
    """The growing cache against transformers' own, on one batch of the testbed's shape."""
    import pyarrow.parquet as pq

    from cfiw_cli import generation

    sequences = args.cache_questions * 8
    growing = generation.growing_cache
    print(
        f"\nKV cache: {args.cache_questions} questions x G=8 = {sequences} sequences in one batch, "
        f"up to {args.cache_new_tokens} new tokens; median of {args.repeats}"
    )
    print(f"{'cache':>30} {'seconds':>9} {'tokens':>7} {'tokens/s':>9}")
    seconds, samples = {}, {}
    for name, label, make in (
        ("concatenating", "concatenating (DynamicCache)", lambda: None),
        ("in-place", "in place (cfiw_cli.kv_cache)", growing),
    ):
        generation.growing_cache = make
        try:
            shape = (args.cache_questions, 8, args.cache_new_tokens, name)
            measure(sequences, 1, *shape)  # warm-up
            seconds[name], tokens = measure(sequences, args.repeats, *shape)
        finally:
            generation.growing_cache = growing
        table = pq.read_table(work / f"{name}-{sequences}-0.parquet", columns=["completion_ids", "completion_logprobs"])
        samples[name] = table.to_pylist()
        print(f"{label:>30} {seconds[name]:>9.2f} {tokens:>7} {tokens / seconds[name]:>9.1f}")
    same = samples["concatenating"] == samples["in-place"]
    print(f"same tokens and log-probs, bit for bit: {same}")
    print(f"ratio concatenating / in place: {seconds['concatenating'] / seconds['in-place']:.2f}")
    if not same:
        raise SystemExit("the two caches sampled different completions")


def compare_backends(args, measure, work: Path) -> None:
    """Each sampling backend on the same batch, greedy and sampled."""
    import pyarrow.parquet as pq

    sequences = args.questions * args.group_size
    print(f"\nbackends: {args.questions} questions x G={args.group_size}, up to {args.max_new_tokens} new tokens, "
          f"batch {sequences}; median of {args.repeats}")  # fmt: skip
    print(f"{'backend':>12} {'temperature':>11} {'seconds':>9} {'tokens':>7} {'tokens/s':>9} {'vs generate':>11}")
    rates, tokens_of = {}, {}
    import transformers

    if not hasattr(transformers, "ContinuousBatchingConfig"):
        print(f"transformers {transformers.__version__} has no continuous batching: the generate backend only")
        print("ratio continuous / generate tokens/s, sampled: not measured")
        return
    for temperature in (0.0, 1.0):
        for backend in ("generate", "continuous"):
            name = f"{backend}-{temperature:g}"
            measure(sequences, 1, name=name, backend=backend, temperature=temperature)  # warm-up
            seconds, tokens = measure(sequences, args.repeats, name=name, backend=backend, temperature=temperature)
            rates[name] = tokens / seconds
            table = pq.read_table(work / f"{name}-{sequences}-0.parquet", columns=["completion_ids"])
            tokens_of[name] = table.column("completion_ids").to_pylist()
            ratio = rates[name] / rates[f"generate-{temperature:g}"]
            print(f"{backend:>12} {temperature:>11g} {seconds:>9.2f} {tokens:>7} {rates[name]:>9.1f} {ratio:>10.2f}x")
        same = tokens_of[f"generate-{temperature:g}"] == tokens_of[f"continuous-{temperature:g}"]
        print(f"{'':>12} {'':>11} same tokens as generate at temperature {temperature:g}: {same}")
    print(f"ratio continuous / generate tokens/s, sampled: {rates['continuous-1'] / rates['generate-1']:.2f}")


if __name__ == "__main__":
    main()
