"""Every stage's settings, declared once.

Each field of a stage config is one command-line flag: its name (`group_size` is
`--group-size`), type, default, help and limits live here, in the field's `flag(...)`, and
`cfiw_cli.options` turns a config class into the command's Typer parameters. The loop builds
the same configs from a preset, and `cfiw loop --dry-run` prints them back as flags, so a
setting means one thing everywhere. Shared groups (model, data, sampling) are mixed into the
stages that take them. Choices are tuples that the code also checks against (a config built in
Python or from a preset is checked by its stage; the CLI rejects a bad value with exit 2).

This module is light on purpose (no torch, no pyarrow): `cfiw --help` reads it.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from cfiw_cli.algo.importance import MASK_MODES, TARGETS
from cfiw_cli.algo.loss import LOSS_TYPES, REWARD_SCALINGS
from cfiw_cli.algo.weights import MODES, PROFILES, SCORED_MODES
from cfiw_cli.errors import CfiwError
from cfiw_cli.modeling import DTYPES, TRAIN_DTYPES
from cfiw_cli.tasks.arith import NAMES
from cfiw_cli.tracking import REPORT_TO


def presets() -> dict[str, Traversable]:
    """The presets shipped inside the package (`pipelines/` in a checkout links to them), by name."""
    folder = resources.files("cfiw_cli").joinpath("presets")
    return {entry.name.removesuffix(".toml"): entry for entry in folder.iterdir() if entry.name.endswith(".toml")}


ARCHS = ("qwen2", "llama")
ARTIFACT_KINDS = ("rollouts", "spans", "scores", "weights", "train_metrics", "eval")  # schemas.SCHEMAS, by name
SFT_SCHEDULES = ("constant", "linear", "cosine")
TRAIN_SCHEDULES = ("constant", "cosine")
REPLAY_OPTIMIZER_STATES = ("kept", "fresh")
OPTIMIZERS = ("adamw", "sgd")
SAMPLING_BACKENDS = ("generate", "continuous")  # cfiw_cli.samplers
SCORED_GROUPS = ("all", "mixed")  # which rollouts cfiw score scores: every one, or those of groups with unequal rewards
PROFILE_HELP = (
    "cfiw (the method as docs/method.md states it) or authors (their trainer, exactly: their span detector in "
    "segment, their answer positions in score, full span drops and formatting tokens x0.1 in train)."
)


def check_quantile(value: float) -> None:
    if not 0 < value < 1:
        raise CfiwError(f"--entropy-quantile must lie in (0, 1), not {value!r}", "e.g. --entropy-quantile 0.8")


def flag(
    default: Any = MISSING,
    help: str = "",
    *,
    names: tuple[str, ...] = (),
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] | None = None,
    check: Any = None,
    path: bool = False,
    argument: bool = False,
    quiet: bool = False,
) -> Any:
    """A config field that is also a command-line flag. `names` overrides `--field-name`
    (e.g. a short alias); `min`/`max` bound it, `above` from below strictly; `path` shows it as
    a PATH; `argument` makes it positional; `check(value)` raises a `CfiwError` for a value
    of the right type that means nothing (a bad list, say). A `quiet` field is left out of
    manifests and printed commands while it holds its default: a setting added after outputs
    were written, which keeps them up to date and the loop's commands unchanged."""
    meta = {
        "help": help,
        "names": names,
        "min": min,
        "max": max,
        "above": above,
        "check": check,
        "choices": choices,
        "path": path,
        "argument": argument,
        "quiet": quiet,
    }
    return field(default=default, metadata=meta)


def at_quiet_default(config: Any, name: str) -> bool:
    """Whether the field `name` is quiet (see `flag`) and holds its default."""
    item = next(f for f in fields(config) if f.name == name)
    return bool(item.metadata.get("quiet")) and getattr(config, name) == item.default


class Checked:
    """Every field is checked when a config is built, whatever builds it (the CLI, a preset, a
    `--set`, Python): its type, a finite number, its limits and its choices. A bad value is a
    `CfiwError` naming the flag, before anything loads."""

    def __post_init__(self) -> None:
        for item in fields(self):  # type: ignore[arg-type]
            check_value(item, _field_types(type(self))[item.name], getattr(self, item.name))
        self.check_rules()

    def check_rules(self) -> None:
        """The rules that tie fields together, checked once the fields are; a stage's own
        `check` keeps only what needs the environment (an installed library)."""


