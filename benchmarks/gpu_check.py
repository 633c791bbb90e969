"""The GPU check, one command in four parts, printed and (on a GPU) written to
docs/bench/gpu-check-<card>.txt:

1. Five tiny loops at once (modes cfiw, uniform, inverted, shuffled, random) under bf16, 6
   iterations each, from one warm start (a tiny model, briefly SFT-trained here): each loop's
   end, and every non-finite value the guard stopped on (there should be none).
2. The qwen preset at real shape: 2 iterations of `cfiw loop` on a random-init model shaped like
   Qwen2.5-0.5B (from its published config; nothing is downloaded), on real GSM8K questions, in
   cfiw mode and again as the uniform baseline without segment and score (`--no-score`). Per
   run: each stage's seconds per iteration (the manifests' wall seconds), tokens per second,
   peak GPU memory; and CFIW's overhead per iteration, the difference of the two iteration
   times as a share of the cfiw one.
3. One LoRA update (`cfiw train --lora-r 16`, the preset's train settings) on iteration 0's
   rollouts in a process of its own: seconds and peak memory.
4. The score benchmark (`benchmarks/score_bench.py --data real`) at the same shape in bf16.

A random-init model earns no reward and seldom stops, so `train` would drop every group (equal
rewards) and mask every completion (truncated); `train.dynamic_sampling = false` and
`train.mask_truncated = false` keep them, so each update runs its full forward and backward
passes on every token (with zero advantages), and `score.groups = "all"` scores every rollout.

    just gpu-check                          # on a GPU: fits in 8 minutes on one H100
    just gpu-check --device cpu --tiny      # a few minutes on a CPU: the rehearsal CI runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"

# From the models' config.json on the hub (Qwen2.5 ties the embedding and the LM head).
SHAPES = {
    "qwen2.5-0.5b": dict(layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864, pad_vocab=151936),
    "qwen2.5-1.5b": dict(layers=28, hidden=1536, heads=12, kv_heads=2, intermediate=8960, pad_vocab=151936),
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=0, pad_vocab=0),
}
STAGES = ("rollout", "segment", "score", "train", "eval")
ITERATION = ("rollout", "segment", "score", "train")  # a training iteration (evaluations left out)
TINY_MODES = ("cfiw", "uniform", "inverted", "shuffled", "random")


def cfiw(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cfiw_cli", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env
    )


def manifest_of(path: Path) -> dict:
    if path.is_dir():
        return json.loads((path / "cfiw_manifest.json").read_text())
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[b"cfiw"])


def build_model(name: str, args, data: Path, work: Path, env: dict) -> Path:
    model = work / name / "model"
    shape = SHAPES[name]
    built = cfiw(
        "tiny-model", "--out", model, "--dataset", data / "train.jsonl", "--vocab-size", 1024 if args.tiny else 4096,
        *[word for key, value in shape.items() for word in (f"--{key.replace('_', '-')}", value)],
        "--max-positions", 4096, env=env,
    )  # fmt: skip
    if built.returncode:
        raise SystemExit(built.stderr)
    return model


def run_loop(model: Path, label: str, extra: list, args, data: Path, run: Path, env: dict) -> dict:
    """One `cfiw loop` of the qwen preset at this shape: seconds per stage and iteration, rates, memory."""
    settings = {
        "data.dataset": str(data), "loop.questions": args.questions, "rollout.group_size": args.group,
        "rollout.max_new_tokens": args.max_new_tokens, "loop.eval_limit": args.questions, "loop.probe_questions": 0,
        "train.dynamic_sampling": "false", "train.mask_truncated": "false", "score.groups": "all",
    }  # fmt: skip
    argv = ["loop", "--preset", "qwen", "--run", run, "--model", model, "--iterations", args.iterations]
    argv += ["--eval-every", args.iterations, "--dtype", args.dtype, *extra]
    argv += [word for key, value in settings.items() for word in ("--set", f"{key}={value}")]
    started = time.perf_counter()
    done = cfiw(*argv, env=env)
    result = {"run": label, "loop_seconds": time.perf_counter() - started, "full_fine_tuning": "fits"}
    if done.returncode:
        out_of_memory = "out of memory" in done.stderr.lower()
        result["full_fine_tuning"] = "out of memory" if out_of_memory else "failed"
        result["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        return result
    result["parameters"] = manifest_of(model)["metrics"].get("parameters")
    per_stage: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for i in range(args.iterations):
        iteration = run / f"iter-{i:04d}"
        for stage, path in (("rollout", "rollouts"), ("segment", "spans"), ("score", "scores")):
            if not (iteration / f"{path}.parquet").exists():  # --no-score
                continue
            manifest = manifest_of(iteration / f"{path}.parquet")
            per_stage[stage].append(manifest["wall_seconds"])
            if stage == "rollout":
                result.setdefault("rollout_tokens_per_second", []).append(manifest["metrics"]["tokens_per_second"])
                result["dtype"] = manifest.get("dtype")
                result["device"] = manifest.get("device")
        train = manifest_of(iteration / "train_metrics.parquet")  # the update's manifest rides along
        per_stage["train"].append(train["wall_seconds"])
        result.setdefault("train_tokens_per_second", []).append(train["metrics"].get("tokens_per_second"))
        result["peak_memory_gb"] = train["metrics"].get("peak_memory_gb")
    for evaluation in sorted((run / "eval").glob("iter-*.parquet")):
        per_stage["eval"].append(manifest_of(evaluation)["wall_seconds"])
    result["seconds_per_iteration"] = {stage: sum(v) / len(v) if v else 0.0 for stage, v in per_stage.items()}
    result["iteration_seconds"] = sum(result["seconds_per_iteration"][s] for s in ITERATION)
    return result


def lora_update(model: Path, iteration: Path, out: Path, args, env: dict) -> dict:
    """One update of the preset's train settings with LoRA adapters, alone in its process."""
    files = {name: iteration / f"{name}.parquet" for name in ("rollouts", "spans", "scores")}
    argv = ["train", "--model", model, *[word for name, path in files.items() for word in (f"--{name}", path)]]
    argv += ["--out", out, "--lora-r", 16, "--lr", "1e-5", "--minibatches", 4, "--micro-batch-tokens", 16384]
    argv += ["--no-dynamic-sampling", "--no-mask-truncated", "--dtype", args.dtype]
    done = cfiw(*argv, env=env)
    if done.returncode:
        out_of_memory = "out of memory" in done.stderr.lower()
        return {"lora": "out of memory" if out_of_memory else "failed", "lora_error": done.stderr.strip()[-300:]}
    manifest = manifest_of(out)
    return {
        "lora": "fits",
        "lora_train_seconds": manifest["wall_seconds"],
        "lora_peak_memory_gb": manifest["metrics"].get("peak_memory_gb"),
    }


