"""Batching token rows: left padding, and packing rows into batches under a token budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def left_pad(rows: Sequence[Sequence[int]], value: int) -> list[list[int]]:
    """Rows as equal-length lists, `value` in front of the shorter ones."""
    width = max(len(r) for r in rows)
    return [[value] * (width - len(r)) + list(r) for r in rows]


def left_padded_batch(
    rows: Sequence[Sequence[int]], pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:  # [B, W] token ids, [B, W] attention mask (0 on padding)
    """Token id rows as one left-padded batch, the way causal LMs batch prompts."""
    import torch

    ids = torch.tensor(left_pad(rows, pad_id), device=device)
    attention = torch.tensor(left_pad([[1] * len(r) for r in rows], 0), device=device)
    return ids, attention


def consecutive_runs(
    order: Sequence[int],
    sizes: Sequence[int],
    budget: int,
    pasts: Sequence[int] | None = None,
    past_budget: int = 0,
) -> list[list[int]]:
    """Indices in `order`, cut greedily into consecutive runs whose padded size (rows x the
    widest row's size) stays within `budget` tokens; a row wider than `budget` runs alone.
    With `pasts` (cached prefix lengths), rows x (longest past + widest) also stays within
    `past_budget`."""
    runs: list[list[int]] = []
    current: list[int] = []
    width = past = 0
    for i in order:
        new_width, new_past = max(width, sizes[i]), max(past, pasts[i] if pasts else 0)
        rows = len(current) + 1
        if current and (new_width * rows > budget or (pasts and (new_past + new_width) * rows > past_budget)):
            runs.append(current)
            current, new_width, new_past = [], sizes[i], pasts[i] if pasts else 0
        current.append(i)
        width, past = new_width, new_past
    if current:
        runs.append(current)
    return runs


def least_padded_runs(
    sizes: Sequence[int],
    budget: int,
    call_tokens: int,
    pasts: Sequence[int] | None = None,
    past_budget: int = 0,
) -> list[list[int]]:
    """Indices sorted longest first, cut into consecutive runs under the limits of
    `consecutive_runs`, at the least padded tokens plus `call_tokens` per run (a forward
    call's fixed cost, in tokens). Exact, by dynamic programming over the cut points: a run
    is padded to its first (longest) row, so greedy runs pad short rows to long ones."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    best = [0] + [float("inf")] * len(order)  # best[j]: least cost of the first j rows
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        past = 0
        for start in range(end - 1, -1, -1):
            rows, width = end - start, sizes[order[start]]
            past = max(past, pasts[order[start]] if pasts else 0)
            if rows > 1 and (rows * width > budget or (pasts and rows * (past + width) > past_budget)):
                break  # longer runs only grow wider and longer
            cost = best[start] + rows * width + call_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], len(order)
    while end:
        runs.append(order[cut[end] : end])
        end = cut[end]
    return runs[::-1]
