"""Cut a completion into typed reasoning spans that are exact token ranges.

Answer region: from the answer marker (`####`, `The answer is`, `Final answer`, `\\boxed{`)
that precedes the extracted final number to the end of the completion (the stop token
excluded); without a marker, the tokens of the last number. Everything before it is the
reasoning region, cut into:

- `calculation`: an arithmetic expression with a result (`12 + 24 = 36`, `3*4=12`,
  `48/2 = <<48/2=24>>24`, a bare GSM8K annotation `<<3*4=12>>12`);
- sentences or lines (split at `. ! ?` + space and at newlines) with the calculations cut out,
  `numeric` when they hold a digit, else `scaffolding`. A piece shorter than `min_tokens` is
  merged into its neighbour (the next one, else the previous one), or dropped; one longer
  than `max_tokens` is split into equal parts.

Calculations win overlaps. At most `max_spans` spans are kept: calculations first, then the
others, each in order of position. Spans never overlap and are returned in order, followed
by exactly one `answer` span.

Alignment works on bytes, so it is exact for byte-level BPE (GPT-2, Llama 3, Qwen): each
token's bytes are known, the text is their UTF-8 decoding (invalid bytes become U+FFFD as in
the tokenizer's own decoder), and a token belongs to a span when most of its characters do
(a token that only continues a multi-byte character goes with that character). A span's
`text`, `char_start` and `char_end` cover its tokens exactly, so decoding
`completion_ids[tok_start:tok_end]` gives back `text`. Tokenizers that are not byte-level
are aligned by decoding each token on its own, which can be off by a character or two.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cfiw_cli.tasks.arith import FEEDS_ANSWER, label_lookup, sentence_form
from cfiw_cli.tasks.arith import line_label as line_label_of
from cfiw_cli.tasks.gsm8k import locate_answer

KINDS = ("calculation", "numeric", "scaffolding", "answer")

_NUM = r"\$?\d+(?:,\d{3})*(?:\.\d+)?%?"
_OPERAND = rf"\(*\s*{_NUM}\s*\)*"
_OP = r"[-+*/×÷x^−–]"  # with the unicode minus and the en dash
_ANNOTATION = r"<<[^<>\n]*>>"
_CALCULATION = re.compile(
    rf"{_OPERAND}(?:\s*(?:{_OP}|=)\s*(?:\$?{_ANNOTATION})?\s*{_OPERAND})+"  # 3 * 4 = <<3*4=12>>12
    rf"|{_ANNOTATION}\s*(?:{_NUM})?"  # a bare annotation: <<3*4=12>>12
)
_HAS_OPERATOR = re.compile(rf"\d\s*\)*\s*{_OP}\s*\(*\s*\$?\d")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n")


@dataclass(frozen=True)
class Span:
    kind: str
    tok_start: int  # [tok_start, tok_end) indexes completion_ids
    tok_end: int
    char_start: int  # [char_start, char_end) indexes the decoded completion
    char_end: int
    text: str


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes -> printable unicode table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


@lru_cache(maxsize=8)
def _is_byte_level(tokenizer: Any) -> bool:
    """Cached: the check serializes the whole tokenizer (megabytes for hub models), and
    segmentation asks once per rollout."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    stack = [decoder]
    while stack:
        node = stack.pop()
        if node.get("type") == "ByteLevel":
            return True
        stack.extend(node.get("decoders") or [])
    return False


def token_bytes(ids: Sequence[int], tokenizer: Any) -> list[bytes]:
    """The raw bytes each token contributes to the decoded text."""
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    if not _is_byte_level(tokenizer):
        return [tokenizer.decode([i]).encode() for i in ids]
    table = _byte_decoder()
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    out = []
    for token_id, piece in zip(ids, pieces, strict=True):
        if token_id in added:
            out.append(added[token_id].encode())
        else:
            out.append(bytes(table[ch] for ch in piece))
    return out


def _replaced_length(data: bytes, position: int) -> int:
    """Bytes that one U+FFFD stands for at `position` (the maximal invalid subpart, as CPython)."""
    length = 1
    while length < 4 and position + length < len(data) + 1:
        try:
            data[position : position + length + 1].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason == "unexpected end of data" and position + length + 1 <= len(data):
                length += 1
                continue
        break
    return length


