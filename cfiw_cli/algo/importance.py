"""Counterfactual span importance: how much the answer's log-probability drops without a span.

For one rollout, let `x = prompt + reasoning + target` (target = the rollout's own answer
tokens, or the gold answer) and `a` the index of the first target token. Then

    base      = sum_{t >= a} log p(x_t | x_<t)
    masked_k  = the same sum with span k = [b, e) masked
    delta_k   = base - masked_k

with three ways to mask:

- `pad`      span tokens replaced by the pad token, positions unchanged (the authors' choice);
- `delete`   span tokens removed, later positions renumbered;
- `knockout` span tokens kept, but no token after the span may attend to them.

Differences from computing it the obvious way (one full forward pass per variant), which
give the same numbers (fp32, within 1e-4; tests check every mode against `naive_scores`):

1. The unmasked sequence is run once and its KV cache kept; rollouts that share a prompt
   (the G samples of a GRPO group) run that prompt once. A masked variant equals the
   unmasked sequence before the span start b, so it runs only what follows, attending to
   the cached prefix: the pad tokens and the rest (`pad`), the token before the span and
   the rest (`delete`: one token more, so the first answer token always has its
   predictor inside the suffix), or the rest at its original positions (`knockout`).
2. The variants of one rollout are packed end to end into batch rows (at most `row_tokens`
   each, longest first into the fullest row they fit), and rows of many rollouts run as one
   forward call (at most `batch_tokens` padded tokens). All variants in a row attend to the
   same cached row, gathered once per row; a 4D attention mask lets each token see the
   cached positions before its variant's start and the earlier tokens of its own variant
   only, and explicit position ids carry the right positions. No variant is padded to
   another's length, and the prefix cache is copied once per rollout instead of once per
   variant. The unmasked runs of the rollouts of one prompt are packed the same way on top
   of the prompt's cached row. Rows are cut into forward calls where padding plus a fixed
   cost per call is least (`batching.least_padded_runs`), not greedily.
3. Logits are computed only at the positions that predict answer tokens (the decoder's last
   hidden state is captured and the LM head runs on those positions alone).
4. Identical rollouts (a GRPO group's samples that wrote the same completion, common once a
   policy is confident) are scored once; their rows get the same numbers.
5. Under `knockout`, when the span ends right at the answer, the first answer token is
   predicted by the span's own last token, which the knockout leaves intact: its
   log-probability is taken from the unmasked run.

Tokens computed per rollout: `T + sum_k (T - e_k)` for `knockout` (T = sequence length),
one more per span for `delete`, `T + sum_k (T - b_k)` for `pad` (the pad tokens must run
too), less the shared prompts. Not done: sharing work between the variants themselves
(each suffix attends to a different context, so nothing after b can be reused exactly).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cfiw_cli.batching import consecutive_runs, least_padded_runs, left_pad
from cfiw_cli.kv_cache import cache_argument
from cfiw_cli.logprobs import captured_hidden

if TYPE_CHECKING:
    import torch

MASK_MODES = ("pad", "delete", "knockout")
PACKED_ROW_TOKENS = 256  # variants of one rollout packed into one batch row, at most this many tokens
TARGETS = ("own", "gold")  # whose answer tokens a span's delta is measured on: the rollout's own, or the gold answer


@dataclass(frozen=True)
class ScoringItem:
    tokens: list[int]  # prompt + reasoning + target
    target_start: int  # index of the first target token
    spans: list[tuple[int, int]]  # [start, end) into `tokens`, 1 <= start < end <= target_start
    prompt_length: int = 0  # items with equal tokens[:prompt_length] share one prompt forward


@dataclass(frozen=True)
class ItemScores:
    base: float
    masked: list[float]  # one per span

    @property
    def deltas(self) -> list[float]:
        return [self.base - m for m in self.masked]


@dataclass(frozen=True)
class _Suffix:
    """Tokens to run on top of `past` cached positions of cache row `row`."""

    row: int
    past: int
    tokens: list[int]
    positions: list[int]
    targets: list[int]  # token ids predicted by the last len(targets) suffix positions
    span: int = -1
    base_first: bool = False  # knockout with e == target_start: first target log-prob is the base one


def variant_suffix(item: ScoringItem, row: int, span: int, mode: str, pad_id: int) -> _Suffix:
    """What a masked variant has to run on top of the cached unmasked prefix."""
    x, a = item.tokens, item.target_start
    b, e = item.spans[span]
    end = len(x) - 1  # the last target token is never an input
    if mode == "pad":
        return _Suffix(row, b, [pad_id] * (e - b) + x[e:end], list(range(b, end)), x[a:], span)
    if mode == "delete":
        tokens = [x[b - 1]] + x[e:end]
        return _Suffix(row, b - 1, tokens, list(range(b - 1, b - 1 + len(tokens))), x[a:], span)
    if mode == "knockout":
        base_first = e == a
        return _Suffix(row, b, x[e:end], list(range(e, end)), x[a + 1 :] if base_first else x[a:], span, base_first)
    raise ValueError(f"unknown mask mode {mode!r}")


def _cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:  # per layer: keys, values [B, heads, S, d]
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=layers)
    except TypeError:  # older transformers
        return DynamicCache.from_legacy_cache(tuple(layers))


def _run_suffixes(
    model: Any,
    jobs: list[_Suffix],
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None,  # per layer: keys, values [B, heads, S, d]
    pad_id: int,
    stats: dict | None = None,
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:  # per job [n]; per layer KV
    """One forward call: each job's suffix on top of its cached prefix (`kv`: per layer
    `[rows, H, L, d]`, position j in slot j). Returns the target log-probs of each job and
    the suffix KV per layer `[B, H, S, d]` (left-padded like the input): the unmasked pass
    keeps it for the variants."""
    import torch

    dev = next(model.parameters()).device
    suffix = left_pad([j.tokens for j in jobs], pad_id)
    width = len(suffix[0])
    past = max(j.past for j in jobs)
    if stats is not None:
        stats["tokens"] = stats.get("tokens", 0) + sum(len(j.tokens) for j in jobs)
        stats["padded_tokens"] = stats.get("padded_tokens", 0) + width * len(jobs)
        stats["forward_calls"] = stats.get("forward_calls", 0) + 1
    mask = [[1] * j.past + [0] * (past - j.past) + [0] * (width - len(j.tokens)) + [1] * len(j.tokens) for j in jobs]
    kwargs = {}
    if past:
        rows = torch.tensor([j.row for j in jobs], device=dev)  # [B]
        layers = [
            (k[:, :, :past].index_select(0, rows), v[:, :, :past].index_select(0, rows)) for k, v in kv
        ]  # [B, H, P, d]
        kwargs[cache_argument(model)] = _cache_from(layers)
    out = model(
        input_ids=torch.tensor(suffix, device=dev),  # [B, S]
        attention_mask=torch.tensor(mask, device=dev),  # [B, P + S]
        position_ids=torch.tensor(left_pad([j.positions for j in jobs], 0), device=dev),  # [B, S]
        use_cache=True,
        logits_to_keep=max(max(len(j.targets) for j in jobs), 1),
        **kwargs,
    )
    logprobs = out.logits.float().log_softmax(-1)  # [B, K, V]
    picked = []
    for row, job in enumerate(jobs):
        wanted = torch.tensor(job.targets, device=dev, dtype=torch.long)  # [n]
        picked.append(
            logprobs[row, logprobs.shape[1] - len(job.targets) :].gather(1, wanted[:, None]).squeeze(1)
        )  # [n]
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    return picked, [(layer[0][:, :, past:], layer[1][:, :, past:]) for layer in cache]


def _pack_rows(jobs: list[_Suffix], row_budget: int) -> list[list[_Suffix]]:
    """The jobs of each cached row (consecutive in `jobs`), cut into batch rows of at most
    `row_budget` tokens, longest first into the fullest row they fit (a job longer than the
    budget gets a row of its own). Against filling rows in the given order, the padded tokens
    measured differ by under 2% either way: the batching, not the packing, decides them."""
    rows: list[list[_Suffix]] = []
    start = 0
    while start < len(jobs):
        end = start
        while end < len(jobs) and jobs[end].row == jobs[start].row:
            end += 1
        group = sorted(jobs[start:end], key=lambda j: -len(j.tokens))
        bins: list[list[_Suffix]] = []
        free: list[int] = []
        for job in group:
            fits = [b for b in range(len(bins)) if free[b] >= len(job.tokens)]
            if fits:
                best = min(fits, key=lambda b: free[b])
                bins[best].append(job)
                free[best] -= len(job.tokens)
            else:
                bins.append([job])
                free.append(row_budget - len(job.tokens))
        rows += bins
        start = end
    return rows


def _run_packed(
    model: Any,
    rows: list[list[_Suffix]],
    kv: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: keys, values [N, heads, S, d] of the cached rows
    stats: dict | None = None,
    keep_kv: bool = False,
) -> tuple[list[list[torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """One forward call in which each batch row packs several jobs (the variants of one
    rollout, or the rollouts of one prompt) end to end on top of the cached row they share.

    The cache is gathered once per batch row, not once per job, and no job is padded to
    another's length. A 4D mask lets each token see the cached positions before its job's
    `past` and the earlier tokens of its own job, nothing else; position ids carry the
    positions. Returns, per row and job, the target log-probs `[n]`; with `keep_kv`, also the
    new tokens' KV per layer `[B, H, W, d]` (job k of row r at its packed columns)."""
    import torch

    dev = next(model.parameters()).device
    width = max(sum(len(j.tokens) for j in row) for row in rows)
    past = max(j.past for row in rows for j in row)
    tokens, positions, segment, visible_past = [], [], [], []  # per row, `width` entries each
    for row in rows:
        padding = width - sum(len(j.tokens) for j in row)
        tokens.append([t for j in row for t in j.tokens] + [0] * padding)
        positions.append([q for j in row for q in j.positions] + [0] * padding)
        segment.append([k for k, j in enumerate(row) for _ in j.tokens] + [-1] * padding)
        visible_past.append([j.past for j in row for _ in j.tokens] + [0] * padding)
    segment_ids = torch.tensor(segment)  # [B, W] job index in the row, -1 on padding
    if stats is not None:
        stats["tokens"] = stats.get("tokens", 0) + int((segment_ids >= 0).sum())
        stats["padded_tokens"] = stats.get("padded_tokens", 0) + len(rows) * width
        stats["forward_calls"] = stats.get("forward_calls", 0) + 1
    index = torch.arange(width)
    own = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (index[None, None, :] <= index[None, :, None])
    own |= (segment_ids < 0)[:, :, None] & (index[None, None, :] == index[None, :, None])  # padding sees itself
    cached = torch.arange(past)[None, None, :] < torch.tensor(visible_past)[:, :, None]  # [B, W, P]
    allowed = torch.cat([cached, own], dim=2)[:, None]  # [B, 1, W, P + W]
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    cache_rows = torch.tensor([row[0].row for row in rows], device=dev)  # [B]
    layers = [(k[:, :, :past].index_select(0, cache_rows), v[:, :, :past].index_select(0, cache_rows)) for k, v in kv]
    with captured_hidden(model) as captured:
        out = model(
            input_ids=torch.tensor(tokens, device=dev),  # [B, W]
            attention_mask=mask.to(dev),  # [B, 1, W, P + W]
            position_ids=torch.tensor(positions, device=dev),  # [B, W]
            use_cache=keep_kv,
            logits_to_keep=1,
            **{cache_argument(model): _cache_from(layers)},
        )
    hidden = captured["hidden"]  # [B, W, H]
    wanted_rows, wanted_cols, targets = [], [], []
    for r, row in enumerate(rows):
        end = 0
        for job in row:
            end += len(job.tokens)
            n = len(job.targets)
            wanted_rows += [r] * n
            wanted_cols += range(end - n, end)
            targets += job.targets
    head = model.get_output_embeddings()
    picked_hidden = hidden[torch.tensor(wanted_rows, device=dev), torch.tensor(wanted_cols, device=dev)]  # [n, H]
    logprobs = head(picked_hidden).float().log_softmax(-1)  # [n, V]
    values = logprobs.gather(1, torch.tensor(targets, device=dev)[:, None]).squeeze(1)  # [n]
    per_row, at = [], 0
    for row in rows:
        per_job = []
        for job in row:
            per_job.append(values[at : at + len(job.targets)])
            at += len(job.targets)
        per_row.append(per_job)
    new_kv = None
    if keep_kv:
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        new_kv = [(layer[0][:, :, past:], layer[1][:, :, past:]) for layer in cache]  # [B, H, W, d]
    return per_row, new_kv


