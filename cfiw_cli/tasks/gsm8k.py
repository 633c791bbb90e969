"""GSM8K: gold parsing, answer extraction, reward, prompt, and dataset loading.

Answer extraction looks, in order, for the number after the last `####`, after the last
`The answer is` / `Final answer`, inside the last `\\boxed{}`, and finally the last number of
the text. `$`, thousands commas, `%`, a trailing `.` and trailing `.0` are tolerated: numbers
are compared as decimals, so `1,234.00` equals `1234`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from cfiw_cli import hub
from cfiw_cli.errors import CfiwError

HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"

# A number: optional sign (not the minus of `10-5`), optional `$`, digits with proper
# thousands groups or plain digits, optional decimals. `.5` is accepted too.
_NUMBER = r"(?:(?<![\w)])-\s?)?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])\.\d+"
NUMBER_RE = re.compile(_NUMBER)
# What may stand between a marker and its number: spaces, colons, markdown bold, `=`, `$`.
_GAP = r"[\s:*=$]*(?:\\boxed\{|\\\(|\\\[)?[\s$]*"
_MARKERS = [
    re.compile(r"####" + _GAP + f"({_NUMBER})"),
    re.compile(r"(?i)(?:the\s+(?:final\s+)?answer\s+is|final\s+answer)(?:\s+is)?" + _GAP + f"({_NUMBER})"),
    re.compile(r"\\boxed\{[^{}\d-]*" + f"({_NUMBER})" + r"[^{}]*\}"),
]

DEFAULT_INSTRUCTION = (
    "{question}\n"
    "Solve the problem step by step. "
    "Write the final answer as a number on the last line in the form '#### <number>'."
)


@dataclass(frozen=True)
class AnswerMatch:
    """Where the final answer sits in a completion (character offsets)."""

    value: str  # normalized number, e.g. "1234"
    marker_start: int  # start of the marker (`####`, ...), or of the number when there is none
    number_start: int
    number_end: int


def normalize_number(text: str) -> str | None:
    """Canonical decimal string of a number written as in GSM8K, or None if it is not one."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".%")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    na, nb = normalize_number(a), normalize_number(b)
    return na is not None and na == nb


def locate_answer(text: str) -> AnswerMatch | None:
    """Find the final answer of a completion, following the order in the module docstring."""
    for marker in _MARKERS:
        matches = list(marker.finditer(text))
        for match in reversed(matches):
            value = normalize_number(match.group(1))
            if value is not None:
                return AnswerMatch(value, match.start(), match.start(1), match.end(1))
    numbers = list(NUMBER_RE.finditer(text))
    for match in reversed(numbers):
        value = normalize_number(match.group(0))
        if value is not None:
            return AnswerMatch(value, match.start(), match.start(), match.end())
    return None


def extract_answer(text: str) -> str | None:
    match = locate_answer(text)
    return match.value if match else None


def parse_gold(answer: str) -> str:
    """`"... #### 1,234"` -> `"1234"`. Raises `CfiwError` when there is no `####` number."""
    if "####" not in answer:
        raise CfiwError(f"gold answer has no '####' line: {answer[-80:]!r}", "GSM8K answers end with '#### <number>'")
    tail = answer.rsplit("####", 1)[1]
    match = NUMBER_RE.search(tail)
    value = normalize_number(match.group(0)) if match else None
    if value is None:
        raise CfiwError(
            f"gold answer after '####' is not a number: {tail.strip()!r}", "GSM8K answers end with '#### <number>'"
        )
    return value


def reward(completion: str, gold: str) -> float:
    """1.0 when the extracted answer equals the gold number, else 0.0."""
    return 1.0 if numbers_equal(extract_answer(completion), gold) else 0.0


def build_prompt(question: str, tokenizer: Any = None, template: str | None = None, chat: bool = True) -> str:
    """The user message (`template` with `{question}`), wrapped in the chat template if any."""
    user = (template or DEFAULT_INSTRUCTION).replace("{question}", question)
    if chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return user + "\n"


