"""`cfiw gradients`: what each weighting mode does to the policy gradient, measured without an update.

For each kept iteration k of a loop run (policy_k and iteration k's rollouts, spans and
scores) and each mode, the gradient of the loss `train` would take on each of its first
pass's minibatches (the same groups, in the same order), at policy_k, before any step:

    g = d loss / d theta,   loss = sum_t w_t * (-A_t) * rho_t / normalizer,   rho_t = 1 at policy_k

It records per minibatch:

- `grad_norm`: |g| (the pre-clip norm `train` logs on its first step);
- `uniform_cosine`: cos(g, g_uniform) on the same minibatch;
- `reference_cosine`: cos(g, g_ref), g_ref the uniform gradient over a larger, independent
  sample: the iteration's questions sampled again `--reference-rollouts` / (questions x G)
  times at another seed, each repetition its own GRPO group of G. It estimates the expected
  policy gradient on these questions, where the noise of reward-irrelevant tokens has
  averaged out; `reference_halves_cosine` (its two halves of groups) says how well;
- `halves_cosine`: cos(g_a, g_b), the minibatch's first and second halves of groups: its own
  noise;
- shares: the loss is linear in the token weights, so the part g_p of a set of tokens p is
  the gradient with every other token's weight set to 0, and the parts of a partition sum
  to g. A part's share is <g_p, g> / |g|^2; the shares of a partition sum to 1. Two
  partitions: span kinds (`other`: tokens in no span, the stop token among them) and,
  where the rollouts carry synth labels, the label of each token's line (`other`: a line
  that is no reference sentence). `parts_residual` = the larger of |sum_p g_p - g| / |g|
  over the two partitions, each g_p from its own backward pass. `--no-shares` leaves the
  shares out, and with them most of the cost.

Differences from `train`'s update: every minibatch is measured at policy_k (train's later
minibatches see a policy its earlier steps moved), and the KL term is left out. Cost per
iteration: per micro-batch one forward pass, which every mode shares, and one backward pass
per mode and part; plus sampling and one pass over the reference rollouts.

Layout, under RUN/gradients/:

    MODE/iter-NNNN/gradients.parquet   one row per minibatch (a cell; up to date is skipped)
    reference/iter-NNNN/rollouts.parquet
    gradients.parquet                  every cell's rows (`cfiw sql`'s gradients view)

It runs in one process.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from cfiw_cli import distributed, modeling, schemas, update
from cfiw_cli.algo.loss import LossConfig, loss_normalizer, policy_loss
from cfiw_cli.algo.spans import line_labels
from cfiw_cli.artifacts import settings_of
from cfiw_cli.configs import GradientsConfig, mode_settings, parse_modes
from cfiw_cli.console import info, progress_bar
from cfiw_cli.errors import CfiwError
from cfiw_cli.logprobs import completion_logprobs
from cfiw_cli.pipeline import rollout as rollout_stage
from cfiw_cli.pipeline import train
from cfiw_cli.pipeline.loop import kept_scored_iterations, loop_plan
from cfiw_cli.policies import policy_at
from cfiw_cli.runs import RunLayout, iteration_name
from cfiw_cli.stage import StageRun, guard_inputs, guard_outputs
from cfiw_cli.tasks.arith import label_lookup
from cfiw_cli.update import TrainSequence

if TYPE_CHECKING:
    import torch

OTHER = "other"  # tokens in no span, or on no reference line
REFERENCE_REPEATS = 8


@dataclass(frozen=True)
class Measure:
    """What the gradient of a set of sequences is taken with."""

    temperature: float
    pad_id: int
    micro_batch_tokens: int
    loss: LossConfig
    autocast: Any
    max_new_tokens: int


def flat_gradient(model: Any) -> list[Any]:
    """The trainable parameters, in the order a flattened gradient lists them."""
    return [p for p in model.parameters() if p.requires_grad]


def part_gradients(
    model: Any,
    members: list[TrainSequence],
    weights: dict[str, list[float]],
    parts: dict[str, dict[str, list[float]] | None],
    measure: Measure,
    normalizer_of: list[TrainSequence] | None = None,
) -> dict[str, torch.Tensor]:  # name -> [P]
    """The flattened gradient of the loss over `members` with the token `weights` (per rollout
    id), restricted to each part: `parts[name]` gives each rollout's per-token 0/1 selector
    (None: every token). The normalizer is that of `normalizer_of` (default: `members`), so
    the parts of a partition, and the gradients of disjoint member sets, add up."""
    return mode_part_gradients(model, members, {"": weights}, {"": parts}, measure, normalizer_of)[""]


def mode_part_gradients(
    model: Any,
    members: list[TrainSequence],
    weights: dict[str, dict[str, list[float]]],
    parts: dict[str, dict[str, dict[str, list[float]] | None]],
    measure: Measure,
    normalizer_of: list[TrainSequence] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:  # mode -> name -> [P]
    """`part_gradients` for several modes at once (`weights[mode]`, `parts[mode]`): one forward
    pass per micro-batch serves every mode's backward passes, so a mode costs its backward
    passes alone. Holds modes x parts flattened gradients in float64."""
    import torch

    params = flat_gradient(model)
    size = sum(p.numel() for p in params)
    counted = normalizer_of or members
    full_mask = update.right_aligned([s.mask for s in counted], max(len(s.mask) for s in counted))  # [N, C]
    normalizer = max(loss_normalizer(full_mask, measure.loss.loss_type, measure.max_new_tokens), 1.0)
    out = {mode: {name: torch.zeros(size, dtype=torch.float64) for name in parts[mode]} for mode in weights}
    for batch in update.micro_batches(members, measure.micro_batch_tokens):
        logprobs, _ = completion_logprobs(
            model, [(s.tokens, s.prompt_length) for s in batch], measure.pad_id, measure.temperature, False,
            measure.autocast,
        )  # fmt: skip  # [B, C]
        longest = logprobs.shape[1]
        mask = update.right_aligned([s.mask for s in batch], longest)  # [B, C]
        advantages = torch.tensor([s.advantage for s in batch])  # [B]
        chosen_tokens: dict[int, Any] = {}  # id(selector) -> [B, C], shared by the modes
        for mode, by_rollout in weights.items():
            weight = update.right_aligned([by_rollout[s.rollout_id] for s in batch], longest)  # [B, C]
            everything = None  # this micro-batch's whole gradient in this mode, once taken
            for name, selector in parts[mode].items():
                chosen = weight
                if selector is not None:
                    if id(selector) not in chosen_tokens:
                        chosen_tokens[id(selector)] = update.right_aligned(
                            [selector[s.rollout_id] for s in batch], longest
                        )  # [B, C]
                    chosen = weight * chosen_tokens[id(selector)]  # [B, C]
                    if not bool((chosen * mask).any()):
                        continue  # no token of this part here: its gradient is 0
                    if everything is not None and bool((chosen_tokens[id(selector)] * mask == mask).all()):
                        out[mode][name] += everything  # every token here is in the part (a half's own micro-batch)
                        continue
                loss, _ = policy_loss(
                    logprobs, logprobs.detach(), advantages, mask, normalizer, chosen, None, measure.loss
                )
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                flat = torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                        for g, p in zip(grads, params, strict=True)
                    ]
                )  # [P]
                out[mode][name] += flat
                if selector is None:
                    everything = flat
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """cos(a, b); None when either is 0."""
    norms = float(a.norm()) * float(b.norm())
    return float(a @ b) / norms if norms > 0 else None


def shares(parts: dict[str, torch.Tensor], whole: torch.Tensor) -> list[dict[str, Any]]:
    """Each part's <g_p, g> / |g|^2 (sorted by name); they sum to 1 when the parts sum to g."""
    square = float(whole @ whole)
    return [
        {"part": name, "share": float(part @ whole) / square if square > 0 else None}
        for name, part in sorted(parts.items())
    ]


