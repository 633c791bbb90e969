"""Per-token loss weights from span importances: seven weighting modes, two profiles.

One rollout has a reasoning region [0, a) (everything before the answer span), the answer
span [a, b) and, when it ended on a stop token, that EOS token last. Scored spans s carry
delta_s = answer log-prob unmasked - answer log-prob with s masked (nats).

Profile `cfiw` (the default):

    I_t = floor + sum over spans s containing t of delta_s / len(s)       reasoning tokens
    Î_t = F + (1 - F) * (I_t - min I) / (max I - min I)      over the reasoning region;
          Î_t = F when max I - min I < min_spread (1e-3 nats: noise, not signal)
    w_t = min_weight + (boost - min_weight) * Î_t           answer tokens: answer_weight
    conserve: every weight but EOS's is divided by their mean; EOS always weighs 1

F is `importance_floor`, 0.5 in the paper: reasoning weights then lie in [1.25, 2.0] before
conservation, at most 1.6x apart, and the answer's 1.5 inside that band. F = 0 lets them span
[min_weight, boost]. Dividing a span's delta by its length is on purpose: a long span is not
worth more for being long.

Modes: `cfiw` as above; `inverted` uses Î'_t = (max Î + min Î) - Î_t over the reasoning
region; `shuffled` permutes the span deltas within the rollout before computing I; `random`
draws I_t i.i.d. from U(0, 1) per reasoning token (seeded per rollout) instead of using the
deltas; `uniform` is all ones (plain DAPO/GRPO). A rollout with no scored reasoning span, or
without an answer span, gets all ones in every mode, so every mode reweights the same rollouts.

Two references that do not read the scores:
- `oracle`: a reasoning token on a line that feeds the answer (the ground-truth labels of a
  `cfiw synth` dataset; `relevant` comes from `cfiw_cli.algo.spans.line_relevance`) gets
  `boost`, every other reasoning token `min_weight`, answer tokens `answer_weight`, then the
  same conservation: the upper reference for what perfect importance could give.
- `entropy` (`entropy_weights`): the 80/20 baseline. A token whose entropy under the old
  policy (at the sampling temperature) is at or above the q-quantile of the batch's weighs 1,
  the rest 0, without conservation (the loss normaliser still counts every token, as TRL's
  `top_entropy_quantile` does). The quantile is taken once per batch (every token that
  carries loss in the update), not per sequence; EOS weighs 1 and is left out of it, as in
  every mode.

Profile `authors` reproduces the authors' trainer (their `compute_batched_counterfactual_
importance`, `compute_counterfactual_importance` and `compute_soft_weights`) on the spans
`cfiw segment --profile authors` finds and the scores `cfiw score --profile authors` measures:
- each span's **full** delta is added to every token of the span (not divided by its length);
- the importance of answer tokens and EOS is 0, and Î is min-max scaled only when
  max I > min I exactly (no min_spread);
- `inverted` flips Î over the whole completion (answer and EOS included, where Î is 0),
  so reasoning tokens land in [0, 0.5] and the answer region at 1 before its override;
- `random` draws Î_t ~ U(0, 1) for every completion token, with no min-max scaling;
- tokens that decode to `#`, `##`, `###`, `####`, `=`, `==`, `===`, `====`, `-`, `--` or
  `---` (after stripping whitespace) with Î_t > 0 have Î_t multiplied by 0.1. This is copied
  faithfully, though it weighs a correct subtraction operator ` -` below a wrong ` +`;
- a rollout with no scored span gets Î = F on its reasoning region (1.0 in `inverted`,
  whose code path returns before inverting, with the answer region and EOS at `floor`);
- the constants are ours: floor 0.2, min_weight 0.5, boost 2.0, answer_weight 1.5, F 0.5.

Differences from the authors' trainer that remain in the `authors` profile: the answer region
of the weights is the answer span of `segment` (they find the marker again by matching its
stand-alone tokenization, which misses markers tokenized differently in context and leaves
those answers at min_weight); weights are computed once from the scores of the sampling
policy rather than inside each loss call by the policy being trained; a micro-batch whose
advantages are all equal is not special-cased (they skip weighting there, which depends on
how rollouts fall into micro-batches); a rollout without an answer span gets all ones.
`oracle` and `entropy` are the same under both profiles.

Each (mode, profile) pair is one entry of `WEIGHTINGS`, its rule; a pair without an entry
is an error, so a new mode cannot silently take another mode's rule under a profile.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MODES = ("cfiw", "uniform", "inverted", "shuffled", "random", "oracle", "entropy")
SCORED_MODES = ("cfiw", "inverted", "shuffled", "random")  # the modes that read span scores
PROFILES = ("cfiw", "authors")
FORMATTING_TOKENS = frozenset({"#", "##", "###", "####", "=", "==", "===", "====", "-", "--", "---"})
FORMATTING_SCALE = 0.1


@dataclass(frozen=True)
class WeightConfig:
    floor: float = 0.2
    boost: float = 2.0
    min_weight: float = 0.5
    answer_weight: float = 1.5
    conserve: bool = True
    min_spread: float = 1e-3  # nats; a smaller spread of I is treated as flat (profile cfiw)
    profile: str = "cfiw"
    importance_floor: float = 0.5  # F: Î lies in [F, 1]


@dataclass(frozen=True)
class ScoredSpan:
    kind: str  # calculation | numeric | scaffolding | answer
    tok_start: int
    tok_end: int
    delta: float | None = None  # None: not scored (answer spans, spans left out of scoring)


@dataclass(frozen=True)
class _Rollout:
    """What a weighting rule reads of one rollout."""

    body: int  # completion tokens but the stop token
    reasoning_end: int  # the reasoning region is [0, reasoning_end)
    scored: Sequence[ScoredSpan]  # reasoning spans with a delta
    config: WeightConfig
    rng: random.Random
    token_texts: Sequence[str] | None
    relevant: Sequence[bool] | None


Rule = Callable[[_Rollout], "list[float] | None"]  # w_t over the body before the answer's; None: all ones


def token_weights(
    num_tokens: int,
    spans: Sequence[ScoredSpan],
    mode: str,
    config: WeightConfig = WeightConfig(),
    ends_with_stop: bool = False,
    rng: random.Random | None = None,
    token_texts: Sequence[str] | None = None,
    relevant: Sequence[bool] | None = None,
) -> list[float]:
    """One weight per completion token (`num_tokens` includes the stop token, if any).

    `rng` drives `shuffled` and `random`; `token_texts` (each token decoded on its own) is
    needed by the `authors` profile for its formatting-token rule; `relevant` (per token:
    whether its line feeds the answer) by `oracle`. `entropy` is `entropy_weights`' job.
    The rule of each (mode, profile) is its entry in `WEIGHTINGS`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown weighting mode {mode!r}")
    if config.profile not in PROFILES:
        raise ValueError(f"unknown weighting profile {config.profile!r}")
    if mode == "entropy":
        raise ValueError("entropy weights need the old policy's entropies: use entropy_weights")
    rule = WEIGHTINGS.get((mode, config.profile))
    if rule is None:
        raise ValueError(f"no weighting rule for mode {mode!r} under profile {config.profile!r}")
    answers = [s for s in spans if s.kind == "answer"]
    if not answers or num_tokens == 0:
        return [1.0] * num_tokens
    body = num_tokens - 1 if ends_with_stop else num_tokens  # every token but EOS
    answer = answers[0]
    scored = [s for s in spans if s.kind != "answer" and s.delta is not None]
    rollout = _Rollout(
        body, min(answer.tok_start, body), scored, config, rng or random.Random(0), token_texts, relevant
    )
    weights = rule(rollout)
    if weights is None:
        return [1.0] * num_tokens
    for t in range(max(answer.tok_start, 0), min(answer.tok_end, body)):
        weights[t] = config.answer_weight
    if config.conserve and body:
        mean = sum(weights) / body
        if mean > 0:
            weights = [w / mean for w in weights]
    return weights + [1.0] * (num_tokens - body)