def _batches(sizes: list[int], budget: int, pasts: list[int] | None = None) -> list[list[int]]:
    """Batches of indices (sorted longest first) whose padded size fits `budget` tokens, cut
    where padding plus a per-call cost of `budget / 32` tokens is least.

    With `pasts` (cached prefix lengths), rows x (longest past + width) also stays within
    8 x `budget`: it bounds the gathered KV cache and the attention of rows with short suffixes.
    """
    return least_padded_runs(sizes, budget, budget // 32, pasts, 8 * budget)


def _chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of the length-sorted indices whose KV cache fits `budget` tokens."""
    return consecutive_runs(sorted(range(len(sizes)), key=lambda i: sizes[i]), sizes, budget)


def _copy_tokens(
    cache: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: keys, values [N, heads, S, d]
    source: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: keys, values [B, heads, W, d]
    moves: list[tuple[int, int, int, int, int]],  # (cache row, cache slot, source row, source slot, length)
) -> None:
    """Copy runs of token positions from `source` into `cache`: one indexed copy per layer."""
    import torch

    rows, slots, source_rows, source_slots = [], [], [], []
    for row, slot, source_row, source_slot, length in moves:
        rows += [row] * length
        slots += range(slot, slot + length)
        source_rows += [source_row] * length
        source_slots += range(source_slot, source_slot + length)
    if not rows:
        return
    dev = cache[0][0].device
    index = [torch.tensor(x, device=dev) for x in (rows, slots, source_rows, source_slots)]
    for (keys, values), (new_keys, new_values) in zip(cache, source, strict=True):
        keys[index[0], :, index[1]] = new_keys[index[2], :, index[3]]  # [n, heads, d]
        values[index[0], :, index[1]] = new_values[index[2], :, index[3]]


def _empty_cache(
    like: list[tuple[torch.Tensor, torch.Tensor]], rows: int, length: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:  # per layer: keys, values [rows, heads, length, d]
    return [tuple(t.new_zeros(rows, t.shape[1], length, t.shape[3]) for t in layer) for layer in like]


def _run_uncached(
    model: Any,
    jobs: list[_Suffix],
    slots: list[int],
    rows: int,
    length: int,
    pad_id: int,
    batch_tokens: int,
    stats: dict | None,
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """Jobs with nothing cached before them, in left-padded batches. Job k's KV goes into row
    `slots[k]` of a cache of `rows` rows (per layer `[rows, H, length, d]`; None without jobs).
    Returns each job's target log-probs `[n]` and the cache."""
    logprobs: list[torch.Tensor | None] = [None] * len(jobs)
    cache = None
    for batch in _batches([len(j.tokens) for j in jobs], batch_tokens) if jobs else []:
        values, suffix_kv = _run_suffixes(model, [jobs[i] for i in batch], None, pad_id, stats=stats)
        cache = cache or _empty_cache(suffix_kv, rows, length)
        width = suffix_kv[0][0].shape[2]  # left-padded
        _copy_tokens(cache, suffix_kv, [(slots[i], 0, b, width - len(jobs[i].tokens), len(jobs[i].tokens))
                                        for b, i in enumerate(batch)])  # fmt: skip
        for i, value in zip(batch, values, strict=True):
            logprobs[i] = value
    return logprobs, cache  # type: ignore[return-value]


def _run_unmasked(
    model: Any, items: list[ScoringItem], pad_id: int, batch_tokens: int, stats: dict | None = None
) -> tuple[list[list[float]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Prompts (once per distinct prompt), then the items of each prompt packed end to end on
    top of it. Returns the per-token target log-probs of each item and their KV per layer
    `[N, H, L_max, d]`."""
    # The prompt's last token stays with the item so its prediction is always in the item run.
    shared = [max(item.prompt_length - 1, 0) for item in items]
    prompts: dict[tuple[int, ...], int] = {}
    for item, n in zip(items, shared, strict=True):
        if n:
            prompts.setdefault(tuple(item.tokens[:n]), len(prompts))
    prompt_jobs = [_Suffix(i, 0, list(p), list(range(len(p))), []) for i, p in enumerate(prompts)]
    longest_prompt = max(map(len, prompts), default=0)
    _, prompt_kv = _run_uncached(
        model, prompt_jobs, list(range(len(prompt_jobs))), len(prompt_jobs), longest_prompt, pad_id, batch_tokens, stats
    )

    longest = max(len(item.tokens) - 1 for item in items)
    per_token: list[list[float]] = [[] for _ in items]
    jobs = []
    for index, (item, n) in enumerate(zip(items, shared, strict=True)):
        end = len(item.tokens) - 1
        row = prompts[tuple(item.tokens[:n])] if n else -1
        jobs.append(
            _Suffix(row, n, item.tokens[n:end], list(range(n, end)), item.tokens[item.target_start :], span=index)
        )
    alone = [j for j in jobs if not j.past]  # nothing cached before them
    logprobs, item_kv = _run_uncached(
        model, alone, [j.span for j in alone], len(items), longest, pad_id, batch_tokens, stats
    )
    for job, values in zip(alone, logprobs, strict=True):
        per_token[job.span] = values.tolist()
    rows = _pack_rows(sorted((j for j in jobs if j.past), key=lambda j: j.row), PACKED_ROW_TOKENS)
    widths = [sum(len(j.tokens) for j in row) for row in rows]
    for batch in _batches(widths, batch_tokens, [max(j.past for j in row) for row in rows]) if rows else []:
        batch_rows = [rows[i] for i in batch]
        values, new_kv = _run_packed(model, batch_rows, prompt_kv, stats, keep_kv=True)
        item_kv = item_kv or _empty_cache(new_kv, len(items), longest)
        moves, prompt_moves = [], []
        for b, (row, row_values) in enumerate(zip(batch_rows, values, strict=True)):
            column = 0
            for job, job_values in zip(row, row_values, strict=True):
                per_token[job.span] = job_values.tolist()
                moves.append((job.span, job.past, b, column, len(job.tokens)))
                prompt_moves.append((job.span, 0, job.row, 0, job.past))
                column += len(job.tokens)
        _copy_tokens(item_kv, new_kv, moves)
        _copy_tokens(item_kv, prompt_kv, prompt_moves)
    return per_token, item_kv


def score_items(
    model: Any,
    items: list[ScoringItem],
    mode: str,
    pad_id: int,
    batch_tokens: int = 8192,
    cache_tokens: int | None = None,
    row_tokens: int | None = None,
    on_items: Callable[[int], None] | None = None,
    stats: dict | None = None,
) -> list[ItemScores]:
    """Base and masked target log-probs of every span of every item (see the module docstring).

    `batch_tokens` bounds the padded tokens of one forward call; `cache_tokens` (default 16x
    that) bounds the unmasked KV cache kept while the variants of a group of rollouts run.
    `stats`, when given, accumulates `tokens` run, `padded_tokens` and `forward_calls`.
    Identical items (a group's samples that wrote the same completion) are scored once.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}")
    distinct: dict[tuple, int] = {}
    which = [distinct.setdefault((tuple(it.tokens), it.target_start, tuple(it.spans)), i) for i, it in enumerate(items)]
    copies = Counter(which)  # first index of each distinct item -> how many items it stands for
    firsts = sorted(copies)

    def advance(scored: list[int]) -> None:
        if on_items:
            on_items(sum(copies[firsts[i]] for i in scored))

    scored = _score_distinct(model, [items[i] for i in firsts], mode, pad_id, batch_tokens, cache_tokens,
                             row_tokens, advance, stats)  # fmt: skip
    by_first = dict(zip(firsts, scored, strict=True))
    return [by_first[first] for first in which]


def _score_distinct(
    model: Any,
    items: list[ScoringItem],
    mode: str,
    pad_id: int,
    batch_tokens: int,
    cache_tokens: int | None,
    row_tokens: int | None,
    on_items: Callable[[list[int]], None],
    stats: dict | None,
) -> list[ItemScores]:
    import torch

    results: list[ItemScores | None] = [None] * len(items)
    with torch.inference_mode():
        for chunk in _chunks([len(item.tokens) for item in items], cache_tokens or 16 * batch_tokens):
            chunk_items = [items[i] for i in chunk]
            per_token, kv = _run_unmasked(model, chunk_items, pad_id, batch_tokens, stats)
            variants = [
                variant_suffix(item, row, span, mode, pad_id)
                for row, item in enumerate(chunk_items)
                for span in range(len(item.spans))
            ]
            masked = [[0.0] * len(item.spans) for item in chunk_items]
            for v in variants:
                if v.base_first:
                    masked[v.row][v.span] = per_token[v.row][0]
            rows = _pack_rows([v for v in variants if v.tokens], row_tokens or PACKED_ROW_TOKENS)
            widths = [sum(len(v.tokens) for v in row) for row in rows]
            for batch in _batches(widths, batch_tokens, [max(v.past for v in row) for row in rows]):
                batch_rows = [rows[i] for i in batch]
                for row, values in zip(batch_rows, _run_packed(model, batch_rows, kv, stats)[0], strict=True):
                    for job, logprobs in zip(row, values, strict=True):
                        masked[job.row][job.span] += float(logprobs.sum())
            for row, i in enumerate(chunk):
                results[i] = ItemScores(base=float(sum(per_token[row])), masked=masked[row])
            del kv
            on_items(chunk)
    return results  # type: ignore[return-value]


def lower_bound_tokens(item: ScoringItem) -> int:
    """`T + sum_k (T - e_k)`: the unmasked sequence once, then what follows each span."""
    length = len(item.tokens) - 1  # the last target token is never an input
    return length + sum(length - min(e, length) for _, e in item.spans)


def knockout_mask(
    length: int, span: tuple[int, int], dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:  # [1, 1, L, L]
    """[1, 1, L, L] additive mask: causal, and tokens after the span cannot see the span."""
    import torch

    b, e = span
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # [L, L]
    allowed[e:, b:e] = False
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]  # [1, 1, L, L]


def naive_scores(model: Any, item: ScoringItem, mode: str, pad_id: int) -> ItemScores:
    """Reference: one full forward pass per variant (used by tests and benchmarks)."""
    import torch

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    def target_logp(tokens: list[int], start: int, mask: Any = None) -> float:
        ids = torch.tensor([tokens], device=dev)  # [1, L]
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[0].float()  # [L, V]
        logprobs = logits.log_softmax(-1)
        picked = logprobs[
            torch.arange(start - 1, len(tokens) - 1, device=dev), torch.tensor(tokens[start:], device=dev)
        ]
        return float(picked.sum())

    x, a = item.tokens, item.target_start
    masked = []
    for b, e in item.spans:
        if mode == "pad":
            masked.append(target_logp(x[:b] + [pad_id] * (e - b) + x[e:], a))
        elif mode == "delete":
            masked.append(target_logp(x[:b] + x[e:], a - (e - b)))
        elif mode == "knockout":
            masked.append(target_logp(x, a, knockout_mask(len(x), (b, e), dtype, dev)))
        else:
            raise ValueError(f"unknown mask mode {mode!r}")
    return ItemScores(base=target_logp(x, a), masked=masked)