def token_kinds(sequence: TrainSequence, spans: list[dict]) -> list[str]:
    """Per completion token: the kind of the span holding it, else `other`."""
    kinds = [OTHER] * len(sequence.mask)
    for span in spans:
        for t in range(span["tok_start"], min(span["tok_end"], len(kinds))):
            kinds[t] = span["kind"]
    return kinds


def token_labels(sequence: TrainSequence, labels: list[dict], tokenizer: Any) -> list[str]:
    """Per completion token: the synth label of its line, else `other` (the stop token too)."""
    completion = sequence.tokens[sequence.prompt_length :]
    body = len(completion) - 1 if sequence.ends_with_stop else len(completion)
    found = line_labels(completion, tokenizer, body, label_lookup(labels))
    return [label or OTHER for label in found] + [OTHER] * (len(completion) - body)


def selectors(assignment: dict[str, list[str]]) -> dict[str, dict[str, list[float]]]:
    """{part: {rollout_id: 0/1 per token}} of a per-token assignment to parts."""
    names = sorted({name for values in assignment.values() for name in values})
    return {
        name: {rid: [1.0 if v == name else 0.0 for v in values] for rid, values in assignment.items()} for name in names
    }


def halves(members: list[TrainSequence]) -> tuple[list[TrainSequence], list[TrainSequence]]:
    """The first and second half of a minibatch's groups (in its order; the first gets the odd one)."""
    order = list(dict.fromkeys(s.group for s in members))
    first = set(order[: (len(order) + 1) // 2])
    return [s for s in members if s.group in first], [s for s in members if s.group not in first]


def run(config: GradientsConfig, force: bool = False) -> Path:
    """Every cell, then the summary `--out` (every cell's rows)."""
    import torch

    if distributed.processes() > 1:
        raise CfiwError("cfiw gradients runs in one process", "run it without accelerate launch")
    run_dir = Path(config.run)
    if not run_dir.is_dir():
        what = "is a file, not a run directory" if run_dir.exists() else "not found"
        raise CfiwError(f"run directory {what}: {run_dir}", "pass a directory written by cfiw loop")
    planned = loop_plan(run_dir)
    modes = parse_modes(config.modes)
    trains, rollouts = planned.configs("train"), planned.configs("rollout")
    iterations = kept_scored_iterations(run_dir, trains, config.iterations, "measured")
    seed = planned.loop.seed + 1 if config.seed is None else config.seed
    base = planned.model.id
    root = RunLayout(run_dir).root / "gradients"
    out = Path(config.out) if config.out else root / "gradients.parquet"
    refs = {"config": str(RunLayout(run_dir).config)}
    for i in iterations:
        refs |= {f"{k} of {iteration_name(i)}": getattr(trains[i], k) for k in ("rollouts", "spans", "scores")}
    guard_inputs({"--out": out}, refs, named=lambda key: f"the run's {key}")
    guard_outputs({"--out": out}, "gradients", force=force)
    torch.manual_seed(0)
    rows: list[dict] = []
    for iteration in iterations:
        step, sampling = trains[iteration], rollouts[iteration]
        policy_dir = policy_at(run_dir, iteration, base, False, root / ".policy")
        inputs = {"policy": policy_dir, **{k: getattr(step, k) for k in ("rollouts", "spans", "scores")}}
        cells = {}
        for mode in modes:
            settings = {
                "mode": mode,
                "seed": seed,
                "reference_rollouts": config.reference_rollouts,
                "shares": config.shares,
                "train": settings_of(replace(step, **mode_settings(mode, step)), "model", "metrics_out", "weights_out"),
            }
            cells[mode] = StageRun(
                "gradients", None, inputs, out=root / mode / iteration_name(iteration) / "gradients.parquet",
                settings=settings,
            )  # fmt: skip
        rows += _iteration(config, iteration, step, sampling, policy_dir, cells, seed, root)
    shutil.rmtree(root / ".policy", ignore_errors=True)
    summary = {"modes": modes, "iterations": iterations, "seed": seed, "reference_rollouts": config.reference_rollouts}
    with StageRun("gradients", None, {}, force=force, recompute=True, out=out, settings=summary) as stage:
        table = pa.Table.from_pylist(rows, schema=schemas.GRADIENTS)
        stage.write_table(table, stage.manifest(rows=len(rows), metrics={}))
    info(f"wrote {len(rows)} rows ({len(iterations)} iterations x {len(modes)} modes x minibatches) to {out}")
    return out


def _iteration(
    config: GradientsConfig,
    iteration: int,
    step: Any,
    sampling: Any,
    policy_dir: str,
    cells: dict[str, StageRun],
    seed: int,
    root: Path,
) -> list[dict]:
    """One iteration's cells: those up to date are read, the others measured and written (each
    held open, and so locked, from its check to its write)."""
    done = {}
    with contextlib.ExitStack() as stack:
        for mode, cell in cells.items():
            stack.enter_context(cell)
            if cell.up_to_date:
                done[mode] = pq.read_table(cell.out).to_pylist()
        pending = [m for m in cells if m not in done]

        def write(mode: str, rows: list[dict]) -> None:  # as soon as a mode is measured: a kill keeps it
            table = pa.Table.from_pylist(rows, schema=schemas.GRADIENTS)
            cells[mode].write_table(table, cells[mode].manifest(rows=table.num_rows, metrics={}))
            done[mode] = rows

        if pending:
            _measure_iteration(config, iteration, step, sampling, policy_dir, pending, seed, root, write)
    return [row for mode in cells for row in done[mode]]


def _measure_iteration(
    config: GradientsConfig,
    iteration: int,
    step: Any,
    sampling: Any,
    policy_dir: str,
    modes: list[str],
    seed: int,
    root: Path,
    write: Callable[[str, list[dict]], None],
) -> None:
    model = modeling.load_model(policy_dir, "float32")
    tokenizer = modeling.load_tokenizer(policy_dir)
    batch = train.read_batch(replace(step, model=policy_dir))
    oracle = any(mode_settings(m, step)["weighting"] == "oracle" for m in modes)
    if oracle and "labels" not in batch.rollouts.column_names:
        raise CfiwError(
            f"mode oracle needs the labels column, and {step.rollouts} has none",
            "measure a run on a cfiw synth dataset, or leave oracle out of --modes",
        )
    measure = Measure(
        temperature=batch.sampling["temperature"],
        pad_id=tokenizer.pad_token_id,
        micro_batch_tokens=step.micro_batch_tokens,
        loss=LossConfig(step.eps_low, step.eps_high, 0.0, step.loss_type),
        autocast=update.compute_dtype(step, next(model.parameters()).device),
        max_new_tokens=batch.sampling["max_new_tokens"] or 1,
    )
    weights, sequences = {}, None
    for mode in dict.fromkeys(["uniform", *modes]):
        mode_config = replace(step, **mode_settings(mode, step))
        built, _, _ = train.build_sequences(mode_config, batch.rollouts, batch.spans, batch.scores, tokenizer)
        if mode_config.weighting == "entropy":
            update.weigh_by_entropy(built, _entropies(model, built, measure), mode_config.entropy_quantile)
        weights[mode] = {s.rollout_id: s.weights for s in built}
        sequences = sequences or built
    if not sequences:
        raise CfiwError(f"iteration {iteration}: every group has equal rewards, so there is no gradient", "")
    minibatches = update.plan_minibatches(sequences, step.minibatches, step.seed, 0)
    partitions = _partitions(sequences, batch, tokenizer) if config.shares else {}
    reference = _reference(config, iteration, sampling, step, policy_dir, model, tokenizer, seed, measure, root)
    measured = list(dict.fromkeys(["uniform", *modes]))  # uniform's gradient is every row's comparison
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    with progress_bar(f"gradients {iteration_name(iteration)}", total=len(minibatches)) as advance:
        for index, members in enumerate(minibatches):
            parts = _parts(members, partitions)
            grads = mode_part_gradients(
                model, members, {m: weights[m] for m in measured},
                {m: parts if m in modes else {"whole": None} for m in measured}, measure,
            )  # fmt: skip  # one forward pass per micro-batch for every mode
            for mode in modes:
                rows[mode].append(
                    _minibatch_row(members, grads[mode], partitions, grads["uniform"]["whole"], reference)
                    | {"iteration": iteration, "mode": mode, "minibatch": index, **_mode_columns(mode, step)}
                )
            advance()
    for mode in modes:
        write(mode, rows[mode])


def _mode_columns(mode: str, step: Any) -> dict[str, Any]:
    chosen = mode_settings(mode, step)
    return {key: chosen[key] for key in ("weighting", "importance_floor", "profile")}


def _partitions(sequences: list[TrainSequence], batch: Any, tokenizer: Any) -> dict[str, dict]:
    """{partition: {part: selectors}}: span kinds, and synth labels where the rollouts have them."""
    by_rollout: dict[str, list[dict]] = {}
    for span in batch.spans.select(["rollout_id", "kind", "tok_start", "tok_end"]).to_pylist():
        by_rollout.setdefault(span["rollout_id"], []).append(span)
    out = {"kind": selectors({s.rollout_id: token_kinds(s, by_rollout.get(s.rollout_id, [])) for s in sequences})}
    if "labels" in batch.rollouts.column_names:
        ids, labels = (batch.rollouts.column(name).to_pylist() for name in ("rollout_id", "labels"))
        labels = dict(zip(ids, labels, strict=True))
        out["label"] = selectors({s.rollout_id: token_labels(s, labels[s.rollout_id], tokenizer) for s in sequences})
    return out


def _parts(members: list[TrainSequence], partitions: dict[str, dict]) -> dict[str, Any]:
    """The parts measured on a minibatch: the whole, its first half of groups, each partition's parts."""
    first, _ = halves(members)
    in_first = {s.rollout_id for s in first}
    parts: dict[str, Any] = {
        "whole": None,
        "half": {s.rollout_id: [float(s.rollout_id in in_first)] * len(s.mask) for s in members},
    }
    for partition, chosen in partitions.items():
        parts |= {f"{partition}:{name}": selector for name, selector in chosen.items()}
    return parts


def _minibatch_row(
    members: list[TrainSequence],
    grads: dict[str, torch.Tensor],
    partitions: dict[str, dict],
    uniform: torch.Tensor,
    reference: dict[str, Any],
) -> dict[str, Any]:
    _, second = halves(members)
    whole, half = grads["whole"], grads["half"]
    residual, row_shares = 0.0, {}
    for partition in partitions:
        mine = {k.split(":", 1)[1]: v for k, v in grads.items() if k.startswith(f"{partition}:")}
        total = sum(mine.values(), start=whole * 0)
        residual = max(residual, float((total - whole).norm()) / max(float(whole.norm()), 1e-30))
        counts = {name: _tokens(members, partitions[partition][name]) for name in mine}
        row_shares[partition] = [r | {"tokens": counts[r["part"]]} for r in shares(mine, whole)]
    return {
        "groups": len({s.group for s in members}),
        "sequences": len(members),
        "tokens": int(sum(sum(s.mask) for s in members)),
        "grad_norm": float(whole.norm()),
        "uniform_cosine": cosine(whole, uniform),
        "reference_cosine": cosine(whole, reference["gradient"]) if reference else None,
        "halves_cosine": cosine(half, whole - half) if second else None,
        "reference_halves_cosine": reference.get("halves_cosine") if reference else None,
        "reference_rollouts": reference.get("rollouts") if reference else 0,
        "kind_shares": row_shares.get("kind", []),
        "label_shares": row_shares.get("label", []),
        "parts_residual": residual if partitions else None,
    }


def _tokens(members: list[TrainSequence], selector: dict[str, list[float]]) -> int:
    return int(sum(sum(m * x for m, x in zip(s.mask, selector[s.rollout_id], strict=True)) for s in members))


def _entropies(model: Any, sequences: list[TrainSequence], measure: Measure) -> dict[str, list[float]]:
    """Each sequence's per-token entropies at the policy (what `train`'s entropy mode weighs by)."""
    import torch

    out = {}
    with torch.no_grad():
        for batch in update.micro_batches(sequences, measure.micro_batch_tokens):
            _, entropy = completion_logprobs(
                model, [(s.tokens, s.prompt_length) for s in batch], measure.pad_id, measure.temperature, True,
                measure.autocast,
            )  # fmt: skip  # [B, C]
            for row, s in enumerate(batch):
                length = len(s.tokens) - s.prompt_length
                out[s.rollout_id] = entropy[row, entropy.shape[1] - length :].tolist()
    return out


def _reference(
    config: GradientsConfig,
    iteration: int,
    sampling: Any,
    step: Any,
    policy_dir: str,
    model: Any,
    tokenizer: Any,
    seed: int,
    measure: Measure,
    root: Path,
) -> dict[str, Any] | None:
    """Uniform's gradient over the iteration's questions sampled again (see the module docstring)."""
    per_draw = pq.read_metadata(step.rollouts).num_rows
    wanted = REFERENCE_REPEATS * per_draw if config.reference_rollouts is None else config.reference_rollouts
    if wanted == 0:
        return None
    repeats = wanted // per_draw
    if repeats < 1:
        raise CfiwError(
            f"--reference-rollouts {wanted} is fewer than the iteration's {per_draw} rollouts",
            f"pass a multiple of {per_draw}, or 0 for no reference",
        )
    out = root / "reference" / iteration_name(iteration) / "rollouts.parquet"
    group = sampling.group_size
    config_here = replace(sampling, model=policy_dir, group_size=group * repeats, seed=seed, out=str(out))
    rollout_stage.run(config_here, model=model, tokenizer=tokenizer)
    table = pq.read_table(out)
    seen: dict[str, int] = {}
    draws = []
    for prompt in table.column("prompt_id").to_pylist():
        draws.append(f"{prompt}#{seen.get(prompt, 0) // group}")  # each run of G samples its own group
        seen[prompt] = seen.get(prompt, 0) + 1
    table = table.set_column(table.column_names.index("prompt_id"), "prompt_id", pa.array(draws))
    uniform = replace(step, model=policy_dir, weighting="uniform")
    sequences, _, _ = train.build_sequences(uniform, table, None, None, tokenizer)
    if not sequences:
        return None
    first, second = halves(sequences)
    ones = {s.rollout_id: s.weights for s in sequences}
    a = part_gradients(model, first, ones, {"whole": None}, measure, normalizer_of=sequences)["whole"]
    b = part_gradients(model, second, ones, {"whole": None}, measure, normalizer_of=sequences)["whole"]
    return {"gradient": a + b, "halves_cosine": cosine(a, b), "rollouts": table.num_rows}