@cache
def _field_types(config_class: type) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def check_value(item: Any, annotation: Any, value: Any) -> None:
    flag = "--" + item.name.replace("_", "-")
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    optional = type(None) in typing.get_args(annotation)
    if value is None:
        if not optional:
            raise CfiwError(f"{flag} needs a value", f"pass {flag}")
        return
    kind = kinds[0]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise CfiwError(f"{flag} must be {_KIND_NAMES[kind]}, not {value!r}", f"pass {flag} as {_KIND_NAMES[kind]}")
    if kind is float and not math.isfinite(value):
        raise CfiwError(f"{flag} must be a finite number, not {value!r}", f"pass a finite value to {flag}")
    meta = item.metadata
    if meta.get("min") is not None and value < meta["min"]:
        raise CfiwError(f"{flag} must be >= {meta['min']}, not {value!r}", f"pass a value of at least {meta['min']}")
    if meta.get("above") is not None and not value > meta["above"]:
        raise CfiwError(f"{flag} must be > {meta['above']}, not {value!r}", f"pass a value above {meta['above']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise CfiwError(f"{flag} must be <= {meta['max']}, not {value!r}", f"pass a value of at most {meta['max']}")
    if meta.get("choices") and value not in meta["choices"]:
        raise CfiwError(f"unknown {flag} {value!r}", f"choose one of {', '.join(meta['choices'])}")
    if meta.get("check"):
        meta["check"](value)


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}

# Upper bounds: far above any real run, low enough that a typo fails here and not in the
# kernel's out-of-memory killer (the memory estimate of `cfiw_cli.memory` is the finer check).
MAX_SAMPLES = 1024  # G, samples per question
MAX_NEW_TOKENS = 131_072
MAX_BATCH = 65_536  # sequences per generate call, examples per step
MAX_TOKENS_PER_CALL = 1 << 24  # padded tokens per forward call
MAX_ROWS = 100_000_000  # questions selected, problems generated
MAX_STEPS = 100_000_000  # optimizer steps, iterations
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed


REVISION_HELP = (
    "Hub revision of --model: a branch, tag or commit (default: main). The commit it resolves to is loaded and "
    "recorded in the manifest; a local directory ignores it."
)


@dataclass(frozen=True, kw_only=True)
class ModelOptions(Checked):
    model: str = flag(help="Hugging Face hub id or local model directory.", names=("--model", "-m"))
    revision: str | None = flag(None, REVISION_HELP)
    dtype: str = flag(
        "auto", "Model dtype: auto (bfloat16 on a bf16 GPU, else float32), float32, bfloat16, float16.", choices=DTYPES
    )


@dataclass(frozen=True, kw_only=True)
class TrackingOptions(Checked):
    report_to: str = flag(
        "none",
        "Live curves: none, tensorboard (offline event files), wandb or trackio (each needs its package).",
        choices=REPORT_TO,
    )
    tracking_dir: str | None = flag(
        None, "Where tracking files go (default: a tracking/ directory beside --out).", path=True
    )


TRACKING_FIELDS = ("report_to", "tracking_dir")  # where curves go changes no output: not in manifests


@dataclass(frozen=True, kw_only=True)
class LoraOptions(Checked):
    lora_r: int = flag(
        0,
        "LoRA rank: train low-rank adapters on the frozen model and save only them (0: full fine-tuning). "
        "A --model that holds adapters continues them.",
        min=0,
        max=65_536,
    )
    lora_alpha: float = flag(32.0, "LoRA scale numerator: the update is (alpha / r) B A.", min=0.0)
    lora_target_modules: str = flag(
        "all-linear",
        "Modules that get adapters: comma-separated names (e.g. q_proj,k_proj,v_proj,o_proj) or all-linear "
        "(every linear layer but the LM head).",
    )

    def check_rules(self) -> None:
        super().check_rules()
        if self.lora_r and not any(name.strip() for name in self.lora_target_modules.split(",")):
            raise CfiwError("--lora-target-modules names no module", "e.g. --lora-target-modules q_proj,v_proj")


