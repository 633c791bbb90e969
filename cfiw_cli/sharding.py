"""Fully sharded training (torch FSDP2) for `cfiw train` under `accelerate launch` with an FSDP
config (accelerate sets ACCELERATE_USE_FSDP=true).

Each decoder layer and then the whole model are sharded with `fully_shard`, on any device
(CPU processes use gloo), so every process holds 1/N of the parameters, gradients and AdamW
state. The checkpoint is written as one process would write it: the full parameters
gathered to the main process (`save_pretrained` with a full state dict), and `optimizer.pt`
in the layout of a one-process AdamW (state keyed by parameter index), so a checkpoint
resumes with or without sharding, on any number of processes.

A sharded forward gathers each layer's parameters from every process, so every process must
run the same number of forward and backward passes: `train` pads the shorter lists of
micro-batches with empty ones (a zero loss).
"""

from __future__ import annotations

import os
from typing import Any

from cfiw_cli import adapters
from cfiw_cli.errors import CfiwError


def requested(processes: int) -> bool:
    """An accelerate FSDP config (or ACCELERATE_USE_FSDP=true) with more than one process."""
    return processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def shard(model: Any) -> Any:
    """Shard `model` in place: each of its decoder layers (the classes transformers never
    splits), then the rest. The parameters become DTensors; build the optimizer after."""
    from torch.distributed.fsdp import fully_shard

    if adapters.is_peft(model):
        raise CfiwError("LoRA does not run under FSDP here", "train LoRA adapters with DDP (accelerate --multi_gpu)")
    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model)
    return model


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: Any) -> dict[str, Any]:
    """Every parameter and buffer, whole, on the main process's CPU (empty elsewhere); every
    process must call it. A tied weight appears once, under its first name, as
    `save_pretrained` writes it from an unsharded model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    kept = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state.items() if name in kept}


def save(model: Any, weights: dict[str, Any], directory: Any) -> None:
    """`save_pretrained` of a sharded model with its gathered weights, under the model's own
    class name: some transformers versions write FSDP's wrapper class (FSDPQwen2ForCausalLM)
    into config.json, which loaders that read `architectures` would not know."""
    from torch.distributed.fsdp import FSDPModule

    architecture = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__
    model.save_pretrained(directory, state_dict=weights)
    model.config.architectures = [architecture]
    model.config.save_pretrained(directory)


def _names(model: Any) -> list[str]:
    """The trainable parameters' names, in the order a one-process AdamW numbers them."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """AdamW's state gathered whole to the main process, in `optimizer.state_dict()`'s layout
    (parameters by index); every process must call it, the others get an empty dict."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options())
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_names(model))}
    return {
        "state": {index[name]: state for name, state in by_name["state"].items()},
        "param_groups": [
            {  # a loaded state dict can turn AdamW's betas tuple into a list
                **{key: tuple(value) if isinstance(value, list) else value for key, value in group.items()},
                "params": [index[name] for name in group["params"]],
            }
            for group in by_name["param_groups"]
        ],
    }


def load_optimizer_state(model: Any, optimizer: Any, saved: dict[str, Any]) -> None:
    """Load an `optimizer.pt` (one process's layout) into the sharded AdamW: each process
    keeps its shard of every moment."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _names(model)
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        for key, value in saved_group.items():  # e.g. the schedule's initial_lr, which torch checks for
            if key != "params":
                group.setdefault(key, value)
    by_name = {
        "state": {names[i]: state for i, state in saved["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def whole(value: Any) -> Any:
    """A DTensor's full value (a gradient norm of sharded parameters); anything else as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
