"""LoRA adapters (peft): a policy trained as low-rank adapters on a frozen base model.

A LoRA checkpoint is a directory holding `adapter_config.json` and the adapter weights (no
base weights), plus the tokenizer and, from `cfiw train`, the optimizer state of the adapters
alone. Its `adapter_config.json` names the base model: an absolute directory or a hub id
with the commit it was loaded at, so the checkpoint loads from anywhere on the same machine.
Every stage that takes `--model` takes such a directory: rollout, score and eval sample and
score with the adapted model, and train continues the adapters.

With a KL term the reference is the policy with its adapters disabled (the base model), in
the same module: no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfiw_cli.errors import CfiwError

ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"  # peft: every linear layer except the LM head


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    target_modules: str  # comma-separated module names, or all-linear

    @property
    def targets(self) -> str | list[str]:
        if self.target_modules.strip() == ALL_LINEAR:
            return ALL_LINEAR
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]

    @classmethod
    def of(cls, config: Any) -> LoraSettings | None:
        """The LoRA settings of a stage config, or None for full fine-tuning (`lora_r` = 0)."""
        if not getattr(config, "lora_r", 0):
            return None
        return cls(config.lora_r, float(config.lora_alpha), config.lora_target_modules)


def is_adapter(ref: str | Path) -> bool:
    return (Path(ref).expanduser() / ADAPTER_CONFIG).is_file()


def base_of(ref: str | Path) -> tuple[str, str | None]:
    """(base model, its commit or None) that the adapter directory `ref` was trained on."""
    path = Path(ref).expanduser() / ADAPTER_CONFIG
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        recorded = None
        problem = str(exc)
    if not isinstance(recorded, dict):
        raise CfiwError(
            f"{path} is not a readable JSON object" + (f" ({problem})" if recorded is None else ""),
            "restore it from the checkpoint that wrote it (cfiw train or cfiw sft with --lora-r)",
        )
    base = recorded.get("base_model_name_or_path")
    if not base:
        raise CfiwError(f"{ref}/{ADAPTER_CONFIG} names no base model", "write adapters with cfiw train or cfiw sft")
    return base, recorded.get("revision")


def base_record(ref: str) -> str:
    """How an adapter names its base: a local directory absolutely, a hub id as given."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def attach(base: Any, ref: str) -> Any:
    """The base model with the adapters of directory `ref`, in the base's dtype, frozen."""
    from peft import PeftModel

    with _quiet_peft():
        return PeftModel.from_pretrained(base, ref, autocast_adapter_dtype=False)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft asks transformers a question it has renamed, and warns that we name the base model
    ourselves (absolutely) rather than as the caller spelt it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*renamed")
        yield


def wrap(model: Any, settings: LoraSettings, base: str, commit: str | None) -> Any:
    """Fresh adapters on `model` (B = 0, so the adapted model starts equal to the base; A is
    drawn from torch's generator); only they require gradients."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        target_modules=settings.targets,
        lora_dropout=0.0,  # the update's log-probs must be the policy's own
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_record(base),
        revision=commit,
    )
    try:
        with _quiet_peft():
            adapted = get_peft_model(model, config)
    except ValueError as exc:
        raise CfiwError(f"cannot add LoRA adapters: {exc}", "check --lora-target-modules (e.g. q_proj,v_proj)") from exc
    recorded = adapted.peft_config["default"]
    recorded.base_model_name_or_path, recorded.revision = base_record(base), commit  # peft would keep the name as given
    return adapted


def recorded_settings(model: Any) -> LoraSettings:
    config = model.peft_config["default"]
    targets = config.target_modules
    names = ALL_LINEAR if targets == ALL_LINEAR else ",".join(sorted(targets))
    return LoraSettings(int(config.r), float(config.lora_alpha), names)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def for_training(model: Any, settings: LoraSettings | None, base: str, commit: str | None) -> Any:
    """The model a LoRA update trains: adapters added when `settings` asks for them, or the
    adapters the model already carries (a LoRA checkpoint), made trainable with the base
    frozen. A full model without settings comes back as it is."""
    if not is_peft(model):
        return model if settings is None else wrap(model, settings, base, commit)
    if settings is not None:
        have = recorded_settings(model)
        same_targets = settings.targets == ALL_LINEAR or sorted(settings.targets) == have.target_modules.split(",")
        if (settings.r, settings.alpha) != (have.r, have.alpha) or not same_targets:
            targets = have.target_modules.split(",")
            shown = ",".join(targets) if len(targets) <= 4 else f"{len(targets)} modules"
            raise CfiwError(
                f"the model's adapters have r = {have.r}, alpha = {have.alpha:g}, targets {shown}, not --lora-r "
                f"{settings.r} --lora-alpha {settings.alpha:g} --lora-target-modules {settings.target_modules}",
                "drop the --lora-* flags to continue these adapters, or start from the base model",
            )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def save(model: Any, directory: Path) -> None:
    """`save_pretrained`: a full model's weights, or a LoRA model's adapters alone (with the
    adapter_config.json that names the base)."""
    if is_peft(model):
        for config in model.peft_config.values():  # a set's order changes from process to process
            if isinstance(config.target_modules, set | list | tuple):
                config.target_modules = sorted(config.target_modules)
        model.save_pretrained(directory, save_embedding_layers=False)
        (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's model-card template
    else:
        model.save_pretrained(directory)


def inference_model(model: Any) -> Any:
    """The transformers model to sample and score with: for a peft model, the base model with
    the adapters in its layers (active), which has every method and attribute of the base."""
    return model.get_base_model() if is_peft(model) else model


def trainable_parameters(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]