@dataclass(frozen=True, kw_only=True)
class DataOptions(Checked):
    dataset: str = flag(
        help="'gsm8k' (hub openai/gsm8k, config main), a .jsonl/.parquet file with question and answer columns, "
        "or a directory holding <split>.jsonl.",
        names=("--dataset", "-d"),
    )
    split: str = flag("train", "Dataset split (hub datasets, or <split>.jsonl in a directory).")
    limit: int | None = flag(None, "Use at most this many questions (default: all).", min=1, max=MAX_ROWS)
    offset: int = flag(0, "Skip this many questions first.", min=0, max=MAX_ROWS)


@dataclass(frozen=True, kw_only=True)
class PromptOptions(Checked):
    prompt_template: str | None = flag(
        None,
        "User message with a {question} placeholder "
        "(default: the question plus an instruction to end with '#### <number>').",
    )
    chat_template: bool = flag(True, "Wrap the prompt in the tokenizer's chat template when it has one.")


@dataclass(frozen=True, kw_only=True)
class SamplingOptions(PromptOptions):
    max_new_tokens: int = flag(512, "Longest completion, in tokens.", min=1, max=MAX_NEW_TOKENS)
    temperature: float = flag(1.0, "Sampling temperature (0 = greedy).", min=0.0)
    top_p: float = flag(1.0, "Nucleus sampling mass (1.0 = off).", above=0.0, max=1.0)
    batch_size: int = flag(64, "Sequences per generate call.", min=1, max=MAX_BATCH)
    seed: int = flag(0, "Random seed; same seed and inputs give the same results on CPU.", min=0, max=MAX_SEED)
    backend: str = flag(
        "generate",
        "Sampling engine: generate (transformers' generate, each sequence its own seeded stream) or continuous "
        "(transformers' continuous batching: greedy decoding gives the same tokens, sampling does not; "
        "see docs/scale.md).",
        choices=SAMPLING_BACKENDS,
        quiet=True,
    )


SEED_HELP = "Random seed; same seed and inputs give the same results on CPU."


@dataclass(frozen=True, kw_only=True)
class TinyModelConfig(Checked):
    out: str = flag(help="Directory to write the model and tokenizer to.", path=True)
    arch: str = flag("qwen2", "Architecture.", choices=ARCHS)
    dataset: str | None = flag(
        None, "GSM8K-format file whose text trains the tokenizer (default: generated arithmetic problems)."
    )
    vocab_size: int = flag(
        1024,
        "Tokenizer vocabulary size, special tokens included (the byte alphabet takes 256).",
        min=300,
        max=1_000_000,
    )
    pad_vocab: int = flag(
        0,
        "Embedding and LM-head rows in all, beyond the tokenizer's (as Qwen pads 151,643 tokens to 151,936 "
        "rows), so the head's share of compute is realistic; 0: one row per token.",
        min=0,
        max=4_000_000,
    )
    layers: int = flag(2, "Transformer layers.", min=1, max=256)
    hidden: int = flag(64, "Hidden size.", min=8, max=65_536)
    heads: int = flag(4, "Attention heads.", min=1, max=1024)
    kv_heads: int = flag(2, "Key/value heads (grouped-query attention).", min=1, max=1024)
    intermediate: int = flag(0, "MLP width (0: 3 x --hidden); Qwen2.5-0.5B's is 4864.", min=0, max=1_048_576)
    max_positions: int = flag(2048, "Longest sequence the position embeddings cover.", min=16, max=1_048_576)
    seed: int = flag(0, SEED_HELP, min=0, max=MAX_SEED)


