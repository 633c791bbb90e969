"""CFIW inside TRL: a `GRPOTrainer` whose per-token advantages carry counterfactual importance.

TRL generates and rewards a batch as it always does (plain `generate`, vLLM or transformers'
continuous batching; any number of processes, each with its share). Then, in the process and
on the device, `CFIWGRPOTrainer` weighs every completion token the way `cfiw train` would:

1. it cuts each completion into spans with `cfiw segment`'s code (`find_spans`, or the
   authors' detector under `profile="authors"`);
2. it scores every reasoning span with `cfiw score`'s exact prefix-cached scorer, without
   gradients, with the policy as it sampled;
3. it turns the scores into token weights with `cfiw train`'s own code (`build_sequences`, so
   the same mapping, conservation, EOS rule and per-rollout random streams);
4. it multiplies the advantages by the weights: shape (B, T). For a positive weight this is
   the clipped policy-gradient term multiplied by the weight, as `cfiw train` does.

The weights are computed once per generated batch, before TRL shuffles and splits it into
`steps_per_generation` slices and reuses it `num_iterations` times, so every slice, accumulation
step and iteration trains on the weights of the policy that sampled the batch, as `cfiw train`'s
epochs do.

In `uniform` mode nothing is computed and the trainer is stock `GRPOTrainer`, bit for bit.
`CFIWConfig` holds the settings under the names, defaults and checks of `cfiw train`'s,
`cfiw score`'s and `cfiw segment`'s flags, taken from their declarations. What cannot work
here is an error when the trainer is built: `oracle` (TRL's batch has no synth labels),
`entropy` (TRL's own `top_entropy_quantile` is that baseline), a multimodal model, a TRL older
than per-token advantages, and `target="gold"` without a gold column.

With `log_dir`, every generated batch is written as `LOG_DIR/iter-NNNN/{rollouts,spans,scores,
weights}.parquet` in the stages' schemas (see `trl_log.py`), so `cfiw sql` and `cfiw analyze`
read it as they read a run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from packaging.version import Version

from cfiw_cli.algo.importance import score_items
from cfiw_cli.algo.weights import SCORED_MODES
from cfiw_cli.configs import Checked, ScoreConfig, SegmentConfig, TrainConfig
from cfiw_cli.errors import CfiwError
from cfiw_cli.integrations import trl_log
from cfiw_cli.pipeline.score import build_items, score_row
from cfiw_cli.pipeline.segment import spans_of
from cfiw_cli.pipeline.train import build_sequences
from cfiw_cli.schemas import empty_table

MIN_TRL = "0.26.0"  # the first TRL whose loss takes (B, T) advantages from a subclass
GOLD_COLUMNS = ("gold", "answer")  # where a dataset row's gold answer may be, in this order


def _declared(config_class: type, name: str) -> Any:
    """The field `name` exactly as `config_class` declares it (default, help, limits, choices)."""
    declared = config_class.__dataclass_fields__[name]
    return dataclasses.field(default=declared.default, metadata=declared.metadata)


UNSUPPORTED = {
    "oracle": "needs the synth labels of each rollout, which TRL's batch does not carry",
    "entropy": "is TRL's own GRPOConfig(top_entropy_quantile=0.2); use that",
}


@dataclass(frozen=True, kw_only=True)
class CFIWConfig(Checked):
    """The CFIW settings of a TRL run, declared where `cfiw train`, `score` and `segment` declare them."""

    weighting: str = _declared(TrainConfig, "weighting")
    profile: str = _declared(TrainConfig, "profile")
    floor: float = _declared(TrainConfig, "floor")
    boost: float = _declared(TrainConfig, "boost")
    min_weight: float = _declared(TrainConfig, "min_weight")
    answer_weight: float = _declared(TrainConfig, "answer_weight")
    conserve: bool = _declared(TrainConfig, "conserve")
    importance_floor: float = _declared(TrainConfig, "importance_floor")
    min_spread: float = _declared(TrainConfig, "min_spread")
    seed: int = _declared(TrainConfig, "seed")
    mask: str = _declared(ScoreConfig, "mask")
    target: str = _declared(ScoreConfig, "target")
    batch_tokens: int = _declared(ScoreConfig, "batch_tokens")
    max_spans: int = _declared(SegmentConfig, "max_spans")
    min_tokens: int = _declared(SegmentConfig, "min_tokens")
    max_tokens: int = _declared(SegmentConfig, "max_tokens")
    log_dir: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Write each generated batch's rollouts, spans, scores and weights here."},
    )

    def check_rules(self) -> None:
        super().check_rules()
        if self.weighting in UNSUPPORTED:
            raise CfiwError(f"weighting {self.weighting!r} {UNSUPPORTED[self.weighting]}", "choose another weighting")
        self.stage_configs()  # the rules that tie these settings together, as the stages check them

    def stage_configs(self) -> tuple[SegmentConfig, ScoreConfig, TrainConfig]:
        """The segment, score and train configs these settings stand for (paths are placeholders)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        pick = lambda cls: {k: v for k, v in own.items() if k in {f.name for f in dataclasses.fields(cls)}}  # noqa: E731
        segment = SegmentConfig(model="policy", rollouts="batch", out="spans", **pick(SegmentConfig))
        score = ScoreConfig(model="policy", rollouts="batch", spans="spans", out="scores", **pick(ScoreConfig))
        train = TrainConfig(
            model="policy", rollouts="batch", spans="spans", scores="scores", out="policy", **pick(TrainConfig)
        )
        return segment, score, train


