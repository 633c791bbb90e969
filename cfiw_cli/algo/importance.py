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
2. The variants of one rollout are packed end to end into one batch row (at most
   `row_tokens`), and rows of many rollouts run as one forward call (at most `batch_tokens`
   padded tokens). All variants in a row attend to the same cached row, gathered once per
   row; a 4D attention mask lets each token see the cached positions before its variant's
   start and the earlier tokens of its own variant only, and explicit position ids carry
   the right positions. No variant is padded to another's length, and the prefix cache is
   copied once per rollout instead of once per variant.
3. Logits are computed only at the positions that predict answer tokens (the decoder's last
   hidden state is captured and the LM head runs on those positions alone).
4. Under `knockout`, when the span ends right at the answer, the first answer token is
   predicted by the span's own last token, which the knockout leaves intact: its
   log-probability is taken from the unmasked run.

Tokens computed per rollout: `T + sum_k (T - e_k)` for `knockout` (T = sequence length),
one more per span for `delete`, `T + sum_k (T - b_k)` for `pad` (the pad tokens must run
too), less the shared prompts. Not done: sharing work between the variants themselves
(each suffix attends to a different context, so nothing after b can be reused exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cfiw_cli.batching import consecutive_runs, left_pad
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


def _pack_rows(variants: list[_Suffix], row_budget: int) -> list[list[_Suffix]]:
    """The variants of each rollout, cut into rows of at most `row_budget` tokens (a variant
    longer than that gets a row of its own)."""
    rows: list[list[_Suffix]] = []
    width = 0  # tokens in the last row
    for v in variants:
        if rows and rows[-1][0].row == v.row and width + len(v.tokens) <= row_budget:
            rows[-1].append(v)
            width += len(v.tokens)
        else:
            rows.append([v])
            width = len(v.tokens)
    return rows


def _run_packed(
    model: Any,
    rows: list[list[_Suffix]],
    kv: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: keys, values [N, heads, S, d] of the unmasked runs
    stats: dict | None = None,
) -> list[list[torch.Tensor]]:  # per row, per variant: target log-probs [n]
    """One forward call in which each batch row packs several variants of one rollout end to end.

    Every variant of a rollout attends to the same cached row (its unmasked run), so the cache
    is gathered once per row, not once per variant, and no variant is padded to another's
    length. A 4D mask lets each token see the cached positions before its variant's `past` and
    the earlier tokens of its own variant, nothing else; position ids carry the positions."""
    import torch

    dev = next(model.parameters()).device
    width = max(sum(len(j.tokens) for j in row) for row in rows)
    past = max(j.past for row in rows for j in row)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)  # [B, W] right-padded with token 0
    positions = torch.zeros(len(rows), width, dtype=torch.long)  # [B, W]
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # [B, W] variant index in the row
    visible_past = torch.zeros(len(rows), width, dtype=torch.long)  # [B, W] cached positions a token sees
    ends: list[list[int]] = []
    for r, row in enumerate(rows):
        start, row_ends = 0, []
        for k, job in enumerate(row):
            n = len(job.tokens)
            tokens[r, start : start + n] = torch.tensor(job.tokens)
            positions[r, start : start + n] = torch.tensor(job.positions)
            segment[r, start : start + n] = k
            visible_past[r, start : start + n] = job.past
            start += n
            row_ends.append(start)
        ends.append(row_ends)
    if stats is not None:
        stats["tokens"] = stats.get("tokens", 0) + int((segment >= 0).sum())
        stats["padded_tokens"] = stats.get("padded_tokens", 0) + len(rows) * width
        stats["forward_calls"] = stats.get("forward_calls", 0) + 1
    index = torch.arange(width)
    own = (segment[:, :, None] == segment[:, None, :]) & (index[None, None, :] <= index[None, :, None])  # [B, W, W]
    own |= (segment < 0)[:, :, None] & (index[None, None, :] == index[None, :, None])  # padding sees itself
    cached = torch.arange(past)[None, None, :] < visible_past[:, :, None]  # [B, W, P]
    allowed = torch.cat([cached, own], dim=2)[:, None]  # [B, 1, W, P + W]
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    cache_rows = torch.tensor([row[0].row for row in rows], device=dev)  # [B]
    layers = [(k[:, :, :past].index_select(0, cache_rows), v[:, :, :past].index_select(0, cache_rows)) for k, v in kv]
    with captured_hidden(model) as captured:
        model(
            input_ids=tokens.to(dev),
            attention_mask=mask.to(dev),
            position_ids=positions.to(dev),
            use_cache=False,
            logits_to_keep=1,
            **{cache_argument(model): _cache_from(layers)},
        )
    hidden = captured["hidden"]  # [B, W, H]
    wanted_rows, wanted_cols, targets = [], [], []
    for r, row in enumerate(rows):
        for job, end in zip(row, ends[r], strict=True):
            n = len(job.targets)
            wanted_rows += [r] * n
            wanted_cols += list(range(end - n, end))
            targets += job.targets
    head = model.get_output_embeddings()
    picked_hidden = hidden[torch.tensor(wanted_rows, device=dev), torch.tensor(wanted_cols, device=dev)]  # [n, H]
    logprobs = head(picked_hidden).float().log_softmax(-1)  # [n, V]
    values = logprobs.gather(1, torch.tensor(targets, device=dev)[:, None]).squeeze(1)  # [n]
    out, at = [], 0
    for row in rows:
        per_row = []
        for job in row:
            per_row.append(values[at : at + len(job.targets)])
            at += len(job.targets)
        out.append(per_row)
    return out