@dataclass(frozen=True, kw_only=True)
class SynthConfig(Checked):
    out: str = flag(help="Directory to write train.jsonl and test.jsonl to.", path=True)
    n_train: int = flag(2000, "Problems in the train split.", min=1, max=10_000_000)
    n_test: int = flag(200, "Problems in the test split (none repeats a train question).", min=1, max=10_000_000)
    seed: int = flag(0, SEED_HELP, min=0, max=MAX_SEED)
    max_steps: int = flag(3, "Most arithmetic steps per problem (each has 1 to this many).", min=1, max=100)
    max_number: int = flag(20, "Largest number anywhere in a problem, results included.", min=4, max=1_000_000_000)
    filler_rate: float = flag(0.3, "Chance of a filler sentence before each calculation line.", min=0.0, max=1.0)
    distractors: int = flag(
        0,
        "Sentences per question about someone else's items: numbers the answer does not depend on.",
        min=0,
        max=len(NAMES) - 1,  # each about another person
    )
    teacher_error_rate: float = flag(
        0.0,
        "Also write sft.jsonl, demonstrations by a teacher that adds given-away amounts and distractors "
        "with this chance.",
        min=0.0,
        max=1.0,
    )
    filler_length: int = flag(
        0, "Dial: a line of this many made-up, digit-free words before every event (labelled filler).", min=0,
        max=1000,
    )  # fmt: skip
    filler_vocab: int = flag(256, "Dial: how many made-up words the filler lines draw from.", min=1, max=343_000)
    noise_lines: int = flag(
        0, "Dial: lines of correct arithmetic that do not feed the answer, per problem (labelled noise).", min=0,
        max=100,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SftConfig(ModelOptions, DataOptions, PromptOptions, LoraOptions, TrackingOptions):
    out: str = flag(help="Checkpoint directory to write (model and tokenizer).", path=True)
    steps: int = flag(500, "Optimizer steps.", min=1, max=MAX_STEPS)
    lr: float = flag(1e-5, "Peak learning rate (AdamW).", above=0.0)
    batch_size: int = flag(16, "Examples per optimizer step.", min=1, max=MAX_BATCH)
    max_length: int = flag(1024, "Longest prompt + solution, in tokens (longer ones are cut).", min=1, max=1_048_576)
    warmup_steps: int = flag(0, "Linear warm-up steps.", min=0, max=MAX_STEPS)
    lr_schedule: str = flag("cosine", "Learning-rate decay after warm-up.", choices=SFT_SCHEDULES)
    weight_decay: float = flag(0.0, "AdamW weight decay.", min=0.0)
    gradient_checkpointing: bool = flag(False, "Recompute activations in the backward pass (less memory).")
    seed: int = flag(0, SEED_HELP, min=0, max=MAX_SEED)


@dataclass(frozen=True, kw_only=True)
class RolloutConfig(ModelOptions, DataOptions, SamplingOptions):
    out: str = flag(help="rollouts.parquet to write.", path=True)
    group_size: int = flag(8, "Samples per question (G).", names=("--group-size", "-g"), min=1, max=MAX_SAMPLES)
    iteration: int = flag(0, "Iteration number, part of each rollout_id.", min=0, max=MAX_STEPS)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(ModelOptions, DataOptions, SamplingOptions):
    out: str = flag(help="eval.parquet to write.", path=True)
    split: str = flag("test", "Dataset split (hub datasets, or <split>.jsonl in a directory).")
    samples: int = flag(
        1, "Samples per question (k > 1 adds pass@k and maj@k).", names=("--samples", "-k"), min=1, max=MAX_SAMPLES
    )
    temperature: float = flag(0.0, "Sampling temperature (0 = greedy; use e.g. 0.6 with --samples).", min=0.0)


@dataclass(frozen=True, kw_only=True)
class SegmentConfig(Checked):
    rollouts: str = flag(
        help="rollouts.parquet (from cfiw rollout or another tool).", names=("--rollouts", "-r"), path=True
    )
    model: str = flag(
        help="Model (hub id or directory) whose tokenizer produced the rollouts.", names=("--model", "-m")
    )
    revision: str | None = flag(None, REVISION_HELP)
    out: str = flag(help="spans.parquet to write.", path=True)
    max_spans: int = flag(10, "Most reasoning spans kept per rollout (calculations first).", min=1, max=1000)
    min_tokens: int = flag(5, "Sentences shorter than this are merged into a neighbour.", min=1, max=100_000)
    max_tokens: int = flag(50, "Sentences longer than this are split.", min=1, max=100_000)
    profile: str = flag("cfiw", PROFILE_HELP, choices=PROFILES)

    def check_rules(self) -> None:
        super().check_rules()
        if self.max_tokens < self.min_tokens:
            raise CfiwError(
                f"--min-tokens {self.min_tokens} is above --max-tokens {self.max_tokens}",
                "e.g. --min-tokens 5 --max-tokens 50",
            )


ROLLOUTS_HELP = "rollouts.parquet (from cfiw rollout or another tool)."


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(ModelOptions):
    rollouts: str = flag(help=ROLLOUTS_HELP, names=("--rollouts", "-r"), path=True)
    spans: str = flag(
        help="spans.parquet written by cfiw segment from the same rollouts.", names=("--spans", "-s"), path=True
    )
    out: str = flag(help="scores.parquet to write.", path=True)
    mask: str = flag(
        "pad",
        "pad (span -> pad tokens), delete (span removed), knockout (span hidden from later tokens).",
        choices=MASK_MODES,
    )
    target: str = flag(
        "own", "own: the rollout's own answer tokens; gold: the gold answer in their place.", choices=TARGETS
    )
    batch_tokens: int = flag(8192, "Padded tokens per forward call (memory bound).", min=16, max=MAX_TOKENS_PER_CALL)
    profile: str = flag("cfiw", PROFILE_HELP, choices=PROFILES)
    groups: str = flag(
        "all",
        "all: score every rollout; mixed: only the rollouts of groups whose rewards differ (train's "
        "--dynamic-sampling drops the rest, so their scores would weigh no token).",
        choices=SCORED_GROUPS,
    )

    def check_rules(self) -> None:
        super().check_rules()
        if self.profile == "authors" and self.target != "own":
            raise CfiwError(
                "--profile authors scores the rollout's own answer, as their trainer does", "drop --target gold"
            )


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoraOptions, TrackingOptions):
    model: str = flag(help="Hugging Face hub id or local model directory.", names=("--model", "-m"))
    revision: str | None = flag(None, REVISION_HELP + " It applies to a hub --reference too.")
    dtype: str = flag(
        "auto",
        "Compute dtype of the forward and backward passes, under autocast (weights and AdamW state stay float32): "
        "auto (bfloat16 on a bf16 GPU, else float32), float32 or bfloat16.",
        choices=TRAIN_DTYPES,
    )
    rollouts: str = flag(help=ROLLOUTS_HELP, names=("--rollouts", "-r"), path=True)
    out: str = flag(help="Checkpoint directory to write (may be --model itself; replaced atomically).", path=True)
    spans: str | None = flag(
        None, "spans.parquet (needed unless --weighting uniform or entropy).", names=("--spans", "-s"), path=True
    )
    scores: str | None = flag(None, "scores.parquet (needed by cfiw, inverted, shuffled and random).", path=True)
    weighting: str = flag(
        "cfiw",
        "cfiw, uniform (plain DAPO/GRPO), inverted, shuffled (span deltas permuted), random (i.i.d. U(0,1) "
        "importance), oracle (ground-truth labels of a cfiw synth dataset) or entropy (1 on the batch's "
        "highest-entropy tokens, else 0).",
        choices=MODES,
    )
    profile: str = flag("cfiw", PROFILE_HELP, choices=PROFILES)
    metrics_out: str | None = flag(None, "train_metrics.parquet (default: inside --out).", path=True)
    weights_out: str | None = flag(None, "weights.parquet (default: inside --out).", path=True)
    optimizer: str = flag(
        "adamw",
        "adamw, or sgd (plain gradient steps: the control under which a token's weight scales its gradient "
        "as written; it needs a far larger --lr).",
        choices=OPTIMIZERS,
    )
    momentum: float = flag(0.0, "SGD momentum (0: none).", min=0.0, max=0.999)
    lr: float = flag(1e-6, "Learning rate.", min=0.0)
    warmup_steps: int = flag(0, "Linear warm-up steps.", min=0, max=MAX_STEPS)
    lr_schedule: str = flag("constant", "constant or cosine (over --total-steps).", choices=TRAIN_SCHEDULES)
    total_steps: int | None = flag(
        None, "Horizon of the cosine schedule (default: the steps of this call).", min=1, max=MAX_STEPS
    )
    weight_decay: float = flag(0.0, "Weight decay (AdamW's decoupled; SGD's L2).", min=0.0)
    epochs: int = flag(1, "Passes over the batch.", min=1, max=1000)
    minibatches: int = flag(1, "Optimizer steps per pass.", min=1, max=1_000_000)
    micro_batch_tokens: int = flag(
        8192, "Padded tokens per forward/backward (gradient accumulation).", min=1, max=MAX_TOKENS_PER_CALL
    )
    grad_clip: float = flag(1.0, "Gradient-norm clip (0: off).", min=0.0)
    scale_rewards: str = flag("group", "Advantage scaling: group, batch or none.", choices=REWARD_SCALINGS)
    dynamic_sampling: bool = flag(True, "Drop groups whose rewards are all equal.")
    mask_truncated: bool = flag(True, "Leave completions that hit the length limit out of the loss.")
    loss_type: str = flag(
        "dapo", "dapo (token mean over the batch), grpo (sequence mean) or dr_grpo.", choices=LOSS_TYPES
    )
    eps_low: float = flag(0.2, "Lower clip range of the ratio.", min=0.0)
    eps_high: float = flag(0.28, "Upper clip range of the ratio.", min=0.0)
    beta: float = flag(0.0, "KL coefficient (k3, to --reference); the reference is loaded only when > 0.", min=0.0)
    reference: str | None = flag(
        None, "Reference model for the KL term (default: --model; with LoRA, the policy with its adapters disabled)."
    )
    floor: float = flag(0.2, "Importance floor added to every reasoning token.", min=0.0)
    boost: float = flag(2.0, "Weight of the most important reasoning token (before --conserve).", min=0.0)
    min_weight: float = flag(0.5, "Weight of the least important reasoning token (before --conserve).", min=0.0)
    answer_weight: float = flag(1.5, "Weight of answer tokens (before --conserve).", min=0.0)
    conserve: bool = flag(True, "Rescale each rollout's weights to mean 1 (EOS left out, kept at 1).")
    importance_floor: float = flag(
        0.5,
        "F: scaled importance lies in [F, 1] (0.5, the paper's, keeps reasoning weights within 1.6x of each "
        "other; 0 lets them span [--min-weight, --boost]).",
        min=0.0,
        max=1.0,
    )
    min_spread: float = flag(
        1e-3,
        "Importances whose spread (max - min, nats) is below this are flat: every reasoning token gets F.",
        min=0.0,
    )
    entropy_quantile: float = flag(
        0.8,
        "--weighting entropy: tokens at or above this quantile (0 < q < 1) of the batch's old-policy entropy weigh 1, "
        "the rest 0.",
        check=check_quantile,
    )
    temperature: float | None = flag(
        None,
        "Temperature T of the log-probs, softmax(logits / T) (default: the rollouts' own, from their manifest "
        "or a temperature column; top-p is not applied).",
        above=0.0,
    )
    max_new_tokens: int | None = flag(
        None,
        "dr_grpo normalizer (default: the rollouts' own --max-new-tokens; required for files that do not record it).",
        min=1,
        max=MAX_NEW_TOKENS,
    )
    gradient_checkpointing: bool = flag(False, "Trade compute for activation memory.")
    seed: int = flag(0, SEED_HELP, min=0, max=MAX_SEED)

    def check_rules(self) -> None:
        super().check_rules()
        if self.lora_r and self.reference:
            raise CfiwError(
                "--reference cannot be used with LoRA: the reference is the policy with its adapters disabled",
                "drop --reference (the KL term then anchors to the base model)",
            )
        if self.weighting in SCORED_MODES and not (self.spans and self.scores):
            raise CfiwError(
                f"--weighting {self.weighting} needs --spans and --scores",
                "run cfiw segment and cfiw score first, or use --weighting uniform",
            )
        if self.weighting == "oracle" and not self.spans:
            raise CfiwError("--weighting oracle needs --spans (for the answer region)", "run cfiw segment first")