def decode_with_offsets(ids: Sequence[int], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """(text, per-token [char_start, char_end)); a character belongs to the token of its first byte."""
    text, offsets, _ = _decode(ids, tokenizer)
    return text, offsets


def _decode(ids: Sequence[int], tokenizer: Any) -> tuple[str, list[tuple[int, int]], list[bool]]:
    """`decode_with_offsets`, plus whether each token starts on a character boundary."""
    chunks = token_bytes(ids, tokenizer)
    data = b"".join(chunks)
    text = data.decode("utf-8", errors="replace")
    char_at_byte = []  # char index of the character starting at or covering each byte
    position = 0
    for index, char in enumerate(text):
        width = len(char.encode("utf-8"))
        if char == "\ufffd" and data[position : position + 3] != b"\xef\xbf\xbd":
            width = _replaced_length(data, position)
        char_at_byte.extend([index] * width)
        position += width
    char_at_byte.append(len(text))
    offsets, clean, byte_start = [], [], 0
    for chunk in chunks:
        byte_end = byte_start + len(chunk)
        start = char_at_byte[byte_start] + (0 if _starts_char(char_at_byte, byte_start) else 1)
        end = char_at_byte[byte_end] + (0 if _starts_char(char_at_byte, byte_end) else 1)
        offsets.append((min(start, end), end))
        clean.append(_starts_char(char_at_byte, byte_start))
        byte_start = byte_end
    return text, offsets, clean


def _starts_char(char_at_byte: list[int], byte: int) -> bool:
    return byte == 0 or char_at_byte[byte] != char_at_byte[byte - 1]


class _Alignment:
    """Maps character ranges of the decoded completion onto token ranges (majority rule)."""

    def __init__(self, offsets: list[tuple[int, int]]):
        self.offsets = offsets

    def owned_by(self, token: int, start: int, end: int) -> bool:
        a, b = self.offsets[token]
        if a == b:  # continues a character begun by an earlier token
            return start <= a - 1 < end
        overlap = max(0, min(b, end) - max(a, start))
        return overlap > 0 and 2 * overlap >= b - a

    def tokens(self, start: int, end: int, lo: int = 0, hi: int | None = None) -> tuple[int, int] | None:
        hi = len(self.offsets) if hi is None else hi
        owned = [t for t in range(lo, hi) if self.owned_by(t, start, end)]
        return (owned[0], owned[-1] + 1) if owned else None


def _calculations(text: str, end: int) -> list[tuple[int, int]]:
    found = []
    for match in _CALCULATION.finditer(text, 0, end):
        piece = match.group(0)
        if "<<" in piece or ("=" in piece and _HAS_OPERATOR.search(piece)):
            start = match.start() + len(piece) - len(piece.lstrip(" \t("))
            found.append((start, match.end() - (len(piece) - len(piece.rstrip()))))
    return found


def _sentences(text: str, end: int) -> list[tuple[int, int]]:
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text, 0, end):
        pieces.append((start, match.end()))
        start = match.end()
    pieces.append((start, end))
    return pieces


