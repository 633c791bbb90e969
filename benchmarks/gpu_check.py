"""The qwen preset at real shape: 2 iterations of `cfiw loop` on random-init models shaped like
Qwen2.5-0.5B and Qwen2.5-1.5B (from their published configs; nothing is downloaded), on real
GSM8K questions, in the dtype `auto` picks (bfloat16 on a bf16 GPU).

Per shape it reports each stage's time per iteration (the manifests' wall seconds), tokens
per second of rollout, score and train, the loop's peak GPU memory, and whether full fine-tuning
fits (the loop finished) or ran out of memory. Then one LoRA update (`cfiw train --lora-r 16`,
the preset's train settings) runs on iteration 0's rollouts in a process of its own: its
seconds and peak memory say whether LoRA fits, and what it saves against full fine-tuning.

A random-init model earns no reward and seldom stops, so `train` would drop every group (equal
rewards) and mask every completion (truncated); `train.dynamic_sampling = false` and
`train.mask_truncated = false` keep them, so each update runs its full forward and backward
passes on every token (with zero advantages).

    just gpu-check                          # on a GPU: 0.5B and 1.5B shapes, G = 8, 64 questions, 512 new tokens
    just gpu-check --device cpu --tiny      # seconds on a CPU: the smoke test CI runs
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


def cfiw(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cfiw_cli", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env
    )


def manifest_of(path: Path) -> dict:
    if path.is_dir():
        return json.loads((path / "cfiw_manifest.json").read_text())
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[b"cfiw"])


def check_shape(name: str, args, data: Path, work: Path, env: dict) -> dict:
    model = work / name / "model"
    shape = SHAPES[name]
    built = cfiw(
        "tiny-model", "--out", model, "--dataset", data / "train.jsonl", "--vocab-size", 1024 if args.tiny else 4096,
        *[word for key, value in shape.items() for word in (f"--{key.replace('_', '-')}", value)],
        "--max-positions", 4096, env=env,
    )  # fmt: skip
    if built.returncode:
        raise SystemExit(built.stderr)
    run = work / name / "run"
    settings = {
        "data.dataset": str(data), "loop.questions": args.questions, "rollout.group_size": args.group,
        "rollout.max_new_tokens": args.max_new_tokens, "loop.eval_limit": args.questions, "loop.probe_questions": 0,
        "train.dynamic_sampling": "false", "train.mask_truncated": "false",
    }  # fmt: skip
    argv = ["loop", "--preset", "qwen", "--run", run, "--model", model, "--iterations", args.iterations]
    argv += ["--eval-every", args.iterations, "--dtype", args.dtype]
    argv += [word for key, value in settings.items() for word in ("--set", f"{key}={value}")]
    started = time.perf_counter()
    done = cfiw(*argv, env=env)
    seconds = time.perf_counter() - started
    result = {"shape": name, **shape, "loop_seconds": seconds, "full_fine_tuning": "fits", "lora": "not run"}
    if done.returncode:
        out_of_memory = "out of memory" in done.stderr.lower()
        result["full_fine_tuning"] = "out of memory" if out_of_memory else "failed"
        result["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        return result
    params = manifest_of(model)["metrics"].get("parameters")
    result["parameters"] = params
    per_stage: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for i in range(args.iterations):
        iteration = run / f"iter-{i:04d}"
        for stage, path in (("rollout", "rollouts"), ("segment", "spans"), ("score", "scores")):
            manifest = manifest_of(iteration / f"{path}.parquet")
            per_stage[stage].append(manifest["wall_seconds"])
            if stage == "rollout":
                result.setdefault("rollout_tokens_per_second", []).append(manifest["metrics"]["tokens_per_second"])
                result["dtype"] = manifest.get("dtype")
                result["device"] = manifest.get("device")
            if stage == "score":
                tokens = manifest["metrics"]["tokens"]
                result.setdefault("score_tokens_per_second", []).append(tokens / max(manifest["wall_seconds"], 1e-9))
        train = manifest_of(iteration / "train_metrics.parquet")  # the update's manifest rides along
        per_stage["train"].append(train["wall_seconds"])
        result.setdefault("train_tokens_per_second", []).append(train["metrics"].get("tokens_per_second"))
        result["peak_memory_gb"] = train["metrics"].get("peak_memory_gb")
    for evaluation in sorted((run / "eval").glob("iter-*.parquet")):
        per_stage["eval"].append(manifest_of(evaluation)["wall_seconds"])
    result["seconds_per_iteration"] = {stage: sum(v) / len(v) for stage, v in per_stage.items() if v}
    rollout = result["seconds_per_iteration"]["rollout"]
    result["score_share_of_rollout"] = result["seconds_per_iteration"]["score"] / rollout
    result.update(lora_update(model, run / "iter-0000", work / name / "lora", args, env))
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


def show(results: list[dict]) -> None:
    print(
        f"{'shape':>14} {'params':>12} {'dtype':>9} " + " ".join(f"{s + ' s':>10}" for s in STAGES)
        + f" {'score/rollout':>13} {'rollout tok/s':>13} {'train tok/s':>11} {'peak GiB':>8} {'full FT':>13}"
        + f" {'LoRA train s':>12} {'LoRA GiB':>8} LoRA"
    )  # fmt: skip
    for r in results:
        if "seconds_per_iteration" not in r:
            print(f"{r['shape']:>14} {'':>12} {'':>9} {r['full_fine_tuning']}: {r.get('error', '')}")
            continue
        times = " ".join(f"{r['seconds_per_iteration'].get(s, float('nan')):>10.2f}" for s in STAGES)
        rollout = sum(r["rollout_tokens_per_second"]) / len(r["rollout_tokens_per_second"])
        train = [t for t in r["train_tokens_per_second"] if t]
        train_rate = f"{sum(train) / len(train):>11.0f}" if train else f"{'-':>11}"
        peak = f"{r['peak_memory_gb']:>8.2f}" if r.get("peak_memory_gb") is not None else f"{'-':>8}"
        lora_seconds = f"{r['lora_train_seconds']:>12.2f}" if "lora_train_seconds" in r else f"{'-':>12}"
        lora_peak = f"{r['lora_peak_memory_gb']:>8.2f}" if r.get("lora_peak_memory_gb") is not None else f"{'-':>8}"
        print(
            f"{r['shape']:>14} {r['parameters']:>12,} {r['dtype']:>9} {times} {r['score_share_of_rollout']:>13.2f} "
            f"{rollout:>13.0f} {train_rate} {peak} {r['full_fine_tuning']:>13} {lora_seconds} {lora_peak} {r['lora']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and a few short rollouts (smoke test)")
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b", help=f"any of {', '.join(SHAPES)}")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--group", type=int, default=8, help="G")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a bf16 GPU, else float32")
    parser.add_argument("--data", help="GSM8K-format directory (default: ../shared/data/gsm8k, else data/arith)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.questions, args.group, args.max_new_tokens = "tiny", 4, 2, 16
    data = Path(args.data) if args.data else SHARED_GSM8K if SHARED_GSM8K.exists() else ROOT / "data" / "arith"
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # every stage then runs on the CPU
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --device cpu (and --tiny for a quick check)")
    print(f"data: {data}; {args.questions} questions x G={args.group}, {args.max_new_tokens} new tokens, "
          f"{args.iterations} iterations of the qwen preset, device {args.device}")  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="cfiw-gpu-check-", dir=os.environ.get("CFIW_GPU_CHECK_DIR")) as scratch:
        for name in args.shapes.split(","):
            results.append(check_shape(name, args, data, Path(scratch), env))
    show(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("ratio score/rollout (time per iteration): " + ", ".join(
        f"{r['shape']} {r['score_share_of_rollout']:.2f}" for r in results if "score_share_of_rollout" in r
    ))  # fmt: skip


if __name__ == "__main__":
    main()