MODES_HELP = (
    f"Weighting modes, comma-separated, of: {', '.join(MODES)}; MODE@F sets its importance floor (e.g. cfiw@0), "
    "MODE+authors weighs as the authors' trainer does (e.g. cfiw+authors)."
)


def parse_iterations(text: str) -> list[int]:
    """ "0-3,8" -> [0, 1, 2, 3, 8]."""
    chosen: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        first, sep, last = part.partition("-")
        try:
            low, high = int(first), int(last) if sep else int(first)
        except ValueError:
            raise CfiwError(
                f"--iterations {text!r} is not a list of numbers and ranges",
                "e.g. --iterations 0-11 or --iterations 0,4,8",
            ) from None
        if low < 0 or high < low or high > MAX_STEPS:
            raise CfiwError(f"--iterations range {part!r} is empty, negative or too large", "e.g. --iterations 0-11")
        chosen.update(range(low, high + 1))
    if not chosen:
        raise CfiwError(f"--iterations {text!r} names no iteration", "e.g. --iterations 0-11 or --iterations 0,4,8")
    return sorted(chosen)


def split_mode(mode: str) -> tuple[str, float | None, str | None]:
    """ "cfiw@0+authors" -> ("cfiw", 0.0, "authors"): a weighting mode and, optionally, its
    importance floor (`@F`) and the profile of its weights (`+PROFILE`)."""
    rest, plus, profile = mode.partition("+")
    name, sep, floor = rest.partition("@")
    if name not in MODES:
        raise CfiwError(f"unknown mode {name!r} in --modes", f"choose from {', '.join(MODES)}")
    if plus and profile not in PROFILES:
        raise CfiwError(
            f"--modes {mode!r}: the profile after + must be one of {', '.join(PROFILES)}",
            "e.g. cfiw+authors",
        )
    if not sep:
        return name, None, profile or None
    try:
        value = float(floor)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise CfiwError(f"--modes {mode!r}: the importance floor after @ must lie in [0, 1]", "e.g. cfiw@0")
    return name, value, profile or None


