"""The authors' span detector and answer region (`cfiw segment --profile authors`).

Their trainer works on the text of each token decoded on its own and finds, in order:

1. The answer region: the first of the markers `final answer`, `####`, `\\boxed{` (in that
   order of preference, case-insensitive) found in the decoded completion; the token whose
   stand-alone text covers the marker's first character starts the answer, which runs to
   the end of the completion (EOS excluded). Without a marker there is no answer region.
2. A detector's own end: the first token that decodes to the pad token's text, that strips
   to `####`, or that strips to `Final`/`final` followed by one that strips to
   `Answer`/`answer`/`answer:`; else the whole completion (EOS included).
3. Arithmetic spans, at most max_spans // 2: matches of `a op b (op c ...) = r` over the
   concatenated token texts up to that end, where op is one character of
   `+ - × * / ÷ \\ t i m e s d v` (their class `[+\\-×*/÷\\\\times\\\\div]` lists the letters of
   `times` and `div` one by one). A match runs from the token holding its first character to
   the one holding its last; one whose text is more than 30% backslashes is skipped. On a
   GSM8K line `48/2 = <<48/2=24>>24` the match is the inner `48/2=24`: the outer `48/2 = `
   and the result after `>>` lie in no arithmetic span.
4. Sentence spans, at most max_spans: a sentence ends at a token that strips to `.`, `!` or
   `?`, or that contains a blank line (`\\n\\n`); one of at least min_tokens tokens is kept
   (unless backslash-heavy). After the cap, the rest up to the end is one more span when it
   has min_tokens tokens.
5. Merge: every arithmetic span, then each sentence that overlaps none of them (a sentence
   holding a calculation is dropped whole), in order of position; spans longer than
   max_tokens are left out and at most max_spans kept.
6. Only spans that end at or before the answer region are scored.

Arithmetic spans are `calculation`, sentences `numeric` (with a digit) or `scaffolding`. The
spans and answer are exact token ranges; `char_start`, `char_end` and `text` are those of the
byte-exact decoding, as in `cfiw_cli.algo.spans`.

Differences that remain: their batch is left-padded prompts and right-padded completions run
without an attention mask, so a completion's region can reach into the batch's padding
(when a completion has no marker, its "answer" is the padding after its EOS); here each
completion is read alone, and one without a marker has no answer span (all its weights 1).
Their third sentence rule (a `\\n` token followed by another) compares a stripped token to
`\\n` and never fires; it is left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from cfiw_cli.algo.spans import Span, decode_with_offsets

MARKERS = ("final answer", "####", "\\boxed{")
ARITHMETIC = re.compile(r"\d+(?:\.\d+)?(?:\s*[+\-×*/÷\\timesdv]\s*\d+(?:\.\d+)?)+\s*=\s*\d+(?:\.\d+)?")
SENTENCE_ENDS = frozenset({".", "!", "?"})
LATEX_SHARE = 0.3  # a span whose text is more than this share of backslashes is LaTeX, not reasoning


def answer_start(texts: Sequence[str], full_text: str) -> int | None:
    """Token index where the answer region starts (step 1), or None without a marker."""
    lowered = full_text.lower()
    for marker in MARKERS:
        position = lowered.find(marker)
        if position < 0:
            continue
        cursor = 0
        for index, piece in enumerate(texts):
            if cursor <= position < cursor + len(piece):
                return index
            cursor += len(piece)
        return None  # found in the text, but no stand-alone token text covers it
    return None


def detector_end(texts: Sequence[str], pad_text: str | None) -> int:
    """Where the span detector stops looking (step 2)."""
    for index, piece in enumerate(texts):
        stripped = piece.strip()
        if pad_text and piece == pad_text:
            return index
        if stripped in ("Final", "final") and index + 1 < len(texts):
            if texts[index + 1].strip() in ("Answer", "answer", "answer:"):
                return index
        if stripped == "####":
            return index
    return len(texts)


def _latex(texts: Sequence[str], start: int, end: int) -> bool:
    text = "".join(texts[start:end])
    return bool(text) and text.count("\\") / len(text) > LATEX_SHARE


def arithmetic_spans(texts: Sequence[str], end: int, limit: int) -> list[tuple[int, int]]:
    """Step 3: token ranges of the arithmetic matches in the first `end` token texts."""
    spans: list[tuple[int, int]] = []
    for match in ARITHMETIC.finditer("".join(texts[:end])):
        first = last = None
        cursor = 0
        for index in range(end):
            width = len(texts[index])
            if first is None and cursor <= match.start() < cursor + width:
                first = index
            if cursor < match.end() <= cursor + width:
                last = index + 1
                break
            cursor += width
        if first is not None and last is not None and not _latex(texts, first, last):
            spans.append((first, last))
        if len(spans) >= limit:
            break
    return spans


def sentence_spans(texts: Sequence[str], end: int, limit: int, min_tokens: int) -> list[tuple[int, int]]:
    """Step 4: token ranges of the sentences in the first `end` token texts."""
    spans: list[tuple[int, int]] = []
    start = 0
    for index in range(end):
        if texts[index].strip() in SENTENCE_ENDS or "\n\n" in texts[index]:
            stop = index + 1
            if stop - start >= min_tokens and not _latex(texts, start, stop):
                spans.append((start, stop))
            start = stop
            if len(spans) >= limit:
                break
    if start < end and end - start >= min_tokens and not _latex(texts, start, end):
        spans.append((start, end))
    return spans


def merged_spans(
    arithmetic: list[tuple[int, int]], sentences: list[tuple[int, int]], limit: int, max_tokens: int
) -> list[tuple[int, int]]:
    """Step 5: arithmetic spans win; overlapping sentences are dropped whole."""
    kept = list(arithmetic) + [
        (s, e) for s, e in sentences if all(e <= a_start or s >= a_end for a_start, a_end in arithmetic)
    ]
    out: list[tuple[int, int]] = []
    for s, e in sorted(kept, key=lambda span: span[0]):
        if e - s <= max_tokens:
            out.append((s, e))
        if len(out) >= limit:
            break
    return out


def authors_spans(
    completion_ids: Sequence[int],
    tokenizer: Any,
    *,
    max_spans: int = 10,
    min_tokens: int = 5,
    max_tokens: int = 50,
    ends_with_stop: bool | None = None,
) -> list[Span]:
    """Spans of one completion as the authors' trainer finds them (see the module docstring);
    [] when it has no answer region."""
    ids = list(completion_ids)
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    if ends_with_stop is None:
        ends_with_stop = bool(ids) and ids[-1] == tokenizer.eos_token_id
    body = len(ids) - 1 if ends_with_stop else len(ids)
    body = next((i for i in range(body) if ids[i] in stops), body)  # their text stops at the first EOS or pad
    texts = [tokenizer.decode([token]) for token in ids]
    reasoning_end = answer_start(texts[:body], tokenizer.decode(ids[:body]) if body else "")
    if reasoning_end is None or reasoning_end >= body:
        return []
    pad_id = tokenizer.pad_token_id
    end = detector_end(texts, tokenizer.decode([pad_id]) if pad_id else None)
    arithmetic = arithmetic_spans(texts, end, max_spans // 2)
    candidates = merged_spans(arithmetic, sentence_spans(texts, end, max_spans, min_tokens), max_spans, max_tokens)
    text, offsets = decode_with_offsets(ids[:body], tokenizer)
    spans = []
    for start, stop in candidates:
        if stop > reasoning_end:
            continue
        char_start, char_end = offsets[start][0], offsets[stop - 1][1]
        span_text = text[char_start:char_end]
        if (start, stop) in arithmetic:
            kind = "calculation"
        else:
            kind = "numeric" if any(ch.isdigit() for ch in span_text) else "scaffolding"
        spans.append(Span(kind, start, stop, char_start, char_end, span_text))
    char_start, char_end = offsets[reasoning_end][0], offsets[body - 1][1]
    spans.append(Span("answer", reasoning_end, body, char_start, char_end, text[char_start:char_end]))
    return spans
