"""Loading a policy and its tokenizer from a hub id or a local directory, on the right device."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cfiw_cli import adapters, hub
from cfiw_cli.distributed import state
from cfiw_cli.errors import CfiwError

DTYPES = ("auto", "float32", "bfloat16", "float16")
TRAIN_DTYPES = ("auto", "float32", "bfloat16")  # float16 would need loss scaling


# First path components that name a local directory, never a hub organisation, in this project.
LOCAL_ROOTS = ("runs", "data", "models", "checkpoints", "outputs")


def looks_local(ref: str) -> bool:
    """A model reference that is a path, not a hub id (`org/name`): it starts with . / ~, has
    more than one slash, or starts with a directory that exists here or a project folder."""
    first = ref.split("/", 1)[0]
    return (
        ref.startswith((".", "/", "~"))
        or ref.count("/") > 1
        or ref.endswith(os.sep)
        or first in LOCAL_ROOTS
        or ("/" in ref and Path(first).is_dir())
    )


def holds_model(path: Path) -> bool:
    """A directory written by `save_pretrained`: a full model, or LoRA adapters."""
    return (path / "config.json").exists() or adapters.is_adapter(path)


def check_model_ref(ref: str, hint: str | None = None) -> None:
    """Fail early, without contacting the hub, for a local model path that does not exist or
    holds no model (or adapters whose local base is gone). `hint` says how to build it."""
    path = Path(ref).expanduser()
    if path.exists():
        if not holds_model(path):
            raise CfiwError(
                f"{ref} holds no model (no config.json)", "pass a directory written by save_pretrained or a hub id"
            )
        if adapters.is_adapter(path):
            base = adapters.base_of(path)[0]
            if looks_local(base) and not Path(base).expanduser().exists():
                raise CfiwError(
                    f"the LoRA adapters in {ref} were trained on {base}, which does not exist",
                    "put the base model back at that path (adapter_config.json names it)",
                )
        return
    if looks_local(ref):
        raise CfiwError(
            f"model path does not exist: {ref}",
            hint or "build one with `cfiw tiny-model --out DIR` (or `cfiw sft`), or pass a hub id",
        )


def device() -> Any:
    """The device of this process (accelerate knows about CUDA, MPS and `accelerate launch`)."""

    return state().device


def describe_device(dev: Any) -> str:
    import torch

    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def resolve_dtype(name: str, dev: Any) -> Any:
    import torch

    if name not in DTYPES:
        raise CfiwError(f"unknown dtype {name!r}", f"choose one of {', '.join(DTYPES)}")
    if name == "auto":
        cuda_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def _hub_error(ref: str, exc: Exception) -> CfiwError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CfiwError(
        f"could not load {ref!r}: {first}", "check the hub id and network access, or pass a local model directory"
    )


_pinned: dict[tuple[str, str | None], str | None] | None = None  # inside `pinned_revisions`


@contextlib.contextmanager
def pinned_revisions() -> Iterator[None]:
    """Inside, each hub model and revision is resolved once: every stage of a loop loads the
    same commit, even when the branch moves during the run, and the hub is asked once. Nested
    inside another, it keeps the outer one's commits."""
    global _pinned
    if _pinned is not None:
        yield
        return
    _pinned = {}
    try:
        yield
    finally:
        _pinned = None


def resolve_revision(ref: str, revision: str | None) -> str | None:
    """The commit that `revision` (default: main) of hub model `ref` points at: asked of the hub,
    or read from the local hub cache when offline (HF_HUB_OFFLINE=1) or the hub cannot be
    reached. None for a local directory."""
    if Path(ref).expanduser().exists():
        return None
    if _pinned is not None:
        if (ref, revision) not in _pinned:
            _pinned[(ref, revision)] = _resolve_on_hub(ref, revision)
        return _pinned[(ref, revision)]
    return _resolve_on_hub(ref, revision)