def mode_settings(mode: str, train: Any) -> dict[str, Any]:
    """The train settings of `mode` over those of `train` (a TrainConfig): its weighting, and
    its floor and profile where the mode names them."""
    weighting, floor, profile = split_mode(mode)
    return {
        "weighting": weighting,
        "importance_floor": train.importance_floor if floor is None else floor,
        "profile": train.profile if profile is None else profile,
    }


def parse_modes(text: str) -> list[str]:
    """ "uniform, cfiw, cfiw@0" -> ["uniform", "cfiw", "cfiw@0"]: weighting modes, each with an
    optional importance floor and profile."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise CfiwError(f"unknown mode {text!r} in --modes", f"choose from {', '.join(MODES)}")
    for mode in modes:
        split_mode(mode)
    if len(set(modes)) < len(modes):
        raise CfiwError(f"--modes {text!r} names a mode twice", "name each mode once")
    return modes


@dataclass(frozen=True, kw_only=True)
class KeptPoliciesOptions(Checked):
    """A loop run's kept policies (replay, gradients)."""

    run: str = flag(
        help="Run directory written by cfiw loop with kept policies (loop.keep_policies).", path=True, argument=True
    )
    iterations: str | None = flag(
        None, "Kept iterations to use, e.g. 0-11 or 0,4,8 (default: every kept one).", check=parse_iterations
    )


