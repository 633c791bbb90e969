"""Synthetic GSM8K-format arithmetic word problems with a ground-truth label per solution sentence.

A problem starts with a count of some item and applies 1 to `max_steps` events (gain, give
away, multiply); every number in it, results included, lies in [1, max_number]. Its solution
has one sentence per line, each labelled by what the final answer depends on:

- `restatement`: "Ava starts with 7 apples." (the starting number, restated from the question)
- `calculation`: "7 + 5 = <<7+5=12>>12." (one event; the answer depends on each of them)
- `filler`: "Let me think about this." (no digits; the answer does not depend on it), inserted
  before a calculation with probability `filler_rate`
- `answer`: "#### 12"

Each label is a function of the sentence's text, so a span of a generated solution whose text
is one of the reference sentences inherits its label (`cfiw analyze` does this).
"""

from __future__ import annotations

import random

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
LABELS = ("restatement", "calculation", "filler", "answer")


def _step(rng: random.Random, total: int, item: str, max_number: int) -> tuple[str, str, int]:
    """One event that changes the running total: (question sentence, solution line, new total)."""
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
        new = total - amount
        return f"Then gives away {amount} {item}.", f"{total} - {amount} = <<{total}-{amount}={new}>>{new}.", new
    if kind == "times":
        factor = rng.randint(2, max(2, min(4, max_number // total)))
        new = total * factor
        return f"Then the number of {item} grows {factor} times.", f"{total} * {factor} = <<{total}*{factor}={new}>>{new}.", new
    amount = rng.randint(1, max_number - total)
    new = total + amount
    return f"Then gets {amount} more {item}.", f"{total} + {amount} = <<{total}+{amount}={new}>>{new}.", new


def make_problem(rng: random.Random, max_steps: int = 3, max_number: int = 50, filler_rate: float = 0.3) -> dict:
    """{"question", "answer" (GSM8K format), "labels": [{"text", "label"}, ...] one per solution line}."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, max(2, max_number // 2))
    question = [f"{name} has {total} {item}."]
    labels = [{"text": f"{name} starts with {total} {item}.", "label": "restatement"}]
    for _ in range(rng.randint(1, max_steps)):
        sentence, line, total = _step(rng, total, item, max_number)
        question.append(sentence)
        if rng.random() < filler_rate:
            labels.append({"text": rng.choice(FILLERS), "label": "filler"})
        labels.append({"text": line, "label": "calculation"})
    question.append(f"How many {item} does {name} have now?")
    labels.append({"text": f"#### {total}", "label": "answer"})
    return {"question": " ".join(question), "answer": "\n".join(s["text"] for s in labels), "labels": labels}


def make_problems(n: int, seed: int = 0, **kwargs) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng, **kwargs) for _ in range(n)]

