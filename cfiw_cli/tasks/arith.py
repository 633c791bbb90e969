"""Synthetic GSM8K-format arithmetic word problems with a ground-truth label per solution sentence.

A problem starts with a count of some item and applies 1 to `max_steps` events (gain, give
away, multiply); every number in it, results included, lies in [1, max_number]. Its solution
has one sentence per line, each labelled by what the final answer depends on:

- `restatement`: "Ava starts with 7 apples." (the starting number, restated from the question)
- `calculation`: "7 + 5 = <<7+5=12>>12." (one event; the answer depends on each of them)
- `filler`: "Let me think about this." (no digits; the answer does not depend on it), inserted
  before a calculation with probability `filler_rate`
- `distractor` (with `distractors` > 0): "Ben's 4 apples do not count." Each of `distractors`
  sentences of the question states a number of the same item that belongs to someone else
  ("Ben has 4 apples."), at a random place among the events; the solution acknowledges each
  where the question states it. It carries digits and the item's name, but the answer does
  not depend on it, and folding its number into the running total is the error to unlearn.
- `answer`: "#### 12"

Two dials add reward-irrelevant text, drawn from a generator of their own so that a problem's
numbers and events do not depend on them:

- `filler_length` L (`filler`): before every event, a line of L words drawn from a list of
  `filler_vocab` made-up, digit-free words ("bakotu rimeso ..."): unpredictable text whose
  tokens the answer does not depend on. A line's form is `W` whatever its words, so a
  sampled line of other words keeps the label.
- `noise_lines` N (`noise`): N lines "Aside, 7 - 3 = <<7-3=4>>4." at random places among the
  events: correct arithmetic with the operators and numbers the answer hangs on, that does
  not feed the answer.

Each label is a function of the sentence's text, so a span of a generated solution whose text
is one of the reference sentences inherits its label (`cfiw analyze` does this).
"""

from __future__ import annotations

import functools
import random
import re

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kim", "Leo", "Mia", "Noah"]
ITEMS = ["apples", "books", "coins", "eggs", "marbles", "pencils", "stickers", "shells", "cookies", "cards"]
FILLERS = [
    "Let me think about this.",
    "We can solve this step by step.",
    "First, read the problem carefully.",
    "Now we put it together.",
    "This is straightforward.",
    "Let us keep track of the total.",
]
LABELS = ("restatement", "calculation", "filler", "distractor", "noise", "answer")
FEEDS_ANSWER = frozenset({"restatement", "calculation"})  # the labels whose lines the answer depends on


FILLER_WORD = "(?:[bdfgklmnprstvz][aeiou]){3}"  # a dial word: three consonant-vowel syllables
FILLER_RUN = rf"\b{FILLER_WORD}\b(?: {FILLER_WORD}\b)*"  # (no word of the base problems has this shape)


def sentence_form(text: str) -> str:
    """What a label is a function of: the words, with whitespace collapsed, outer spaces and
    full stops trimmed, every number as N (so a wrong calculation is still a calculation) and
    every run of dial words as W. `cfiw analyze` matches spans to labels by the same form, in SQL."""
    return re.sub(r"\d+", "N", re.sub(FILLER_RUN, "W", re.sub(r"\s+", " ", text)).strip(" ."))


SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
MAX_FILLER_VOCAB = len(SYLLABLES) ** 3


