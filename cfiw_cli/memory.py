"""Will a sampling stage fit in memory? An estimate, checked before the model loads.

Sampling (rollout, eval, the loop's probe) holds three things: the model's weights; per batch of
`--batch-size` sequences, the KV cache of prompt + `--max-new-tokens` positions and a few
`[batch, vocabulary]` float32 tensors of the sampling distribution; and every finished sequence
until the file is written (`questions x --group-size` of them). The estimate errs high: prompts
are counted at one token per byte of question plus a template, every sequence at its length
limit. When it exceeds what is free (host memory, or the accelerator's for the model and the
batch) the stage stops at once with an error naming the knob that dominates, instead of being
killed by the kernel an hour later with a hint about another one.
"""

from __future__ import annotations

import json
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfiw_cli import adapters, modeling
from cfiw_cli.errors import CfiwError

GIB = 1 << 30
BYTES_PER_KEPT_TOKEN = 80  # a sampled token kept until the write: id and log-prob as Python objects, then Arrow
SAMPLING_COPIES = 6  # [batch, vocabulary] float32 tensors alive at a sampling step (scores, noise, log-probs, top-p)
PROMPT_TEMPLATE_TOKENS = 256  # instruction and chat template around a question
USABLE = 0.9  # of what is free


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    vocabulary: int
    parameters: int


def model_shape(ref: str, revision: str | None = None) -> ModelShape | None:
    """The shape of the model `ref` from its config.json (a local directory, the base of LoRA
    adapters, or a hub model in the local cache), without loading it; None when unknown."""
    path = Path(ref).expanduser()
    if adapters.is_adapter(path):
        base, commit = adapters.base_of(path)
        return model_shape(base, commit)
    config_file = path / "config.json"
    if not config_file.is_file():
        if path.exists() or modeling.looks_local(ref):
            return None
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(ref, "config.json", revision=revision)
        except ValueError:  # not a valid hub id either
            return None
        if not isinstance(cached, str):
            return None
        config_file = Path(cached)
    try:
        config = json.loads(config_file.read_text())
        config = config.get("text_config", config)  # a multimodal wrapper holds the language model's
        hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        vocabulary = int(config["vocab_size"])
        intermediate = int(config.get("intermediate_size") or 4 * hidden)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * intermediate
    tied = bool(config.get("tie_word_embeddings", False))
    parameters = layers * per_layer + vocabulary * hidden * (1 if tied else 2)
    return ModelShape(layers, kv_heads, head_dim, vocabulary, parameters)


def free_host_bytes() -> int:
    """Memory this process may still take: the least of the kernel's available memory, the
    cgroup's limit less its usage, and the address-space limit less what is mapped."""
    candidates = []
    meminfo = _read("/proc/meminfo")
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            candidates.append(int(line.split()[1]) * 1024)
    limit, used = _read("/sys/fs/cgroup/memory.max").strip(), _read("/sys/fs/cgroup/memory.current").strip()
    if limit.isdigit() and used.isdigit():
        candidates.append(int(limit) - int(used))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = next((int(line.split()[1]) * 1024 for line in _read("/proc/self/status").splitlines()
                       if line.startswith("VmSize:")), 0)  # fmt: skip
        candidates.append(soft - mapped)
    if not candidates:
        page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_AVPHYS_PAGES")
        candidates.append(page * pages)
    return max(0, min(candidates))


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def free_device_bytes(device: Any) -> int | None:
    """Free memory of an accelerator (None on the CPU, where the host's counts)."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def _gib(size: float) -> str:
    return f"{size / GIB:,.1f} GiB"


def check_sampling_fits(
    *,
    model: str,
    revision: str | None,
    questions: list[str],
    samples: int,
    max_new_tokens: int,
    batch_size: int,
    dtype_bytes: int,
    device: Any,
    names: dict[str, str],
) -> None:
    """Refuse, before the model loads, to sample `samples` completions of every question when
    the estimate exceeds free memory. `names` spell the knobs as the caller takes them
    (`--group-size` for rollout, `rollout.group_size` in the loop): keys `samples`, `limit`,
    `max_new_tokens`, `batch_size`."""
    sequences = len(questions) * samples
    if sequences == 0:
        return
    longest = max(len(question.encode()) for question in questions) + PROMPT_TEMPLATE_TOKENS + max_new_tokens
    kept = sequences * max_new_tokens * BYTES_PER_KEPT_TOKEN
    shape = model_shape(model, revision)
    batch = min(batch_size, sequences)
    if shape is None:
        weights = per_batch = 0
    else:
        weights = shape.parameters * dtype_bytes
        cache = batch * longest * 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes
        per_batch = cache + SAMPLING_COPIES * batch * shape.vocabulary * 4
    on_device = free_device_bytes(device)
    # each pool with the terms it holds: on the CPU everything is host memory
    pools = {"host": (free_host_bytes(), {"kept": kept})}
    model_terms = {"batch": per_batch, "weights": weights}
    if on_device is None:
        pools["host"][1].update(model_terms)
    else:
        pools["accelerator"] = (on_device, model_terms)
    advice = {
        "kept": f"lower {names['samples']}, {names['limit']} or {names['max_new_tokens']}",
        "batch": f"lower {names['batch_size']} (or {names['max_new_tokens']})",
        "weights": "the model alone does not fit: use --dtype bfloat16, or a machine with more memory",
    }
    for pool, (free, terms) in pools.items():
        need = sum(terms.values())
        if need <= USABLE * free:
            continue
        raise CfiwError(
            f"sampling {sequences:,} sequences ({len(questions):,} questions x {names['samples']} {samples}) of up to "
            f"{names['max_new_tokens']} {max_new_tokens:,} tokens needs about {_gib(need)} of {pool} memory "
            f"(sequences kept {_gib(kept)}, model {_gib(weights)}, one batch of {batch:,} {_gib(per_batch)}); "
            f"{_gib(free)} are free",
            advice[max(terms, key=terms.get)],
        )


def check_stage_fits(config: Any, rows: list[dict], samples: int, names: dict[str, str]) -> None:
    """`check_sampling_fits` for a rollout or eval config whose knobs are spelt `names`."""
    dev = modeling.device()
    check_sampling_fits(
        model=config.model,
        revision=config.revision,
        questions=[str(row["question"]) for row in rows],
        samples=samples,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        dtype_bytes=modeling.resolve_dtype(config.dtype, dev).itemsize,
        device=dev,
        names=names,
    )


def flags(samples_flag: str) -> dict[str, str]:
    """The knobs of a rollout or eval command."""
    return {
        "samples": samples_flag,
        "limit": "--limit",
        "max_new_tokens": "--max-new-tokens",
        "batch_size": "--batch-size",
    }
