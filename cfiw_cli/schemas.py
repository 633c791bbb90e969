"""Arrow schemas of the artifacts (the minimum columns of each file; extra columns are kept).

`validate(table, kind, path)` checks a table read from disk: a missing column or one whose type
cannot be cast safely is named in a `CfiwError`. Safe casts (int64 -> int32, double -> float,
large_string -> string) are applied, so files written by other tools are accepted.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from cfiw_cli.errors import CfiwError

TOKEN_IDS = pa.list_(pa.int32())
TOKEN_FLOATS = pa.list_(pa.float32())

ROLLOUTS = pa.schema(
    [
        ("rollout_id", pa.string()),
        ("iteration", pa.int32()),
        ("prompt_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("question", pa.string()),
        ("gold", pa.string()),
        ("prompt_text", pa.string()),
        ("completion_text", pa.string()),
        ("prompt_ids", TOKEN_IDS),
        ("completion_ids", TOKEN_IDS),
        ("completion_logprobs", TOKEN_FLOATS),
        ("finish_reason", pa.string()),
        ("pred", pa.string()),
        ("reward", pa.float32()),
        ("correct", pa.bool_()),
    ]
)

SPANS = pa.schema(
    [
        ("rollout_id", pa.string()),
        ("span_idx", pa.int32()),
        ("kind", pa.string()),
        ("tok_start", pa.int32()),
        ("tok_end", pa.int32()),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
        ("text", pa.string()),
    ]
)

SCORES = pa.schema(
    [
        ("rollout_id", pa.string()),
        ("span_idx", pa.int32()),
        ("mask", pa.string()),
        ("base_logp", pa.float32()),
        ("masked_logp", pa.float32()),
        ("delta", pa.float32()),
    ]
)

WEIGHTS = pa.schema(
    [
        ("rollout_id", pa.string()),
        ("weighting", pa.string()),
        ("token_weights", TOKEN_FLOATS),
        ("advantage", pa.float32()),
    ]
)

TRAIN_METRICS = pa.schema(
    [
        ("step", pa.int32()),
        ("loss", pa.float32()),
        ("pg_loss", pa.float32()),
        ("kl", pa.float32()),
        ("entropy", pa.float32()),
        ("clip_frac_low", pa.float32()),
        ("clip_frac_high", pa.float32()),
        ("grad_norm", pa.float32()),
        ("lr", pa.float32()),
        ("tokens", pa.int64()),
        ("seconds", pa.float32()),
    ]
)

EVAL = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("question", pa.string()),
        ("gold", pa.string()),
        ("completion_text", pa.string()),
        ("finish_reason", pa.string()),
        ("pred", pa.string()),
        ("correct", pa.bool_()),
    ]
)

# What cfiw itself writes: the required columns above plus diagnostics. Readers need only the
# required ones, so files from other tools that lack these still validate.
SCORES_WRITTEN = SCORES.append(pa.field("target", pa.string()))  # own or gold answer tokens
WEIGHTS_WRITTEN = WEIGHTS.append(pa.field("kept", pa.bool_())).append(pa.field("truncated", pa.bool_()))
TRAIN_METRICS_WRITTEN = pa.schema(
    [
        *TRAIN_METRICS,
        ("ratio_mean", pa.float32()),
        ("weight_mean", pa.float32()),
        ("weight_std", pa.float32()),
        ("rollout_logprob_diff", pa.float32()),
        ("epoch", pa.int32()),
        ("sequences", pa.int32()),
    ]
)

SHARES = pa.list_(pa.struct([("part", pa.string()), ("share", pa.float64()), ("tokens", pa.int64())]))
GRADIENTS = pa.schema(  # cfiw gradients: one row per iteration x mode x minibatch
    [
        ("iteration", pa.int32()),
        ("mode", pa.string()),
        ("weighting", pa.string()),
        ("importance_floor", pa.float64()),
        ("profile", pa.string()),
        ("minibatch", pa.int32()),
        ("groups", pa.int32()),
        ("sequences", pa.int32()),
        ("tokens", pa.int64()),
        ("grad_norm", pa.float64()),
        ("uniform_cosine", pa.float64()),
        ("reference_cosine", pa.float64()),
        ("halves_cosine", pa.float64()),
        ("reference_halves_cosine", pa.float64()),
        ("reference_rollouts", pa.int64()),
        ("kind_shares", SHARES),
        ("label_shares", SHARES),
        ("parts_residual", pa.float64()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "rollouts": ROLLOUTS,
    "spans": SPANS,
    "scores": SCORES,
    "weights": WEIGHTS,
    "train_metrics": TRAIN_METRICS,
    "eval": EVAL,
}


def _castable(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual.equals(expected) or pa.types.is_null(actual):
        return True
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_boolean(expected):
        return pa.types.is_boolean(actual)
    if pa.types.is_list(expected):
        is_list = pa.types.is_list(actual) or pa.types.is_large_list(actual)
        return is_list and _castable(actual.value_type, expected.value_type)
    return False


# Columns that identify a row: each key appears once per file.
KEYS: dict[str, tuple[str, ...]] = {
    "rollouts": ("rollout_id",),
    "spans": ("rollout_id", "span_idx"),
    "scores": ("rollout_id", "span_idx"),
    "weights": ("rollout_id",),
    "train_metrics": ("step",),
    "eval": ("prompt_id", "sample_idx"),
}
# Columns that may hold nulls (an answer that could not be extracted); every other one may not.
NULLABLE = {"pred", "gold", "question", "prompt_text", "completion_text", "text", "iteration", "sample_idx"}


def validate(table: pa.Table, kind: str, path: str = "") -> pa.Table:
    """Return `table` with the required columns cast to their schema types (extras kept);
    a null where a value is needed, or a key that appears twice, is an error."""
    where = f" in {path}" if path else ""
    for field in SCHEMAS[kind]:
        if field.name not in table.column_names:
            raise CfiwError(
                f"{kind} file{where} has no column '{field.name}'",
                f"a {kind} file needs the columns: {', '.join(SCHEMAS[kind].names)}",
            )
        column = table.column(field.name)
        if column.type.equals(field.type):
            continue
        if not _castable(column.type, field.type):
            raise CfiwError(
                f"column '{field.name}'{where} has type {column.type}, expected {field.type}",
                f"rewrite the {kind} file with the schema documented in docs/commands.md",
            )
        index = table.column_names.index(field.name)
        try:
            cast = column.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise CfiwError(
                f"column '{field.name}'{where} holds a value that does not fit {field.type}: {exc}",
                f"rewrite the {kind} file with the schema documented in docs/commands.md",
            ) from exc
        table = table.set_column(index, field.name, cast)
    _check_values(table, kind, where)
    if kind == "rollouts":
        _check_token_ids(table, where)
    if kind == "spans":
        _check_spans_disjoint(table, where)
    return table


def _check_token_ids(table: pa.Table, where: str) -> None:
    """Token ids are vocabulary indices: never negative (they fit int32 once cast)."""
    for name in ("prompt_ids", "completion_ids"):
        column = table.column(name)
        lowest = pc.min(pc.list_flatten(column)).as_py()
        if lowest is None or lowest >= 0:
            continue
        row = next(i for i, ids in enumerate(column.to_pylist()) if ids and min(ids) < 0)
        raise CfiwError(
            f"column '{name}'{where} holds a negative token id ({lowest}) in row {row}",
            "token ids index the model's vocabulary: rewrite the rollouts with the model's tokenizer",
        )


def _check_spans_disjoint(table: pa.Table, where: str) -> None:
    """The spans of a rollout are token ranges that do not overlap (each token has one span)."""
    columns = (table.column(c).to_pylist() for c in ("rollout_id", "tok_start", "tok_end", "span_idx"))
    previous: dict[str, tuple[int, int]] = {}
    for rollout_id, start, end, index in sorted(zip(*columns, strict=True), key=lambda r: (r[0], r[1], r[2])):
        if end <= start:
            raise CfiwError(
                f"span {index} of rollout {rollout_id!r}{where} is empty or reversed ([{start}, {end}))",
                "each span needs tok_start < tok_end: cut the rollouts again with cfiw segment",
            )
        if rollout_id in previous and start < previous[rollout_id][1]:
            other, other_end = previous[rollout_id]
            raise CfiwError(
                f"spans {other} and {index} of rollout {rollout_id!r}{where} overlap (tokens {start} to "
                f"{min(end, other_end)})",
                "each token belongs to one span at most: cut the rollouts again with cfiw segment",
            )
        previous[rollout_id] = (index, end)


def _check_values(table: pa.Table, kind: str, where: str) -> None:
    keys = KEYS[kind]
    for field in SCHEMAS[kind]:
        column = table.column(field.name)
        if field.name not in NULLABLE and column.null_count:
            row = column.is_null().to_pylist().index(True)
            raise CfiwError(
                f"column '{field.name}'{where} is empty (null) in row {row}",
                f"every row of a {kind} file needs a {field.name}",
            )
    seen: set[tuple] = set()
    for key in zip(*(table.column(name).to_pylist() for name in keys), strict=True):
        if key in seen:
            shown = ", ".join(f"{name} {value!r}" for name, value in zip(keys, key, strict=True))
            raise CfiwError(f"{kind} file{where} holds {shown} twice", "each row's key must appear once")
        seen.add(key)


def empty_table(kind: str) -> pa.Table:
    return SCHEMAS[kind].empty_table()