def batch_tables(
    prompts: list[list[int]],
    completions: list[list[int]],
    stops: list[bool],
    ids: list[str],
    groups: list[str],
    **columns: list[Any],
) -> pa.Table:
    """The batch as a rollouts table: the columns segment, score and train read, plus any other
    rollouts column given per row in `columns` (rewards, gold answers, texts)."""
    rows = [
        {
            "rollout_id": rollout_id,
            "prompt_id": group,
            "prompt_ids": prompt,
            "completion_ids": completion,
            "completion_logprobs": [0.0] * len(completion),
            "finish_reason": "stop" if stop else "length",
            "reward": 0.0,
            "gold": "",
        }
        for rollout_id, group, prompt, completion, stop in zip(ids, groups, prompts, completions, stops, strict=True)
    ]
    for name, values in columns.items():
        for row, value in zip(rows, values, strict=True):
            row[name] = value
    return pa.Table.from_pylist(rows)


@dataclass
class WeighedBatch:
    """What weighing a batch produced, in the stages' row layouts."""

    spans: list[dict]  # spans.parquet rows
    scores: list[dict]  # scores.parquet rows (empty when the mode reads no scores)
    weights: list[dict]  # weights.parquet rows, one per rollout, in the batch's order


def weigh(config: CFIWConfig, model: Any, tokenizer: Any, rollouts: pa.Table) -> WeighedBatch:
    """Segment, score (in the modes that read scores) and weigh a batch, as the three stages do."""
    segment, score, train = config.stage_configs()
    span_rows = []
    for row in rollouts.select(["rollout_id", "completion_ids", "finish_reason"]).to_pylist():
        spans = spans_of(row["completion_ids"], tokenizer, segment, ends_with_stop=row["finish_reason"] == "stop")
        span_rows += [
            {"rollout_id": row["rollout_id"], "span_idx": i, **dataclasses.asdict(s)} for i, s in enumerate(spans)
        ]
    # as `cfiw train` reads them: a batch without spans or scores is an empty table of its kind
    spans_table = pa.Table.from_pylist(span_rows) if span_rows else empty_table("spans")
    score_rows = []
    if span_rows and config.weighting in SCORED_MODES:
        ids, span_indices, items = build_items(rollouts, spans_table, score.target, tokenizer, score.profile)
        results = score_items(model, items, score.mask, tokenizer.pad_token_id, batch_tokens=score.batch_tokens)
        for rollout_id, indices, result in zip(ids, span_indices, results, strict=True):
            score_rows += [
                score_row(rollout_id, i, result.base, masked, score.mask, score.target)
                for i, masked in zip(indices, result.masked, strict=True)
            ]
    scores_table = pa.Table.from_pylist(score_rows) if score_rows else empty_table("scores")
    train = dataclasses.replace(train, dynamic_sampling=False)
    _, weight_rows, _ = build_sequences(train, rollouts, spans_table, scores_table, tokenizer)
    for row in weight_rows:
        row["weighting"] = config.weighting
    return WeighedBatch(span_rows, score_rows, weight_rows)


def token_weights_of(config: CFIWConfig, model: Any, tokenizer: Any, rollouts: pa.Table) -> list[list[float]]:
    """Per rollout its token weights, one per completion token."""
    return [row["token_weights"] for row in weigh(config, model, tokenizer, rollouts).weights]