def _resolve_on_hub(ref: str, revision: str | None) -> str | None:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    wanted = revision or "main"
    problem = "it is not in the local hub cache and the hub is offline (HF_HUB_OFFLINE)"
    if not constants.HF_HUB_OFFLINE and not hub.reachable():
        problem = "the hub cannot be reached and the local hub cache lacks it"
    elif not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(ref, revision=wanted).sha
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise _hub_error(ref, exc) from exc
        except Exception as exc:  # the hub cannot be reached: the local cache may still know the revision
            problem = f"the hub cannot be reached ({type(exc).__name__}) and the local hub cache lacks it"
    cached = try_to_load_from_cache(ref, "config.json", revision=wanted)
    if isinstance(cached, str):
        return Path(cached).parent.name  # <cache>/models--org--name/snapshots/<commit>/config.json
    raise CfiwError(
        f"cannot resolve revision {wanted!r} of {ref}: {problem}",
        "check --model and --revision; offline, the model must be in the local hub cache",
    )


def load_tokenizer(ref: str, revision: str | None = None) -> Any:
    """Tokenizer with left padding (for batched generation) and a pad token. `revision`: of a
    hub model (a resolved commit, see `resolve_revision`); a local directory ignores it."""
    from transformers import AutoTokenizer

    quiet_libraries()
    check_model_ref(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, revision=revision)
    except (OSError, ValueError) as exc:
        raise _hub_error(ref, exc) from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: str, dtype: str = "auto", dev: Any = None, revision: str | None = None) -> Any:
    """The model `ref` holds, in `dtype` on `dev`. A LoRA directory gives its base model (at the
    commit the adapters record) with the adapters attached, in the base's dtype (frozen:
    `adapters.for_training` turns their gradients on)."""
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    check_model_ref(ref)
    dev = dev or device()
    if adapters.is_adapter(ref):
        base, commit = adapters.base_of(ref)
        return adapters.attach(load_model(base, dtype, dev, commit), ref).to(dev).eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=resolve_dtype(dtype, dev), revision=revision)
    except (OSError, ValueError) as exc:
        raise _hub_error(ref, exc) from exc
    return model.to(dev).eval()


def policy(
    ref: str, dtype: str = "auto", model: Any = None, tokenizer: Any = None, revision: str | None = None
) -> tuple[Any, Any, Any]:
    """(model, tokenizer, device): the ones given (e.g. by `cfiw loop`), else loaded from `ref`
    (at `revision`, for a hub model) onto this process's device.

    One rule for the dtype, whoever loads the model: a stage computes in what `dtype` resolves
    to. A given model in another dtype (the loop's float32 policy, when `auto` means bfloat16 on
    a GPU) is used through a copy cast to it, which holds the weights loading the checkpoint in
    that dtype gives, so the loop writes the files the separate commands write."""
    dev = device()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(ref, revision)
    if model is None:
        model = load_model(ref, dtype, dev, revision)
    model = adapters.inference_model(model)
    if (wanted := resolve_dtype(dtype, dev)) != next(model.parameters()).dtype:
        model = cast_copy(model, wanted)
    return model, tokenizer, dev


def cast_copy(model: Any, dtype: Any) -> Any:
    """A copy of `model` as `from_pretrained(dtype=...)` would load it: parameters and saved
    buffers cast, buffers computed at init (rotary frequencies) left in float32."""
    cast = copy.deepcopy(model)
    for module in cast.modules():
        for tensor in module.parameters(recurse=False):
            tensor.data = tensor.data.to(dtype)
        for name, tensor in module.named_buffers(recurse=False):
            if tensor.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = tensor.to(dtype)
    cast.config.dtype = dtype
    return cast


def dtype_name(dtype: Any) -> str:
    """'float32', 'bfloat16', ... for a manifest (None: float32)."""
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def model_dtype(model: Any) -> str:
    return dtype_name(next(model.parameters()).dtype)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a completion: the generation config's EOS list plus the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def check_token_ids(token_ids: list[list[int]], size: int, problem: str, hint: str) -> None:
    """Every token id of a file must index a vocabulary of `size`; `problem` is the error,
    formatted with `largest` (the largest id found) and `size`."""
    largest = max((max(ids) for ids in token_ids if len(ids)), default=-1)
    if largest >= size:
        raise CfiwError(problem.format(largest=largest, size=size), hint)


def check_vocabulary(model: Any, token_ids: list[list[int]], what: str) -> None:
    """A model must cover every token id of a file it is asked to score or train on."""
    check_token_ids(
        token_ids,
        model.get_input_embeddings().num_embeddings,
        f"{what} holds token id {{largest}}, but the model's vocabulary has {{size}} entries",
        "use the model (and tokenizer) that produced the rollouts",
    )


def quiet_libraries() -> None:
    """Our own progress bars replace the libraries' (which would also clutter logs and pipes)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
