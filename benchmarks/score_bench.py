"""Span scoring: `cfiw score`'s algorithm against two naive ways, on the same model in one run.

For each mask mode it times

  (a) one full forward pass per variant (the unmasked sequence and one per span), batch 1;
  (b) all variants padded to full length, 8 per forward call;
  (c) `cfiw_cli.algo.importance.score_items` (prefix KV cache reuse, packed suffixes,
      logits at answer positions only);

checks that (c) equals (a) within 1e-4 (fp32), and prints the ratios (a)/(c) and (b)/(c), plus
the tokens (c) ran against the lower bound `T + sum_k (T - e_k)`.

`--data synthetic` (default): 64 rollouts (8 prompts x G=8, prompt ~100 tokens, reasoning ~300
tokens cut into 10 equal spans, answer ~5 tokens), random tokens, vocabulary 8192. It favours
the method (spans tile the reasoning, every rollout of a group shares one prompt).

`--data real`: GSM8K reference solutions (`../shared/data/gsm8k/train.jsonl` when present, else
the project's `data/arith`) as completions of real prompts, G per prompt, cut into spans by the
`cfiw segment` code, scored with a `cfiw tiny-model` (4 layers, hidden 256) whose embedding is
padded to 4,096 rows (`--pad-vocab`), which gives the LM head Qwen2.5-0.5B's share of compute.
It also times the whole `cfiw score` process (model load included) and reports (c)'s tokens per
second as a fraction of (a)'s. `--device cuda` with `--shape qwen0.5b` builds a Qwen2.5-0.5B-
shaped random model instead and adds peak memory and the `cfiw rollout` time of the same
rollouts.

    python benchmarks/score_bench.py                      # the synthetic figures in docs/performance.md
    python benchmarks/score_bench.py --data real --group 4  # the real-text figures
    python benchmarks/score_bench.py --quick              # seconds; smoke test
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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
    dtype, dev = next(model.parameters()).dtype, next(model.parameters()).device
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
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits  # [B, L, V]
            for row, (t, a, _) in enumerate(batch):
                picked = logits[row, a - 1 : len(t) - 1].float().log_softmax(-1)  # [n, V]: one row at a time
                total += float(picked.gather(1, torch.tensor(t[a:], device=dev)[:, None]).sum())
    return total


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


ROOT = Path(__file__).resolve().parents[1]
SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def real_source(text: str | None) -> Path:
    if text:
        return Path(text)
    return SHARED_GSM8K if SHARED_GSM8K.exists() else ROOT / "data" / "arith" / "train.jsonl"


def build_real_workspace(args, work: Path) -> dict:
    """A model, and rollouts of real solutions cut into spans by the `segment` code."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cfiw_cli.configs import SegmentConfig, TinyModelConfig
    from cfiw_cli.modeling import load_tokenizer
    from cfiw_cli.pipeline import segment
    from cfiw_cli.schemas import ROLLOUTS
    from cfiw_cli.tasks.gsm8k import build_prompt, extract_answer, parse_gold, reward
    from cfiw_cli.tools import tiny_model

    source = real_source(args.text)
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows[:2000]))
    shape = dict(layers=args.layers, hidden=args.hidden, heads=max(args.hidden // 64, 1))
    shape["kv_heads"] = max(shape["heads"] // 2, 1)
    if args.shape == "qwen0.5b":
        shape = dict(layers=24, hidden=896, heads=14, kv_heads=2)
    model_dir = work / "model"
    tiny_model.run(
        TinyModelConfig(out=str(model_dir), dataset=str(corpus), pad_vocab=args.pad_vocab, max_positions=4096, **shape)
    )
    tokenizer = load_tokenizer(str(model_dir))
    records = []
    for p in range(args.prompts):
        question = rows[p]["question"]
        prompt_text = build_prompt(question, tokenizer)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        gold = parse_gold(rows[p]["answer"])
        for g in range(args.group):
            text = rows[(args.prompts + p * args.group + g) % len(rows)]["answer"]  # another question's solution
            completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            records.append(
                {
                    "rollout_id": f"0:q-{p}:{g}", "iteration": 0, "prompt_id": f"q-{p}", "sample_idx": g,
                    "question": question, "gold": gold, "prompt_text": prompt_text, "completion_text": text,
                    "prompt_ids": prompt_ids, "completion_ids": completion,
                    "completion_logprobs": [0.0] * len(completion),
                    "finish_reason": "stop", "pred": extract_answer(text), "reward": reward(text, gold),
                    "correct": reward(text, gold) == 1.0,
                }
            )  # fmt: skip
    rollouts = work / "rollouts.parquet"
    pq.write_table(pa.Table.from_pylist(records, schema=ROLLOUTS), rollouts)
    spans = work / "spans.parquet"
    segment.run(SegmentConfig(rollouts=str(rollouts), model=str(model_dir), out=str(spans)), tokenizer=tokenizer)
    return {"model": model_dir, "rollouts": rollouts, "spans": spans, "tokenizer": tokenizer, "source": source}


def real_items(space: dict) -> list:
    import pyarrow.parquet as pq

    from cfiw_cli.pipeline.score import build_items

    rollouts, spans = pq.read_table(space["rollouts"]), pq.read_table(space["spans"])
    return build_items(rollouts, spans, "own", space["tokenizer"])[2]


def timed_command(argv: list, cwd: Path | None = None) -> float:
    """Wall seconds of one new process running `argv`; its stderr ends the benchmark if it fails."""
    started = time.perf_counter()
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd)
    if done.returncode:
        raise SystemExit(done.stderr)
    return time.perf_counter() - started


def whole_process(space: dict, mode: str, dtype: str, work: Path) -> float:
    """Wall seconds of `cfiw score` as a user runs it: a new process, model load included."""
    argv = [
        sys.executable, "-m", "cfiw_cli", "score", "--model", space["model"], "--rollouts", space["rollouts"],
        "--spans", space["spans"], "--out", work / f"scores-{mode}.parquet", "--mask", mode, "--dtype", dtype,
        "--force",
    ]  # fmt: skip
    return timed_command(argv)


STARTUP = """
import sys, time
started = time.perf_counter()
import cfiw_cli.cli  # what `cfiw` imports before it parses the command line
from cfiw_cli import modeling
import torch
modeling.device()  # the process state every stage sets up
modeling.load_tokenizer(sys.argv[1])
model = modeling.load_model(sys.argv[1], sys.argv[2], torch.device(sys.argv[3]))
"""


def startup_floor(space: dict, dtype: str, device: str) -> float:
    """Wall seconds of a new process that only imports what `cfiw score` imports and loads the
    model and tokenizer: what any scoring command pays before it computes anything."""
    return timed_command([sys.executable, "-c", STARTUP, str(space["model"]), dtype, device], cwd=ROOT)


def fewest_tokens(items) -> int:
    """Each distinct prompt once, each rollout's completion once, and what follows each span:
    no exact scorer runs fewer tokens (`lower_bound_tokens` without prompts shared by a group)."""
    prompts = {tuple(item.tokens[: item.prompt_length]) for item in items}
    rest = 0
    for item in items:
        length = len(item.tokens) - 1  # the last target token is never an input
        rest += length - item.prompt_length + sum(length - min(e, length) for _, e in item.spans)
    return sum(len(p) for p in prompts) + rest


def gemm_floor_seconds(model, tokens: int, batch_tokens: int, sync) -> tuple[float, float]:
    """(seconds, FLOP/s): the matrix products an exact scorer cannot skip, on `tokens` tokens, at
    the speed this machine multiplies matrices of the model's shape (the MLP's up projection,
    `batch_tokens` rows). Every layer but the last runs in full at every position (later layers
    read all of it); the last layer needs only its key and value projections there (its other
    products matter at answer positions only, not counted, nor are attention and padding)."""
    import torch

    layers = model.model.layers
    needed = [m for m in layers[:-1].modules() if isinstance(m, torch.nn.Linear)]
    needed += [layers[-1].self_attn.k_proj, layers[-1].self_attn.v_proj]
    flops_per_token = 2 * sum(m.weight.numel() for m in needed)
    widest = max(needed, key=lambda m: m.weight.numel())
    x = torch.randn(batch_tokens, widest.in_features, dtype=widest.weight.dtype, device=widest.weight.device)
    with torch.inference_mode():
        seconds, _ = timed(lambda: (widest(x), sync()), 5)
    rate = 2 * batch_tokens * widest.weight.numel() / seconds
    return tokens * flops_per_token / rate, rate


def whole_rollout(space: dict, args, dtype: str, work: Path, max_new_tokens: int) -> float:
    """Wall seconds of `cfiw rollout` sampling the same number of rollouts of about the same length."""
    data = work / "questions.jsonl"
    rows = [json.loads(line) for line in space["source"].read_text().splitlines() if line.strip()][: args.prompts]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        sys.executable, "-m", "cfiw_cli", "rollout", "--model", space["model"], "--dataset", data,
        "--group-size", args.group, "--max-new-tokens", max_new_tokens, "--dtype", dtype,
        "--out", work / "sampled.parquet", "--force", "--batch-size", args.prompts * args.group,
    ]  # fmt: skip
    return timed_command(argv)


def real_main(args) -> None:
    import torch

    from cfiw_cli.algo.importance import lower_bound_tokens, naive_scores, score_items
    from cfiw_cli.modeling import load_model

    work = Path(tempfile.mkdtemp(prefix="cfiw-score-bench-"))
    space = build_real_workspace(args, work)
    items = real_items(space)
    dtype = "bfloat16" if args.dtype == "bf16" else "float32"
    device = torch.device(args.device)
    model = load_model(str(space["model"]), dtype, device)
    pad_id = space["tokenizer"].pad_token_id
    bound = sum(lower_bound_tokens(item) for item in items)
    naive_tokens = sum(len(item.tokens) * (len(item.spans) + 1) for item in items)
    completion = statistics.mean(len(i.tokens) - i.prompt_length for i in items)
    prompt = statistics.mean(i.prompt_length for i in items)
    spans = statistics.mean(len(i.spans) for i in items)
    rows = model.get_input_embeddings().num_embeddings
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; {dtype}")
    print(
        f"model: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, {rows:,} embedding rows"
        f" (tokenizer {len(space['tokenizer']):,}); text: {space['source'].name} ({space['source'].parent.name})"
    )
    print(
        f"{len(items)} scored rollouts ({args.prompts} prompts x G={args.group}): ~{prompt:.0f} prompt + "
        f"~{completion:.0f} completion tokens, {spans:.1f} reasoning spans each (cfiw segment); "
        f"(b), (c), process: median of {args.repeats}, (a): median of {args.naive_repeats}"
    )
    print(
        f"{'mask':>9} {'process s':>9} {'(a) s':>7} {'(b) s':>7} {'(c) s':>7} {'(a)/proc':>8} {'(b)/proc':>8} "
        f"{'(a)/(c)':>7} {'(b)/(c)':>7} {'(c) tokens':>10} {'padded':>7} {'bound':>7} {'(c)/(a) tok/s':>13} "
        f"{'max |diff|':>10}"
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    floors = []
    for mode in args.modes.split(","):
        stats: dict = {}
        score_items(model, items, mode, pad_id, batch_tokens=args.batch_tokens, stats=stats)  # warm-up, counts

        def fast(mode=mode):
            result = score_items(model, items, mode, pad_id, batch_tokens=args.batch_tokens)
            sync()
            return result

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        c_seconds, fast_scores = timed(fast, args.repeats)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        b_seconds, _ = timed(lambda mode=mode: (padded_batches(model, items, mode, pad_id), sync()), args.repeats)
        a_seconds, naive = timed(
            lambda mode=mode: ([naive_scores(model, item, mode, pad_id) for item in items], sync())[0],
            args.naive_repeats,
        )
        process = statistics.median(whole_process(space, mode, dtype, work) for _ in range(args.repeats))
        worst = max(
            max([abs(f.base - n.base)] + [abs(x - y) for x, y in zip(f.deltas, n.deltas, strict=True)])
            for f, n in zip(fast_scores, naive, strict=True)
        )
        throughput = (stats["tokens"] / c_seconds) / (naive_tokens / a_seconds)
        print(
            f"{mode:>9} {process:>9.2f} {a_seconds:>7.2f} {b_seconds:>7.2f} {c_seconds:>7.2f} "
            f"{a_seconds / process:>8.2f} {b_seconds / process:>8.2f} {a_seconds / c_seconds:>7.2f} "
            f"{b_seconds / c_seconds:>7.2f} {stats['tokens']:>10} {stats['padded_tokens']:>7} {bound:>7} "
            f"{throughput:>13.2f} {worst:>10.1e}" + (f"  peak {peak:.2f} GiB" if peak is not None else "")
        )
        if dtype == "float32":
            assert worst < 1e-4, f"{mode}: fast and naive scores differ by {worst}"
        floors.append((mode, a_seconds, b_seconds, process))
    startup = statistics.median(startup_floor(space, dtype, args.device) for _ in range(args.repeats))
    least = fewest_tokens(items)
    gemm, rate = gemm_floor_seconds(model, least, args.batch_tokens, sync)
    print(
        f"floor: a new process that imports and loads the model, no scoring: {startup:.2f} s; the matrix products "
        f"an exact scorer cannot skip, on the fewest tokens one can run ({least}) at {rate / 1e9:.0f} GFLOP/s: "
        f"{gemm:.2f} s (free attention, no padding); no `cfiw score` process, with any exact algorithm, "
        "is faster than their sum here:"
    )
    print(f"{'mask':>9} {'process s':>9} {'floor s':>7} {'(a)/floor':>9} {'(b)/floor':>9} {'process-startup s':>17}")
    for mode, a_seconds, b_seconds, process in floors:
        floor = startup + gemm
        print(
            f"{mode:>9} {process:>9.2f} {floor:>7.2f} {a_seconds / floor:>9.2f} {b_seconds / floor:>9.2f} "
            f"{process - startup:>17.2f}"
        )
    if args.rollout_time:
        longest = max(len(i.tokens) - i.prompt_length for i in items)
        sampled = whole_rollout(space, args, dtype, work, round(completion))
        print(
            f"cfiw rollout of {len(items)} rollouts x {round(completion)} new tokens (the longest scored: {longest}): "
            f"{sampled:.2f} s; scoring (whole process, last mode) / rollout: {process / sampled:.2f}"
        )
    print(
        "process: the whole `cfiw score` command (new process, model load); (c)/(a) tok/s: tokens per second of "
        "(c) over those of batch-1 forwards; naive tokens: "
        f"{naive_tokens}"
    )


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
    parser.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    parser.add_argument("--pad-vocab", type=int, default=4096, help="--data real: embedding rows of the model")
    parser.add_argument("--device", default="cpu", help="--data real: cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="--data real")
    parser.add_argument("--shape", choices=("tiny", "qwen0.5b"), default="tiny", help="--data real: model shape")
    parser.add_argument("--rollout-time", action="store_true", help="--data real: also time cfiw rollout")
    parser.add_argument(
        "--text", help="--data real: a GSM8K-format .jsonl (default: ../shared's GSM8K, else data/arith)"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.group, args.prompt, args.reasoning, args.spans = 2, 2, 20, 40, 3
        args.layers, args.hidden, args.vocab, args.repeats = 2, 64, 512, 1
        args.pad_vocab = 0
    if args.data == "real":
        if args.prompts == 8 and not args.quick:
            args.prompts = 24  # with G = 4: 96 rollouts
        real_main(args)
        return

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
