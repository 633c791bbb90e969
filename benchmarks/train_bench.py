"""`cfiw train`: memory of the per-token log-prob path at a real vocabulary, and step time by weighting.

Part 1, memory (the claim: train never holds two full `[tokens, V]` fp32 tensors). One
micro-batch of real GSM8K text (prompt as `cfiw rollout` builds it + the reference solution +
EOS; generated arithmetic problems when ../shared is absent), a random-init Qwen2 model with
Qwen2.5's vocabulary of 151,936 and tied embeddings, one forward + backward of the clipped
loss at T = 0.7, two ways:
  naive    full logits, fp32 log_softmax, gather, entropy from exp(logp) * logp (train's old path)
  chunked  `cfiw_cli.logprobs.completion_logprobs`: LM head on chunks, checkpointed
Peak memory is that of the tensors alive during the step above what was alive before it (a
dispatch-mode tracker on CPU; torch.cuda.max_memory_allocated on a GPU). Both ways must give
the same loss (|diff| < 1e-5), entropy and gradients.

Part 2, time: `cfiw_cli.pipeline.train.run` in `uniform` and `cfiw` mode on the same batch of a
tiny model (the cost of the weights).

    python benchmarks/train_bench.py                 # numbers quoted in docs/performance.md
    python benchmarks/train_bench.py --vocab 151936  # part 1 at another vocabulary
    python benchmarks/train_bench.py --quick         # seconds; smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import tempfile
import time
import weakref
from pathlib import Path

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


class LivePeak:
    """Peak bytes of tensor storages created inside the block and still alive (CPU), or the
    CUDA allocator's peak above the memory allocated at entry."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        tracker = self
        live: dict[int, int] = {}
        current = [0]

        def free(key):
            current[0] -= live.pop(key, 0)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                        storage = tensor.untyped_storage()
                        key = storage.data_ptr()
                        if storage.nbytes() and key not in live:
                            live[key] = storage.nbytes()
                            current[0] += storage.nbytes()
                            tracker.peak = max(tracker.peak, current[0])
                            weakref.finalize(storage, free, key)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._mode.__exit__(*exc)
        return False


def naive_logprobs(model, sequences, pad_id, temperature, autocast):
    """Train's former path: `[B, C, V]` logits, their fp32 log-softmax, and entropy from both."""
    import torch

    device = next(model.parameters()).device
    width = max(len(t) for t, _ in sequences)
    longest = max(len(t) - p for t, p in sequences)
    ids = torch.tensor([[pad_id] * (width - len(t)) + t for t, _ in sequences], device=device)
    attention = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t, _ in sequences], device=device)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(
            input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=longest + 1
        ).logits
    logprobs_all = (logits[:, :-1].float() / temperature).log_softmax(-1)  # [B, C, V]
    targets = torch.zeros(len(sequences), longest, dtype=torch.long, device=device)
    for row, (tokens, prompt) in enumerate(sequences):
        targets[row, longest - (len(tokens) - prompt) :] = torch.tensor(tokens[prompt:], device=device)
    logprobs = logprobs_all.gather(2, targets[:, :, None]).squeeze(2)  # [B, C]
    with torch.no_grad():
        entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)  # [B, C]
    return logprobs, entropy