def _resolve_local(dataset: str, split: str) -> Path | None:
    path = Path(dataset).expanduser()
    if path.is_dir():
        for suffix in (".jsonl", ".json", ".parquet"):
            candidate = path / f"{split}{suffix}"
            if candidate.exists():
                return candidate
        raise CfiwError(f"no {split}.jsonl or {split}.parquet in {path}", "pass --split or a file path")
    if path.exists():
        return path
    looks_local = dataset.endswith((".jsonl", ".json", ".parquet")) or dataset.startswith((".", "/", "~"))
    if looks_local or dataset.count("/") > 1:
        raise CfiwError(f"dataset not found: {dataset}", "pass 'gsm8k' or an existing .jsonl/.parquet file")
    return None


def _check_json_lines(path: Path) -> None:
    """A .jsonl file whose every non-blank line is a JSON object, or an error naming the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CfiwError(f"cannot read {path}: {exc}", "pass a UTF-8 .jsonl file") from exc
    if not any(line.strip() for line in lines):
        raise CfiwError(f"{path} holds no questions (it is empty)", "pass a .jsonl file with one question per line")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CfiwError(f"{path} line {number} is not valid JSON: {exc.msg}", "fix that line") from exc
        if not isinstance(row, dict):
            raise CfiwError(f"{path} line {number} is not a JSON object", "each line holds one question object")


def load_questions(dataset: str, split: str = "train", offset: int = 0, limit: int | None = None) -> list[dict]:
    """Rows `{prompt_id, question, answer, gold}` of a GSM8K-format dataset, sliced.

    `dataset` is `gsm8k` (hub `openai/gsm8k`, config `main`), another hub id, a `.jsonl` /
    `.parquet` file, or a directory holding `<split>.jsonl`. `prompt_id` is
    `<split or file stem>-<row index>`, stable for a question whatever the slice.
    """
    import datasets

    datasets.disable_progress_bars()
    local = _resolve_local(dataset, split)
    try:
        if local is not None:
            builder = "parquet" if local.suffix == ".parquet" else "json"
            if builder == "json":
                _check_json_lines(local)  # names the first bad line, where the library gives a byte offset
            rows = datasets.load_dataset(builder, data_files=str(local), split="train")
            source = local.stem
        else:
            hub_id, config = (HUB_ID, HUB_CONFIG) if dataset == "gsm8k" else (dataset, None)
            with hub.offline_unless_reachable() as online:
                try:
                    rows = datasets.load_dataset(hub_id, config, split=split)
                except Exception as exc:  # noqa: BLE001 - offline, any failure means: not in the cache
                    if online:
                        raise
                    raise CfiwError(
                        f"could not load dataset {dataset!r}: the hub cannot be reached and the local cache lacks it",
                        "pass a local GSM8K-format .jsonl/.parquet file, or load it once where the hub is reachable",
                    ) from exc
            source = split
    except CfiwError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for unreadable input
        raise CfiwError(
            f"could not load dataset {dataset!r}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            "pass a local GSM8K-format .jsonl/.parquet file (columns question, answer)",
        ) from exc
    missing = [c for c in ("question", "answer") if c not in rows.column_names]
    if missing:
        raise CfiwError(
            f"dataset {dataset} has no column {', '.join(repr(c) for c in missing)} (it has "
            f"{', '.join(rows.column_names)})",
            "a GSM8K-format dataset needs 'question' and 'answer' columns",
        )
    if offset < 0 or (limit is not None and limit < 0):
        raise CfiwError("--offset and --limit must not be negative", "pass values >= 0")
    stop = len(rows) if limit is None else min(len(rows), offset + limit)
    if offset >= stop:
        raise CfiwError(
            f"empty selection: {dataset} has {len(rows)} rows, offset {offset}, limit {limit}",
            "choose --offset below the row count and --limit >= 1",
        )
    selected = rows.select(range(offset, stop))
    out = []
    for index, row in zip(range(offset, stop), selected, strict=True):
        for column in ("question", "answer"):
            if not isinstance(row[column], str) or not row[column].strip():
                raise CfiwError(
                    f"row {index} of {dataset} has no {column} ({column}: {row[column]!r})",
                    f"every row needs a non-empty {column} string",
                )
        try:
            gold = parse_gold(str(row["answer"]))
        except CfiwError as exc:
            raise CfiwError(f"row {index} of {dataset}: {exc.message}", exc.hint) from None
        extras = {k: v for k, v in row.items() if k not in ("question", "answer")}
        out.append(
            {
                "prompt_id": f"{source}-{index}",
                "question": row["question"],
                "answer": row["answer"],
                "gold": gold,
                **extras,
            }
        )
    return out