def span_importance(
    reasoning_end: int,
    spans: Sequence[ScoredSpan],
    deltas: Sequence[float],
    floor: float,
    per_token: bool = True,
) -> list[float]:
    """I_t over the reasoning region: the floor plus each covering span's delta / length
    (`per_token`), or its full delta on every token (the authors' trainer)."""
    importance = [floor] * reasoning_end
    for span, delta in zip(spans, deltas, strict=True):
        share = delta / (span.tok_end - span.tok_start) if per_token else delta
        for t in range(max(span.tok_start, 0), min(span.tok_end, reasoning_end)):
            importance[t] += share
    return importance


def _deltas(scored: Sequence[ScoredSpan], shuffle: bool, rng: random.Random) -> list[float]:
    deltas = [s.delta for s in scored]
    if shuffle:
        rng.shuffle(deltas)
    return deltas


def _scale(importance: list[float], floor: float) -> list[float]:
    """Min-max scaling into [floor, 1] (the caller has checked that max > min)."""
    low, high = min(importance), max(importance)
    return [floor + (1 - floor) * (i - low) / (high - low) for i in importance]


def _to_weights(scaled: Sequence[float | None], config: WeightConfig) -> list[float]:
    """w_t = min_weight + (boost - min_weight) * Î_t; 1 where Î is None (after the reasoning)."""
    span = config.boost - config.min_weight
    return [1.0 if x is None else config.min_weight + span * x for x in scaled]


def _ones(rollout: _Rollout) -> None:
    return None