@dataclass(frozen=True, kw_only=True)
class ReplayConfig(KeptPoliciesOptions):
    modes: str = flag("uniform,cfiw,inverted,shuffled,random", MODES_HELP, check=parse_modes)
    optimizer_state: str = flag(
        "kept",
        "kept: start from the optimizer state policy_k had (the loop's own update); fresh: a new optimizer and "
        "schedule.",
        choices=REPLAY_OPTIMIZER_STATES,
    )
    optimizer: str | None = flag(
        None, "adamw or sgd (default: the loop's; another one needs --optimizer-state fresh).", choices=OPTIMIZERS
    )
    momentum: float | None = flag(None, "SGD momentum (default: the loop's).", min=0.0, max=0.999)
    seed: int | None = flag(None, "Seed of the minibatch order (default: the loop's).", min=0, max=MAX_SEED)
    probe_questions: int | None = flag(None, "Probe questions (default: the loop's probe).", min=1, max=MAX_ROWS)
    probe_samples: int | None = flag(
        None, "Samples per probe question (default: the loop's probe).", min=1, max=MAX_SAMPLES
    )
    out: str | None = flag(None, "replay.parquet to write (default: RUN/replay/replay.parquet).", path=True)


GRADIENT_MODES = "uniform,cfiw,cfiw@0,inverted,random,entropy"


