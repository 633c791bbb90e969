"""Span scoring: `cfiw score`'s algorithm against two naive ways, on the same model in one run.

64 synthetic rollouts (8 prompts x G=8, prompt ~100 tokens, reasoning ~300 tokens cut into 10
spans, answer ~5 tokens) on a random-init Qwen2 model (4 layers, hidden 256, vocab 8192,
float32). For each mask mode it times

  (a) one full forward pass per variant (the unmasked sequence and one per span), batch 1;
  (b) all variants padded to full length, 8 per forward call;
  (c) `cfiw_cli.algo.importance.score_items` (prefix KV cache reuse, packed suffixes,
      logits at answer positions only);

checks that (c) equals (a) within 1e-4, and prints the ratios (a)/(c) and (b)/(c), plus the
tokens (c) ran against the lower bound `T + sum_k (T - e_k)`.

    python benchmarks/score_bench.py               # the numbers quoted in the README
    python benchmarks/score_bench.py --quick       # seconds; smoke test
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def make_items(args):
    from cfiw_cli.algo.importance import ScoringItem

    rng = random.Random(0)
    items = []
    for _ in range(args.prompts):
        prompt_len = rng.randint(int(args.prompt * 0.9), int(args.prompt * 1.1))
        prompt = [rng.randrange(10, args.vocab) for _ in range(prompt_len)]
        for _ in range(args.group):
            reasoning = rng.randint(int(args.reasoning * 0.93), int(args.reasoning * 1.07))
            answer = rng.randint(args.answer - 1, args.answer + 1)
            tokens = prompt + [rng.randrange(10, args.vocab) for _ in range(reasoning + answer)]
            edges = [prompt_len + round(k * reasoning / args.spans) for k in range(args.spans + 1)]
            spans = [(edges[k], edges[k + 1]) for k in range(args.spans)]
            items.append(ScoringItem(tokens, prompt_len + reasoning, spans, prompt_length=prompt_len))
    return items


def variant_sequences(item, mode, pad_id):
    """(tokens, target_start, knocked-out span or None) of the unmasked sequence and each variant."""
    x, a = item.tokens, item.target_start
    out = [(x, a, None)]
    for b, e in item.spans:
        if mode == "pad":
            out.append((x[:b] + [pad_id] * (e - b) + x[e:], a, None))
        elif mode == "delete":
            out.append((x[:b] + x[e:], a - (e - b), None))
        else:
            out.append((x, a, (b, e)))
    return out


def padded_batches(model, items, mode, pad_id, batch_size=8):
    """(b): every variant at full length, right-padded, `batch_size` per forward call."""
    import torch

    variants = [v for item in items for v in variant_sequences(item, mode, pad_id)]
    dtype = next(model.parameters()).dtype
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(variants), batch_size):
            batch = variants[start : start + batch_size]
            width = max(len(t) for t, _, _ in batch)
            ids = torch.tensor([t + [pad_id] * (width - len(t)) for t, _, _ in batch])  # [B, L]
            if mode == "knockout":
                allowed = torch.ones(len(batch), width, width, dtype=torch.bool).tril()  # [B, L, L]
                for row, (t, _, span) in enumerate(batch):
                    if span is not None:
                        allowed[row, span[1] :, span[0] : span[1]] = False
                    allowed[row, :, len(t) :] = False
                mask = torch.zeros(len(batch), 1, width, width, dtype=dtype).masked_fill(
                    ~allowed[:, None], torch.finfo(dtype).min
                )
            else:
                mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t, _, _ in batch])  # [B, L]
            logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # [B, L, V]
            for row, (t, a, _) in enumerate(batch):
                total += float(logprobs[row, torch.arange(a - 1, len(t) - 1), torch.tensor(t[a:])].sum())
    return total


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8, help="rollouts per prompt (G)")
    parser.add_argument("--prompt", type=int, default=100)
    parser.add_argument("--reasoning", type=int, default=300)
    parser.add_argument("--spans", type=int, default=10)
    parser.add_argument("--answer", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="runs of (b) and (c); the median is reported")
    parser.add_argument("--naive-repeats", type=int, default=1, help="runs of (a), the slowest")
    parser.add_argument("--modes", default="pad,delete,knockout")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.group, args.prompt, args.reasoning, args.spans = 2, 2, 20, 40, 3
        args.layers, args.hidden, args.vocab, args.repeats = 2, 64, 512, 1

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from cfiw_cli.algo.importance import lower_bound_tokens, naive_scores, score_items

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64 or 1,
        num_key_value_heads=max((args.hidden // 64) // 2, 1),
        max_position_embeddings=2048,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    items = make_items(args)
    pad_id = 0
    bound = sum(lower_bound_tokens(item) for item in items)
    naive_tokens = sum(len(item.tokens) * (len(item.spans) + 1) for item in items)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; model: {args.layers} layers, hidden "
        f"{args.hidden}, vocab {args.vocab}, float32"
    )
    print(
        f"{len(items)} rollouts ({args.prompts} prompts x G={args.group}), ~{args.prompt} prompt + "
        f"~{args.reasoning} reasoning "
        f"tokens in {args.spans} spans + ~{args.answer} answer tokens; (b), (c): median of {args.repeats}, (a): "
        f"median of {args.naive_repeats}"
    )
    ratios = []
    print(
        f"{'mask':>9} {'(a) s':>8} {'(b) s':>8} {'(c) s':>8} {'(a)/(c)':>8} {'(b)/(c)':>8} {'(c) tokens':>11} "
        f"{'bound':>8} {'naive':>8} {'max |diff|':>10}"
    )
    for mode in args.modes.split(","):
        stats: dict = {}
        c_seconds, fast = timed(
            lambda mode=mode: score_items(model, items, mode, pad_id, batch_tokens=args.batch_tokens), args.repeats
        )
        score_items(model, items, mode, pad_id, batch_tokens=args.batch_tokens, stats=stats)
        b_seconds, _ = timed(lambda mode=mode: padded_batches(model, items, mode, pad_id), args.repeats)
        a_seconds, naive = timed(
            lambda mode=mode: [naive_scores(model, item, mode, pad_id) for item in items], args.naive_repeats
        )
        worst = max(
            max([abs(f.base - n.base)] + [abs(x - y) for x, y in zip(f.deltas, n.deltas, strict=True)])
            for f, n in zip(fast, naive, strict=True)
        )
        print(
            f"{mode:>9} {a_seconds:>8.2f} {b_seconds:>8.2f} {c_seconds:>8.2f} {a_seconds / c_seconds:>8.2f} "
            f"{b_seconds / c_seconds:>8.2f} {stats['tokens']:>11} {bound:>8} {naive_tokens:>8} {worst:>10.1e}"
        )
        assert worst < 1e-4, f"{mode}: fast and naive scores differ by {worst}"
        ratios.append(f"{mode} {a_seconds / c_seconds:.2f} / {b_seconds / c_seconds:.2f}")
    print("ratio (a)/(c) / (b)/(c): " + ", ".join(ratios))
    print(
        "(c) tokens: tokens run by cfiw (prompts once per group); bound: T + sum_k (T - e_k) per rollout; naive: "
        "(a)'s tokens"
    )


if __name__ == "__main__":
    main()