def micro_batch(tokenizer, tokens: int):
    """(prompt + completion ids, prompt length) per sequence until the completions hold `tokens` tokens."""
    from cfiw_cli.tasks.arith import make_problems
    from cfiw_cli.tasks.gsm8k import build_prompt

    if SHARED_GSM8K.exists():
        problems, source = [json.loads(line) for line in SHARED_GSM8K.read_text().splitlines()[:2000]], "GSM8K test"
    else:
        problems, source = make_problems(2000, seed=0, max_steps=3, filler_rate=0.5), "generated arithmetic"
    sequences, total = [], 0
    for problem in problems:
        prompt = tokenizer(build_prompt(problem["question"], tokenizer), add_special_tokens=False)["input_ids"]
        completion = tokenizer(problem["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append((prompt + completion, len(prompt)))
        total += len(completion)
        if total >= tokens:
            break
    return sequences, source


def memory_part(args, work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from cfiw_cli.algo.loss import LossConfig, loss_normalizer, policy_loss
    from cfiw_cli.logprobs import completion_logprobs
    from cfiw_cli.modeling import load_tokenizer
    from cfiw_cli.tools import tiny_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = device.type == "cuda"
    tokenizer = load_tokenizer(str(tiny_model.run(tiny_model.TinyModelConfig(out=str(work / "tokenizer-model"))).path))
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    sequences, source = micro_batch(tokenizer, args.tokens)
    completion_tokens = sum(len(t) - p for t, p in sequences)
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    head_share = 2 * args.vocab * args.hidden / (2 * args.vocab * args.hidden + 2 * body)
    longest = max(len(t) - p for t, p in sequences)
    generator = torch.Generator().manual_seed(1)
    advantages = torch.randn(len(sequences), generator=generator).to(device)  # [B]
    noise = 0.1 * torch.randn(len(sequences), longest, generator=generator).to(device)  # [B, C] a policy one step away
    mask = torch.zeros(len(sequences), longest, device=device)  # [B, C]
    for row, (tokens, prompt) in enumerate(sequences):
        mask[row, longest - (len(tokens) - prompt) :] = 1
    paths = {
        "naive": naive_logprobs,
        "chunked": lambda *a: completion_logprobs(*a[:4], want_entropy=True, autocast=a[4]),
    }
    results = {}
    for name, forward in paths.items():
        with torch.no_grad():
            old = (
                forward(model, sequences, tokenizer.pad_token_id, args.temperature, autocast)[0] + noise
            )  # ratios near 1, some clipped
        model.zero_grad(set_to_none=True)
        gc.collect()
        started = time.perf_counter()
        with LivePeak(device) as peak:
            logprobs, entropy = forward(model, sequences, tokenizer.pad_token_id, args.temperature, autocast)
            loss, _ = policy_loss(
                logprobs, old, advantages, mask, loss_normalizer(mask, "dapo", 0), config=LossConfig()
            )
            loss.backward()
            del logprobs
        seconds = time.perf_counter() - started
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results[name] = {
            "peak": peak.peak,
            "seconds": seconds,
            "loss": float(loss.detach()),
            "entropy": float((entropy * mask).sum() / mask.sum()),
            "grads": grads,
        }
        del loss, entropy, old
        model.zero_grad(set_to_none=True)
        gc.collect()
    naive, chunked = results["naive"], results["chunked"]
    grad_diff = max((naive["grads"][n] - chunked["grads"][n]).abs().max().item() for n in naive["grads"])
    grad_scale = max(g.abs().max().item() for g in naive["grads"].values())
    one_copy = completion_tokens * args.vocab * 4 / 2**20
    print(
        f"part 1: per-token log-probs, one micro-batch of {len(sequences)} sequences ({completion_tokens} "
        f"completion tokens of {source} text)"
    )
    print(
        f"  random-init Qwen2, vocabulary {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, tied "
        f"embeddings; LM head {100 * head_share:.0f}% of forward FLOPs; {device}"
    )
    print(f"  one [tokens, V] fp32 tensor: {one_copy:,.0f} MiB")
    print(f"  {'path':>8} {'peak MiB':>9} {'seconds':>8} {'loss':>12} {'entropy':>9}")
    for name, row in results.items():
        print(
            f"  {name:>8} {row['peak'] / 2**20:>9,.0f} {row['seconds']:>8.2f} {row['loss']:>12.7f} "
            f"{row['entropy']:>9.4f}"
        )
    print(
        f"  |loss diff| {abs(naive['loss'] - chunked['loss']):.2e}; max |grad diff| {grad_diff:.2e} (largest "
        f"gradient {grad_scale:.2e})"
    )
    print(
        f"  ratio naive / chunked peak memory: {naive['peak'] / chunked['peak']:.2f}x; time: "
        f"{chunked['seconds'] / naive['seconds']:.3f} of naive"
    )


def timing_part(args, work: Path) -> None:
    import pyarrow.parquet as pq
    import torch

    from cfiw_cli import guard
    from cfiw_cli.modeling import load_tokenizer
    from cfiw_cli.pipeline import score, segment, train
    from cfiw_cli.tools import tiny_model

    model = tiny_model.run(
        tiny_model.TinyModelConfig(out=str(work / "model"), layers=args.timing_layers, hidden=args.timing_hidden)
    ).path
    tokenizer = load_tokenizer(str(model))
    files = {name: str(work / "iter-0000" / f"{name}.parquet") for name in ("rollouts", "spans", "scores")}
    write_batch(Path(files["rollouts"]), tokenizer, args.questions, args.group)
    segment.run(segment.SegmentConfig(rollouts=files["rollouts"], model=str(model), out=files["spans"]))
    score.run(
        score.ScoreConfig(model=str(model), rollouts=files["rollouts"], spans=files["spans"], out=files["scores"])
    )

    def measure(mode: str) -> tuple[float, dict]:
        times, metrics = [], {}
        for repeat in range(args.repeats):
            config = train.TrainConfig(
                model=str(model),
                rollouts=files["rollouts"],
                spans=files["spans"],
                scores=files["scores"],
                weighting=mode,
                out=str(work / f"policy-{mode}"),
                lr=1e-5,
                minibatches=args.minibatches,
                seed=repeat,
                temperature=1.0,
                metrics_out=str(work / f"metrics-{mode}.parquet"),
            )
            guarded = guard.SECONDS["total"]
            started = time.perf_counter()
            metrics = train.run(config, force=True).metrics
            times.append(time.perf_counter() - started)
            steps = sum(pq.read_table(config.metrics_out).column("seconds").to_pylist())
            guard_shares.setdefault(mode, []).append((guard.SECONDS["total"] - guarded) / steps)
        return statistics.median(times), metrics

    guard_shares: dict[str, list[float]] = {}
    measure("uniform")  # warm-up
    guard_shares.clear()
    results = {mode: measure(mode) for mode in ("uniform", "cfiw")}
    print(
        f"part 2: cfiw train, torch {torch.__version__}, {torch.get_num_threads()} threads; model: "
        f"{args.timing_layers} layers, hidden {args.timing_hidden}"
    )
    print(
        f"  {args.questions} questions x G={args.group}, {args.minibatches} optimizer steps per run; median of "
        f"{args.repeats} runs"
    )
    print(f"  {'mode':>8} {'seconds':>8} {'tokens':>7} {'tokens/s':>9}")
    for mode, (seconds, metrics) in results.items():
        print(f"  {mode:>8} {seconds:>8.2f} {metrics['tokens']:>7} {metrics['tokens'] / seconds:>9.1f}")
    ratio = results["cfiw"][0] / results["uniform"][0]
    print(f"  ratio cfiw / uniform step time: {ratio:.3f} (weights add {100 * (ratio - 1):+.1f}%)")
    for mode, shares in guard_shares.items():  # the non-finite checks (cfiw_cli.guard) against the steps' time
        print(f"  {mode}: the non-finite guard took {statistics.median(shares):.2%} of the optimizer steps' time")


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
                    "rollout_id": f"0:q-{q}:{sample}",
                    "iteration": 0,
                    "prompt_id": f"q-{q}",
                    "sample_idx": sample,
                    "question": problem["question"],
                    "gold": parse_gold(problem["answer"]),
                    "prompt_text": prompt,
                    "completion_text": problem["answer"],
                    "prompt_ids": prompt_ids,
                    "completion_ids": completion_ids,
                    "completion_logprobs": [0.0] * len(completion_ids),
                    "finish_reason": "stop",
                    "pred": parse_gold(problem["answer"]),
                    "reward": 1.0 if correct else 0.0,
                    "correct": correct,
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROLLOUTS), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936, help="part 1: vocabulary of the model")
    parser.add_argument("--tokens", type=int, default=2048, help="part 1: completion tokens in the micro-batch")
    parser.add_argument("--hidden", type=int, default=256, help="part 1: hidden size")
    parser.add_argument("--layers", type=int, default=2, help="part 1: layers")
    parser.add_argument("--temperature", type=float, default=0.7, help="part 1: sampling temperature of the log-probs")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--timing-layers", type=int, default=4)
    parser.add_argument("--timing-hidden", type=int, default=128)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.tokens, args.hidden = min(args.vocab, 16384), 256, 128
        args.questions, args.group, args.timing_layers, args.timing_hidden, args.minibatches, args.repeats = (
            4,
            2,
            2,
            64,
            2,
            1,
        )

    from cfiw_cli.modeling import quiet_libraries

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="cfiw-train-bench-"))
    memory_part(args, work)
    timing_part(args, work)
    print(f"peak memory (max RSS of this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