def tiny_loops(args, work: Path, env: dict) -> list[dict]:
    """Part 1: a warm tiny policy, then one loop per mode, all at once, under bf16."""
    base, policy = work / "tiny-base", work / "tiny-sft"
    data = ROOT / "data" / "arith"
    for argv in (
        ["tiny-model", "--out", base, "--dataset", data / "train.jsonl", "--layers", 4, "--hidden", 128],
        ["sft", "--model", base, "--dataset", data, "--split", "sft", "--out", policy, "--steps", args.sft_steps,
         "--lr", "3e-3", "--batch-size", 16],
    ):  # fmt: skip
        done = cfiw(*argv, env=env)
        if done.returncode:
            raise SystemExit(done.stderr)
    sizes = ["--set", "loop.probe_questions=8", "--set", "loop.eval_limit=16", "--set", "loop.keep_policies=0"]
    if args.tiny:
        sizes += ["--set", "loop.questions=4", "--set", "rollout.group_size=2", "--set", "rollout.max_new_tokens=24"]
    started, running = time.perf_counter(), {}
    for index, mode in enumerate(TINY_MODES):
        argv = [sys.executable, "-m", "cfiw_cli", "loop", "--preset", "tiny", "--model", policy, "--run",
                work / f"tiny-{mode}", "--weighting", mode, "--iterations", args.tiny_iterations, "--dtype", "bfloat16",
                "--seed", index, *sizes]  # fmt: skip
        running[mode] = subprocess.Popen(
            [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
    results = []
    for mode, process in running.items():
        _, stderr = process.communicate()
        error = stderr.strip().splitlines()[-2] if process.returncode and stderr.strip() else ""
        iterations = len(list((work / f"tiny-{mode}").glob("iter-*/train_metrics.parquet")))
        results.append({"mode": mode, "iterations": iterations, "exit": process.returncode, "error": error,
                        "non_finite": "non-finite" in stderr})  # fmt: skip
    for result in results:
        result["seconds"] = time.perf_counter() - started
    return results


def score_benchmark(args, env: dict) -> str:
    """Part 4: the score benchmark on real text at the check's shape and dtype; its printed table."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "score_bench.py"), "--data", "real", "--modes", "pad"]
    if args.tiny:
        argv += ["--quick", "--device", "cpu", "--dtype", "fp32", "--shape", "tiny"]
    else:
        argv += ["--device", args.device, "--dtype", "bf16", "--shape", "qwen0.5b"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    return done.stdout.strip() if done.returncode == 0 else f"score benchmark failed: {done.stderr.strip()[-500:]}"


def show_loops(results: list[dict]) -> list[str]:
    header = f"{'run':>20} {'params':>12} {'dtype':>9} " + " ".join(f"{s + ' s':>10}" for s in STAGES)
    lines = [header + f" {'iteration s':>11} {'rollout tok/s':>13} {'train tok/s':>11} {'peak GiB':>8} {'full FT':>13}"]
    for r in results:
        if "seconds_per_iteration" not in r:
            lines.append(f"{r['run']:>20} {'':>12} {'':>9} {r['full_fine_tuning']}: {r.get('error', '')}")
            continue
        times = " ".join(f"{r['seconds_per_iteration'].get(s, 0.0):>10.2f}" for s in STAGES)
        rollout = sum(r["rollout_tokens_per_second"]) / len(r["rollout_tokens_per_second"])
        train = [t for t in r["train_tokens_per_second"] if t]
        train_rate = f"{sum(train) / len(train):>11.0f}" if train else f"{'-':>11}"
        peak = f"{r['peak_memory_gb']:>8.2f}" if r.get("peak_memory_gb") is not None else f"{'-':>8}"
        lines.append(
            f"{r['run']:>20} {r['parameters']:>12,} {r['dtype']:>9} {times} {r['iteration_seconds']:>11.2f} "
            f"{rollout:>13.0f} {train_rate} {peak} {r['full_fine_tuning']:>13}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small sizes everywhere (the CPU rehearsal)")
    parser.add_argument("--shape", default="qwen2.5-0.5b", help=f"part 2's shape, one of {', '.join(SHAPES)}")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--group", type=int, default=8, help="G")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--tiny-iterations", type=int, default=6, help="part 1: iterations of each tiny loop")
    parser.add_argument("--sft-steps", type=int, default=300, help="part 1: SFT steps of the tiny warm start")
    parser.add_argument("--dtype", default="auto", help="part 2: auto is bfloat16 on a bf16 GPU, else float32")
    parser.add_argument("--data", help="GSM8K-format directory (default: ../shared/data/gsm8k, else data/arith)")
    parser.add_argument("--out", help="the printed report (default on a GPU: docs/bench/gpu-check-<card>.txt)")
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.questions, args.group, args.max_new_tokens = "tiny", 4, 2, 16
        args.tiny_iterations, args.sft_steps = 1, 20
    data = Path(args.data) if args.data else SHARED_GSM8K if SHARED_GSM8K.exists() else ROOT / "data" / "arith"
    env = dict(os.environ)
    card = "cpu"
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # every stage then runs on the CPU
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --device cpu (and --tiny for a quick check)")
        card = torch.cuda.get_device_name().lower().replace("nvidia", "").strip().replace(" ", "-")
    out = Path(args.out) if args.out else ROOT / "docs" / "bench" / f"gpu-check-{card}.txt" if card != "cpu" else None
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cfiw-gpu-check-", dir=os.environ.get("CFIW_GPU_CHECK_DIR")) as scratch:
        work = Path(scratch)
        say(f"device: {card}; data: {data}")
        say(f"1. tiny loops at once, bf16, {args.tiny_iterations} iterations each, from {args.sft_steps} SFT steps")
        loops = tiny_loops(args, work, env)
        say(f"{'mode':>10} {'iterations':>10} {'exit':>5} {'non-finite':>10}  error")
        for r in loops:
            say(
                f"{r['mode']:>10} {r['iterations']:>10} {r['exit']:>5} {str(r['non_finite']).lower():>10}  {r['error']}"
            )
        stopped = sum(r["non_finite"] for r in loops)
        say(f"loops stopped on a non-finite value: {stopped} of {len(loops)}")
        say()
        say(f"2. the qwen preset at {args.shape} shape: {args.questions} questions x G={args.group}, "
            f"{args.max_new_tokens} new tokens, {args.iterations} iterations, --dtype {args.dtype}")  # fmt: skip
        model = build_model(args.shape, args, data, work, env)
        runs = [
            run_loop(model, "cfiw", ["--weighting", "cfiw"], args, data, work / "cfiw", env),
            run_loop(model, "uniform --no-score", ["--weighting", "uniform", "--no-score"], args, data,
                     work / "uniform", env),
        ]  # fmt: skip
        for line in show_loops(runs):
            say(line)
        if all("iteration_seconds" in r for r in runs):
            overhead = 1 - runs[1]["iteration_seconds"] / runs[0]["iteration_seconds"]
            say(f"CFIW's overhead per iteration: {overhead:.1%} of the cfiw iteration "
                f"({runs[0]['iteration_seconds']:.2f} s against {runs[1]['iteration_seconds']:.2f} s)")  # fmt: skip
        say()
        say("3. one LoRA update (r 16) on iteration 0's rollouts")
        if "iteration_seconds" in runs[0]:
            lora = lora_update(model, work / "cfiw" / "iter-0000", work / "lora", args, env)
            peak = lora.get("lora_peak_memory_gb")
            seconds = f", {lora['lora_train_seconds']:.2f} s" if "lora_train_seconds" in lora else ""
            say(f"LoRA: {lora['lora']}{seconds}" + (f", peak {peak:.2f} GiB" if peak is not None else ""))
        say()
        say("4. the score benchmark on real text" + (" (bf16)" if not args.tiny else ""))
        for line in score_benchmark(args, env).splitlines():
            say(line)
    say()
    say(f"the whole check: {time.perf_counter() - started:.0f} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"written to {out}")


if __name__ == "__main__":
    main()