def _strip(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if not any(ch.isalnum() for ch in text[start:end]):
        return None
    return start, end


def _subtract(piece: tuple[int, int], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    parts, cursor = [], piece[0]
    for a, b in holes:
        if b <= cursor or a >= piece[1]:
            continue
        if a > cursor:
            parts.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < piece[1]:
        parts.append((cursor, piece[1]))
    return parts


def find_spans(
    completion_ids: Sequence[int],
    tokenizer: Any,
    *,
    max_spans: int | None = 10,
    min_tokens: int = 5,
    max_tokens: int = 50,
    ends_with_stop: bool | None = None,
) -> list[Span]:
    """Spans of one completion (see the module docstring); [] when no answer can be found.

    `ends_with_stop`: whether the last id is a stop token to leave out (default: it is the
    tokenizer's EOS).
    """
    ids = list(completion_ids)
    if ends_with_stop is None:
        ends_with_stop = bool(ids) and ids[-1] == tokenizer.eos_token_id
    body = ids[:-1] if ends_with_stop else ids
    text, offsets, clean = _decode(body, tokenizer)
    answer = locate_answer(text)
    if answer is None:
        return []
    align = _Alignment(offsets)
    answer_tokens = align.tokens(answer.marker_start, len(text))
    if answer_tokens is None:
        return []
    reasoning_tokens = _clean_boundary(answer_tokens[0], clean, len(body))
    if reasoning_tokens >= len(body):
        return []
    reasoning_end = offsets[reasoning_tokens][0] if reasoning_tokens < len(offsets) else len(text)

    def to_tokens(start: int, end: int) -> tuple[int, int] | None:
        return align.tokens(start, end, 0, reasoning_tokens)

    calcs = [(c, to_tokens(*c)) for c in _calculations(text, reasoning_end)]
    calcs = [(c, t) for c, t in calcs if t]
    others = []
    for sentence in _sentences(text, reasoning_end):
        for part in _subtract(sentence, [c for c, _ in calcs]):
            stripped = _strip(text, *part)
            tokens = to_tokens(*stripped) if stripped else None
            if tokens:
                others.append(tokens)
    candidates = [("calculation", t) for _, t in calcs] + [
        ("text", t) for t in _merge_short(others, calcs, min_tokens, max_tokens)
    ]
    candidates = _resolve_overlaps(sorted(candidates, key=lambda c: (c[1][0], c[0] != "calculation")))
    if max_spans is not None and len(candidates) > max_spans:
        ranked = sorted(range(len(candidates)), key=lambda i: (candidates[i][0] != "calculation", i))
        keep = set(ranked[:max_spans])
        candidates = [c for i, c in enumerate(candidates) if i in keep]

    spans, previous_end = [], 0
    for kind, (t0, t1) in candidates:
        # Never cut through a character: decoding a span's tokens must give back its text.
        t0 = _clean_boundary(max(t0, previous_end), clean, reasoning_tokens)
        t1 = _clean_boundary(t1, clean, reasoning_tokens)
        if t1 <= t0:
            continue
        previous_end = t1
        span_text = text[offsets[t0][0] : offsets[t1 - 1][1]]
        if kind == "text":
            kind = "numeric" if any(ch.isdigit() for ch in span_text) else "scaffolding"
        spans.append(Span(kind, t0, t1, offsets[t0][0], offsets[t1 - 1][1], span_text))
    a0 = reasoning_tokens
    if answer.marker_start == answer.number_start:  # no marker: the answer is the number alone
        a1 = _clean_boundary(align.tokens(answer.number_start, answer.number_end)[1], clean, len(body))
    else:
        a1 = len(body)
    if a1 <= a0:  # the number's tokens were taken by a character of the reasoning
        return []
    char_end = offsets[a1 - 1][1]
    spans.append(Span("answer", a0, a1, offsets[a0][0], char_end, text[offsets[a0][0] : char_end]))
    return spans


def _clean_boundary(token: int, clean: list[bool], limit: int) -> int:
    """The first token at or after `token` that starts a new character (at most `limit`)."""
    while token < limit and not clean[token]:
        token += 1
    return token


def _merge_short(pieces, calcs, min_tokens, max_tokens):
    """Merge pieces under `min_tokens` into an adjacent piece (no calculation between), split long ones."""
    calc_starts = [t[0] for _, t in calcs]

    def can_join(left, right) -> bool:  # joined pieces over max_tokens are split again below
        return not any(left[1] <= s < right[0] for s in calc_starts)

    merged: list[tuple[int, int]] = []
    pending = None  # a short piece waiting to be joined to the next one
    for piece in pieces:
        if pending is not None:
            if can_join(pending, piece):
                piece = (pending[0], piece[1])
            elif merged and can_join(merged[-1], pending):
                merged[-1] = (merged[-1][0], pending[1])
            pending = None
        if piece[1] - piece[0] < min_tokens:
            pending = piece
        else:
            merged.append(piece)
    if pending is not None and merged and can_join(merged[-1], pending):
        merged[-1] = (merged[-1][0], pending[1])
    out = []
    for start, end in merged:
        parts = -(-(end - start) // max_tokens)
        bounds = [start + round(i * (end - start) / parts) for i in range(parts + 1)]
        out.extend(itertools.pairwise(bounds))
    return out


def _resolve_overlaps(candidates):
    """Calculations win: a text span overlapping one is trimmed to the part before or after it."""
    calcs = [t for kind, t in candidates if kind == "calculation"]
    out, last_end = [], 0
    for kind, (t0, t1) in candidates:
        if kind != "calculation":
            for c0, c1 in calcs:
                if c0 < t1 and t0 < c1:
                    t0, t1 = (t0, c0) if t0 < c0 else (max(t0, c1), t1)
        t0 = max(t0, last_end)
        if t1 > t0:
            out.append((kind, (t0, t1)))
            last_end = t1
    return out


def line_relevance(
    completion_ids: Sequence[int], tokenizer: Any, reasoning_end: int, labels: dict[str, str], feeds: frozenset[str]
) -> list[bool]:
    """Per reasoning token (`[0, reasoning_end)`): whether its line (newline included) has the
    form of a reference sentence whose label is in `feeds` (see `cfiw_cli.tasks.arith`)."""
    return [label in feeds for label in line_labels(completion_ids, tokenizer, reasoning_end, labels)]


def feeds_the_answer(
    completion_ids: Sequence[int], sentence_labels: Sequence[dict], answer_start: int, tokenizer: Any
) -> list[bool]:
    """The oracle's knowledge: per reasoning token, whether its line feeds the answer, from the
    ground-truth sentence labels a `cfiw synth` row carries (its `labels` column)."""
    return line_relevance(completion_ids, tokenizer, answer_start, label_lookup(sentence_labels), FEEDS_ANSWER)


def line_labels(completion_ids: Sequence[int], tokenizer: Any, end: int, labels: dict[str, str]) -> list[str | None]:
    """Per token of `completion_ids[:end]`: the label of its line (newline included), from the
    reference sentences' forms (`cfiw_cli.tasks.arith.line_label`), or None. A token that
    crosses lines goes with the line holding most of its characters."""
    text, offsets = decode_with_offsets(list(completion_ids)[:end], tokenizer)
    lines = [(m.start(), m.end()) for m in re.finditer(r"[^\n]*\n|[^\n]+$", text)]
    line_label = [line_label_of(sentence_form(text[a:b]), labels) for a, b in lines]
    out: list[str | None] = []
    for a, b in offsets:
        if a == b:  # continues a character begun by the previous token
            a, b = max(a - 1, 0), a
        overlaps = [max(0, min(b, stop) - max(a, start)) for start, stop in lines]
        best = max(range(len(lines)), key=lambda i: overlaps[i]) if lines else None
        out.append(line_label[best] if best is not None and overlaps[best] > 0 else None)
    return out