def _batches(sizes: list[int], budget: int, pasts: list[int] | None = None) -> list[list[int]]:
    """Greedy batches of indices (sorted longest first) whose padded size fits `budget` tokens.

    With `pasts` (cached prefix lengths), rows x (longest past + width) also stays within
    8 x `budget`: it bounds the gathered KV cache and the attention of rows with short suffixes.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    return consecutive_runs(order, sizes, budget, pasts, 8 * budget)


def _chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of the length-sorted indices whose KV cache fits `budget` tokens."""
    return consecutive_runs(sorted(range(len(sizes)), key=lambda i: sizes[i]), sizes, budget)


def _store(
    cache: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: keys, values [N, heads, S, d]
    rows: list[int],
    suffix_kv: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: [b, heads, W, d], left-padded
    lengths: list[int],
    starts: list[int],
) -> None:
    """Copy each row's (left-padded) suffix KV into slots [start, start + length) of `cache`."""
    for (keys, values), (new_keys, new_values) in zip(cache, suffix_kv, strict=True):
        width = new_keys.shape[2]
        for b, (row, length, start) in enumerate(zip(rows, lengths, starts, strict=True)):
            keys[row, :, start : start + length] = new_keys[b, :, width - length :]
            values[row, :, start : start + length] = new_values[b, :, width - length :]


def _run_unmasked(
    model: Any, items: list[ScoringItem], pad_id: int, batch_tokens: int, stats: dict | None = None
) -> tuple[list[list[float]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Prompts (once per distinct prompt), then each item on top of its prompt. Returns the
    per-token target log-probs of each item and their KV per layer `[N, H, L_max, d]`."""
    # The prompt's last token stays with the item so its prediction is always in the item run.
    shared = [max(item.prompt_length - 1, 0) for item in items]
    prompts: dict[tuple[int, ...], int] = {}
    for item, n in zip(items, shared, strict=True):
        if n:
            prompts.setdefault(tuple(item.tokens[:n]), len(prompts))
    prompt_list = list(prompts)
    prompt_kv = None
    if prompt_list:
        prompt_kv = []
        for batch in _batches([len(p) for p in prompt_list], batch_tokens):
            jobs = [_Suffix(i, 0, list(prompt_list[i]), list(range(len(prompt_list[i]))), []) for i in batch]
            _, suffix_kv = _run_suffixes(model, jobs, None, pad_id, stats=stats)
            if not prompt_kv:
                longest = max(len(p) for p in prompt_list)
                prompt_kv = [
                    tuple(t.new_zeros(len(prompt_list), t.shape[1], longest, t.shape[3]) for t in layer)
                    for layer in suffix_kv
                ]
            _store(prompt_kv, batch, suffix_kv, [len(prompt_list[i]) for i in batch], [0] * len(batch))

    longest = max(len(item.tokens) - 1 for item in items)
    item_kv, per_token = None, [[] for _ in items]
    jobs = []
    for index, (item, n) in enumerate(zip(items, shared, strict=True)):
        end = len(item.tokens) - 1
        row = prompts[tuple(item.tokens[:n])] if n else 0
        jobs.append(
            _Suffix(row, n, item.tokens[n:end], list(range(n, end)), item.tokens[item.target_start :], span=index)
        )
    for batch in _batches([len(j.tokens) for j in jobs], batch_tokens):
        batch_jobs = [jobs[i] for i in batch]
        logprobs, suffix_kv = _run_suffixes(model, batch_jobs, prompt_kv, pad_id, stats=stats)
        if item_kv is None:
            item_kv = [
                tuple(t.new_zeros(len(items), t.shape[1], longest, t.shape[3]) for t in layer) for layer in suffix_kv
            ]
        for job, values in zip(batch_jobs, logprobs, strict=True):
            per_token[job.span] = values.tolist()
        _store(item_kv, batch, suffix_kv, [len(j.tokens) for j in batch_jobs], [j.past for j in batch_jobs])
        for i, job in zip(batch, batch_jobs, strict=True):  # the shared prompt part
            if job.past:
                for (keys, values), (p_keys, p_values) in zip(item_kv, prompt_kv, strict=True):
                    keys[i, :, : job.past] = p_keys[job.row, :, : job.past]
                    values[i, :, : job.past] = p_values[job.row, :, : job.past]
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
    """
    import torch

    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}")
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
                for row, values in zip(batch_rows, _run_packed(model, batch_rows, kv, stats), strict=True):
                    for job, logprobs in zip(row, values, strict=True):
                        masked[job.row][job.span] += float(logprobs.sum())
            for row, i in enumerate(chunk):
                results[i] = ItemScores(base=float(sum(per_token[row])), masked=masked[row])
            del kv
            if on_items:
                on_items(len(chunk))
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