@dataclass(frozen=True, kw_only=True)
class GradientsConfig(KeptPoliciesOptions):
    modes: str = flag(GRADIENT_MODES, MODES_HELP, check=parse_modes)
    reference_rollouts: int | None = flag(
        None,
        "Rollouts of the reference gradient: the iteration's questions sampled again, a whole number of times "
        "(default: 8x the iteration's rollouts; 0: no reference).",
        min=0,
        max=MAX_ROWS,
    )
    seed: int | None = flag(
        None, "Sampling seed of the reference rollouts (default: the loop's seed + 1).", min=0, max=MAX_SEED
    )
    shares: bool = flag(
        True, "Also measure each span kind's and synth label's share (one backward pass per part and mode)."
    )
    out: str | None = flag(None, "gradients.parquet to write (default: RUN/gradients/gradients.parquet).", path=True)


# The sections of a `cfiw loop` config (a preset or --config) that are not one stage's settings.
@dataclass(frozen=True, kw_only=True)
class ModelSection(Checked):
    id: str = flag(help="The starting policy: a hub id or a model directory.")
    revision: str | None = flag(None, "Hub revision of the starting policy (see --revision).")


@dataclass(frozen=True, kw_only=True)
class DataSection(Checked):
    dataset: str = flag(help="The dataset (see --dataset).")
    train_split: str = flag("train", "The split rollouts are sampled from.")
    eval_split: str = flag("test", "The split evaluations and the probe use.")


@dataclass(frozen=True, kw_only=True)
class LoopSection(Checked):
    iterations: int = flag(1, "Iterations (rollout, segment, score, train).", min=1, max=MAX_STEPS)
    questions: int = flag(8, "Questions per iteration.", min=1, max=MAX_ROWS)
    weighting: str = flag("cfiw", "The weighting of every update.", choices=MODES)
    profile: str = flag("cfiw", "The profile of segment, score and train (see --profile).", choices=PROFILES)
    eval_every: int = flag(1, "Evaluate before every k-th iteration (and after the last).", min=1, max=MAX_STEPS)
    eval_limit: int | None = flag(None, "Greedy evaluation on this many questions (default: all).", min=1, max=MAX_ROWS)
    seed: int = flag(0, SEED_HELP, min=0, max=MAX_SEED)
    train_pool: int | None = flag(
        None, "Revisit the first this-many train questions (a multiple of questions).", min=1, max=MAX_ROWS
    )
    probe_questions: int = flag(64, "Probe questions (0: no probe).", min=0, max=MAX_ROWS)
    probe_samples: int = flag(8, "Samples per probe question.", min=1, max=MAX_SAMPLES)
    keep_policies: int = flag(
        0, "Keep the policy every k-th iteration started from, for cfiw replay (0: none).", min=0, max=MAX_STEPS
    )
    keep_checkpoints: int = flag(
        0, "Keep only the newest N of those kept policies (0: all of them).", min=0, max=MAX_STEPS
    )
    score: bool = flag(
        True, "Segment and score every iteration's rollouts; --no-score skips both (CFIW's cost baseline)."
    )

    def check_rules(self) -> None:
        super().check_rules()
        if not self.score and (self.weighting in SCORED_MODES or self.weighting == "oracle"):
            raise CfiwError(
                f"weighting {self.weighting!r} reads span scores, and loop.score = false skips segment and score",
                "run the uniform baseline (--weighting uniform --no-score), or score the rollouts",
            )
