"""Per-token loss weights from span importances, in the four weighting modes.

For one rollout with reasoning region [0, a) (everything before the answer span) and
scored spans s with importance delta_s:

    I_t  = floor + sum over spans s containing t of delta_s / len(s)      (reasoning tokens)
    Î_t  = 0.5 + 0.5 * (I_t - min I) / (max I - min I)    over the reasoning region (1 if flat)
    w_t  = min_weight + (boost - min_weight) * Î_t
    answer tokens get `answer_weight`, the stop token 1, anything else after the reasoning 1;
    with `conserve`, all weights are rescaled so their mean over the completion is 1.

Modes: `cfiw` as above; `inverted` uses Î'_t = (max Î + min Î) - Î_t, so the most important
span gets the least weight; `shuffled` permutes the span deltas within the rollout first
(same multiset, random placement); `uniform` is all ones (plain DAPO/GRPO).

Differences from the paper's description: tokens of the reasoning region that no scored span
covers get I_t = floor (not skipped), so they take part in the normalisation; a rollout
without an answer span (nothing was scored) gets all ones in every mode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

MODES = ("cfiw", "uniform", "inverted", "shuffled")


@dataclass(frozen=True)
class WeightConfig:
    floor: float = 0.2
    boost: float = 2.0
    min_weight: float = 0.5
    answer_weight: float = 1.5
    conserve: bool = True


@dataclass(frozen=True)
class ScoredSpan:
    kind: str  # calculation | numeric | scaffolding | answer
    tok_start: int
    tok_end: int
    delta: float | None = None  # None: not scored (answer spans, spans left out of scoring)


def token_weights(
    num_tokens: int,
    spans: Sequence[ScoredSpan],
    mode: str,
    config: WeightConfig = WeightConfig(),
    ends_with_stop: bool = False,
    rng: random.Random | None = None,
) -> list[float]:
    """One weight per completion token (`num_tokens` includes the stop token, if any)."""
    if mode not in MODES:
        raise ValueError(f"unknown weighting mode {mode!r}")
    answers = [s for s in spans if s.kind == "answer"]
    if mode == "uniform" or not answers:
        return [1.0] * num_tokens
    answer = answers[0]
    reasoning_end = answer.tok_start
    scored = [s for s in spans if s.kind != "answer" and s.delta is not None]
    deltas = [s.delta for s in scored]
    if mode == "shuffled":
        (rng or random.Random(0)).shuffle(deltas)

    importance = [config.floor] * reasoning_end  # I_t
    for span, delta in zip(scored, deltas):
        for t in range(span.tok_start, min(span.tok_end, reasoning_end)):
            importance[t] += delta / (span.tok_end - span.tok_start)
    if importance:
        low, high = min(importance), max(importance)
        scaled = [0.5 + 0.5 * (i - low) / (high - low) for i in importance] if high > low else [1.0] * len(importance)  # Î_t
        if mode == "inverted":
            top, bottom = max(scaled), min(scaled)
            scaled = [top + bottom - x for x in scaled]
    else:
        scaled = []
    weights = [config.min_weight + (config.boost - config.min_weight) * x for x in scaled]
    weights += [1.0] * (num_tokens - reasoning_end)
    for t in range(answer.tok_start, min(answer.tok_end, num_tokens)):
        weights[t] = config.answer_weight
    if ends_with_stop and num_tokens:
        weights[-1] = 1.0
    if config.conserve and num_tokens:
        mean = sum(weights) / num_tokens
        weights = [w / mean for w in weights]
    return weights