def load_tokenizer(model: str) -> Any:
    """The model's tokenizer for TRL: it hands the model only input ids and the attention mask.
    A tokenizer saved without `model_input_names` (cfiw's tiny ones) would add token type ids,
    which a decoder-only model's `generate` refuses under transformers 4.x."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def _trainer_class() -> type:
    import trl
    from trl import GRPOTrainer

    if Version(trl.__version__) < Version(MIN_TRL):
        raise CfiwError(
            f"TRL {trl.__version__} cannot take per-token advantages from a subclass",
            f"install trl>={MIN_TRL}",
        )

    class CFIWGRPOTrainer(GRPOTrainer):
        """TRL's `GRPOTrainer` with counterfactual importance in its per-token advantages."""

        def __init__(self, *args: Any, cfiw: CFIWConfig | None = None, **kwargs: Any) -> None:
            self.cfiw = cfiw if cfiw is not None else CFIWConfig()
            if self.cfiw.log_dir is not None:
                trl_log.check_empty(self.cfiw.log_dir)
            super().__init__(*args, **kwargs)
            if getattr(self.model.config, "vision_config", None) is not None:
                raise CfiwError("CFIW scores text spans; a multimodal model is not supported", "use a text model")
            columns = set(getattr(self.train_dataset, "column_names", None) or [])
            if self.cfiw.target == "gold" and columns and not columns & set(GOLD_COLUMNS):
                raise CfiwError(
                    "target 'gold' scores the gold answer, but the dataset has no 'gold' or 'answer' column",
                    "add the gold answer as a 'gold' column, or score the model's own answer (target own)",
                )
            self._cfiw_batches = 0
            self._cfiw_rewards: Any = None

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
            self._cfiw_rewards = super()._calculate_rewards(*args, **kwargs)  # [N, F], every process's rows
            return self._cfiw_rewards

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            output = super()._generate_and_score_completions(inputs)
            training = self.model.training  # TRL's evaluation batches are weighed too, never logged
            logging = training and self.cfiw.log_dir is not None
            if self.cfiw.weighting == "uniform" and not logging:
                return output
            started = time.perf_counter()
            rollouts = self.cfiw_rollouts(output, inputs)
            weighed = self.cfiw_weigh(rollouts)
            advantages = output["advantages"]  # [B], TRL's
            if self.cfiw.weighting != "uniform":
                output["advantages"] = self.cfiw_advantages(output, weighed)
            if logging:
                seconds = time.perf_counter() - started
                trl_log.write_batch(self, output, inputs, rollouts, weighed, advantages.tolist(), seconds)
            if training:
                self._cfiw_batches += 1
            return output

        def cfiw_weigh(self, rollouts: pa.Table) -> WeighedBatch:
            """Segment, score and weigh this process's share, without gradients, in eval mode."""
            import torch

            model = self.accelerator.unwrap_model(self.model)
            training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    return weigh(self.cfiw, model, self.processing_class, rollouts)
            finally:
                model.train(training)

        def cfiw_advantages(self, output: dict[str, Any], weighed: WeighedBatch) -> Any:
            """(B, T) advantages: each completion token's advantage times its CFIW weight."""
            import torch

            completion = output["completion_ids"]  # [B, T]
            table = torch.ones(completion.shape, dtype=output["advantages"].dtype, device=completion.device)  # [B, T]
            for row, weights in enumerate(weighed.weights):
                values = weights["token_weights"]
                table[row, : len(values)] = torch.tensor(values, dtype=table.dtype, device=table.device)
            advantages = output["advantages"]
            return (advantages if advantages.dim() == 2 else advantages.unsqueeze(1)) * table  # [B, T]

        def cfiw_rollouts(self, output: dict[str, Any], inputs: list[dict[str, Any]]) -> pa.Table:
            """This process's share of the batch as a rollouts table (ids: batch:process:row)."""
            prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]  # [B, P] each, left padded
            completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]  # [B, T] each
            eos = self.processing_class.eos_token_id
            prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
            completions = [
                ids[: int(mask.sum())].tolist() for ids, mask in zip(completion_ids, completion_mask, strict=True)
            ]
            stops = [bool(c) and c[-1] == eos for c in completions]
            batch, rank = self._cfiw_batches, self.accelerator.process_index
            ids = [f"{batch}:{rank}:{row}" for row in range(len(completions))]
            groups = [f"{batch}:{rank}:{row // self.num_generations}" for row in range(len(completions))]
            golds = [next((str(x[c]) for c in GOLD_COLUMNS if x.get(c) is not None), "") for x in inputs]
            if self.cfiw.target == "gold" and not all(golds):
                raise CfiwError(
                    "target 'gold' needs each row's gold answer, and a batch row has none",
                    "give every dataset row a 'gold' (or 'answer') value",
                )
            return batch_tables(prompts, completions, stops, ids, groups, gold=golds)

    return CFIWGRPOTrainer


def __getattr__(name: str) -> Any:
    """`CFIWGRPOTrainer` is built on first use, so importing this module does not import TRL."""
    if name == "CFIWGRPOTrainer":
        trainer = _trainer_class()
        globals()[name] = trainer
        return trainer
    raise AttributeError(name)