def _oracle(rollout: _Rollout) -> list[float]:
    """`oracle`: boost on a reasoning token whose line feeds the answer, min_weight elsewhere."""
    relevant, config, end = rollout.relevant, rollout.config, rollout.reasoning_end
    if relevant is None or len(relevant) < end:
        raise ValueError("the oracle needs the ground-truth relevance of every reasoning token")
    return [config.boost if relevant[t] else config.min_weight for t in range(end)] + [1.0] * (rollout.body - end)


def _cfiw(shuffle: bool = False, invert: bool = False, draw: bool = False) -> Rule:
    """Profile `cfiw`: Î_t over the reasoning region from the span deltas (shuffled first, or
    flipped after scaling), or drawn from U(0, 1) per token; all ones without a scored span."""

    def rule(rollout: _Rollout) -> list[float] | None:
        if not rollout.scored:
            return None
        config, end = rollout.config, rollout.reasoning_end
        if draw:
            importance = [rollout.rng.random() for _ in range(end)]
        else:
            importance = span_importance(
                end, rollout.scored, _deltas(rollout.scored, shuffle, rollout.rng), config.floor
            )
        if importance and max(importance) - min(importance) < config.min_spread:
            scaled = [config.importance_floor] * len(importance)
        elif importance:
            scaled = _scale(importance, config.importance_floor)
            if invert:
                top, bottom = max(scaled), min(scaled)
                scaled = [top + bottom - x for x in scaled]
        else:
            scaled = []
        return _to_weights(scaled + [None] * (rollout.body - end), config)

    return rule


def _authors(shuffle: bool = False, invert: bool = False, draw: bool = False) -> Rule:
    """Profile `authors`: Î_t over every token but EOS as the authors' trainer computes it (see
    the module docstring), then its formatting-token rule."""

    def rule(rollout: _Rollout) -> list[float]:
        texts = rollout.token_texts
        if texts is None or len(texts) < rollout.body:
            raise ValueError("the authors profile needs the text of every completion token")
        if draw:
            scaled = [rollout.rng.random() for _ in range(rollout.body)]
        else:
            scaled = _authors_importance(rollout, shuffle, invert)
        scaled = [
            x * FORMATTING_SCALE if x > 0 and texts[t].strip() in FORMATTING_TOKENS else x for t, x in enumerate(scaled)
        ]
        return _to_weights(scaled, rollout.config)

    return rule


def _authors_importance(rollout: _Rollout, shuffle: bool, invert: bool) -> list[float]:
    config, end = rollout.config, rollout.reasoning_end
    after = rollout.body - end
    flat = config.importance_floor
    if not rollout.scored:
        if invert:
            return [1.0] * end + [config.floor] * after
        return [flat] * end + [0.0] * after
    deltas = _deltas(rollout.scored, shuffle, rollout.rng)
    importance = span_importance(end, rollout.scored, deltas, config.floor, per_token=False)
    spread = importance and max(importance) > min(importance)
    scaled = _scale(importance, config.importance_floor) if spread else [flat] * end
    scaled += [0.0] * after
    if invert:
        values = scaled + [0.0]  # their flip also sees the EOS/padding slots, at 0
        top, bottom = max(values), min(values)
        if top > bottom:
            scaled = [top + bottom - x for x in scaled]
    return scaled


# Every (mode, profile) `train` accepts, explicitly; a pair without an entry is an error, never
# a fallback to another mode. `entropy` has none: its weights need the old policy's entropies
# (`entropy_weights`). `uniform` and `oracle` read no scores and are the same under both profiles.
WEIGHTINGS: dict[tuple[str, str], Rule] = {
    ("uniform", "cfiw"): _ones,
    ("uniform", "authors"): _ones,
    ("oracle", "cfiw"): _oracle,
    ("oracle", "authors"): _oracle,
    ("cfiw", "cfiw"): _cfiw(),
    ("shuffled", "cfiw"): _cfiw(shuffle=True),
    ("inverted", "cfiw"): _cfiw(invert=True),
    ("random", "cfiw"): _cfiw(draw=True),
    ("cfiw", "authors"): _authors(),
    ("shuffled", "authors"): _authors(shuffle=True),
    ("inverted", "authors"): _authors(invert=True),
    ("random", "authors"): _authors(draw=True),
}


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's and
    torch.quantile's default)."""
    if not values:
        raise ValueError("the quantile of no values")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def entropy_weights(entropies: Sequence[float], threshold: float, ends_with_stop: bool = False) -> list[float]:
    """`entropy` mode: 1 where the old policy's entropy is at or above `threshold` (the batch's
    q-quantile, see `quantile`), else 0; a final stop token weighs 1."""
    body = len(entropies) - 1 if ends_with_stop and entropies else len(entropies)
    return [1.0 if h >= threshold else 0.0 for h in entropies[:body]] + [1.0] * (len(entropies) - body)