@functools.cache
def filler_words(count: int) -> tuple[str, ...]:
    """`count` distinct dial words, the same list for the same count."""
    n = len(SYLLABLES)
    chosen = random.Random(f"filler-words:{count}").sample(range(MAX_FILLER_VOCAB), count)
    return tuple(SYLLABLES[i // n**2] + SYLLABLES[i // n % n] + SYLLABLES[i % n] for i in chosen)


def _noise_line(rng: random.Random, max_number: int) -> str:
    """Correct arithmetic the answer does not depend on, with the deciding operators."""
    if rng.random() < 0.5:
        a = rng.randint(1, max_number - 1)
        b = rng.randint(1, max_number - a)
        op, result = "+", a + b
    else:
        a = rng.randint(2, max_number)
        b = rng.randint(1, a - 1)
        op, result = "-", a - b
    return f"Aside, {a} {op} {b} = <<{a}{op}{b}={result}>>{result}."


SHAPES = {  # any operator: the misconception's line too, and a noise line of the policy's own
    "calculation": re.compile(r"N [-+*] N = <<N[-+*]N=N>>N"),
    "noise": re.compile(r"Aside, N [-+*] N = <<N[-+*]N=N>>N"),
}


def line_label(form: str, lookup: dict[str, str]) -> str | None:
    """The label of a generated line of sentence form `form`: its reference sentence's, and a
    line shaped as a calculation (or a noise line) is one whatever its operator (the teacher's
    misconception writes + where the reference has -, and that line feeds the answer)."""
    return lookup.get(form) or next((label for label, shape in SHAPES.items() if shape.fullmatch(form)), None)


def label_lookup(labels: list[dict]) -> dict[str, str]:
    """{form: label} of one problem's reference sentences; a form with two labels is left out."""
    seen: dict[str, set[str]] = {}
    for sentence in labels or []:
        seen.setdefault(sentence_form(sentence["text"]), set()).add(sentence["label"])
    return {form: next(iter(found)) for form, found in seen.items() if len(found) == 1}


def _step(rng: random.Random, total: int, item: str, max_number: int) -> tuple[str, str, int]:
    """One event that changes the running total: (question sentence, operator, operand)."""
    kinds = []
    if total < max_number:
        kinds.append("gain")
    if total > 1:
        kinds.append("lose")
    if 2 * total <= max_number:
        kinds.append("times")
    kind = rng.choice(kinds)
    if kind == "lose":
        amount = rng.randint(1, total - 1)
        return f"Then gives away {amount} {item}.", "-", amount
    if kind == "times":
        factor = rng.randint(2, max(2, min(4, max_number // total)))
        return f"Then the number of {item} grows {factor} times.", "*", factor
    amount = rng.randint(1, max_number - total)
    return f"Then gets {amount} more {item}.", "+", amount


def _calculation(total: int, op: str, operand: int) -> tuple[str, int]:
    new = {"+": total + operand, "-": total - operand, "*": total * operand}[op]
    return f"{total} {op} {operand} = <<{total}{op}{operand}={new}>>{new}.", new


def make_problem(
    rng: random.Random,
    max_steps: int = 3,
    max_number: int = 50,
    filler_rate: float = 0.3,
    distractors: int = 0,
    teacher: random.Random | None = None,
    teacher_error_rate: float = 0.0,
    filler_length: int = 0,
    filler_vocab: int = 256,
    noise_lines: int = 0,
    dial: random.Random | None = None,
) -> dict:
    """{"question", "answer" (GSM8K format), "labels": [{"text", "label"}, ...] one per solution line}.

    With `teacher`, the row also has "teacher_answer" and "teacher_labels": the same problem
    solved by a teacher with a systematic misconception, which at each error site errs with
    probability `teacher_error_rate` (drawn from `teacher`, so `rng`'s problems are unchanged):
    a given-away amount is added instead of subtracted, and a distractor's count is added to
    the total instead of being set aside. Its later lines continue from its wrong total.
    The dials' lines (see the module docstring) are drawn from `dial`, and the teacher writes
    them as they are."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, max(2, max_number // 2))
    question = [f"{name} has {total} {item}."]
    labels = [{"text": f"{name} starts with {total} {item}.", "label": "restatement"}]
    taught, taught_labels = total, list(labels)

    def errs() -> bool:  # draws from the teacher's generator only, and only when there is one
        return teacher is not None and teacher.random() < teacher_error_rate

    events = rng.randint(1, max_steps)
    words = filler_words(filler_vocab) if filler_length else ()
    if (filler_length or noise_lines) and dial is None:
        raise ValueError("the dials draw from a generator of their own: pass dial")
    noise_slots = sorted(dial.randint(0, events - 1) for _ in range(noise_lines)) if noise_lines else []
    others = rng.sample([n for n in NAMES if n != name], distractors) if distractors else []
    # where each distractor goes: before event j (j = events: after the last one)
    slots = sorted(rng.randint(0, events) for _ in others)
    for j in range(events + 1):
        while others and slots[0] == j:
            slots.pop(0)
            other, count = others.pop(0), rng.randint(1, max_number)
            question.append(f"{other} has {count} {item}.")
            labels.append({"text": f"{other}'s {count} {item} do not count.", "label": "distractor"})
            if errs():
                line, taught = _calculation(taught, "+", count)
                taught_labels.append({"text": line, "label": "calculation"})
            else:
                taught_labels.append(labels[-1])
        if j == events:
            break
        sentence, op, operand = _step(rng, total, item, max_number)
        question.append(sentence)
        dialled = [{"text": _noise_line(dial, max_number), "label": "noise"} for _ in range(noise_slots.count(j))]
        if filler_length:
            dialled.append(
                {"text": " ".join(dial.choice(words) for _ in range(filler_length)) + ".", "label": "filler"}
            )
        labels += dialled
        taught_labels += dialled
        if rng.random() < filler_rate:
            labels.append({"text": rng.choice(FILLERS), "label": "filler"})
            taught_labels.append(labels[-1])
        line, total = _calculation(total, op, operand)
        labels.append({"text": line, "label": "calculation"})
        line, taught = _calculation(taught, "+" if op == "-" and errs() else op, operand)
        taught_labels.append({"text": line, "label": "calculation"})
    question.append(f"How many {item} does {name} have now?")
    labels.append({"text": f"#### {total}", "label": "answer"})
    row = {"question": " ".join(question), "answer": "\n".join(s["text"] for s in labels), "labels": labels}
    if teacher is not None:
        taught_labels.append({"text": f"#### {taught}", "label": "answer"})
        row.update(teacher_answer="\n".join(s["text"] for s in taught_labels), teacher_labels=taught_labels)
    return row


def make_problems(n: int, seed: int = 0, **kwargs) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng, **kwargs) for _ in range(n)]
