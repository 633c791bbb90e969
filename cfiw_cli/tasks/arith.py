"""Small GSM8K-format arithmetic word problems, generated from a seed (offline data and corpora).

Solutions mix calculation lines with GSM8K `<<a+b=c>>` annotations, restatements with numbers
and filler sentences without digits, and end with `#### <answer>`.
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


def _step(rng: random.Random, total: int, item: str, max_number: int) -> tuple[str, str, int]:
    """One event that changes the running total: (question sentence, solution line, new total)."""
    amount = rng.randint(2, max_number)
    kind = rng.choice(["gain", "lose", "times"] if total > 1 else ["gain", "times"])
    if kind == "lose":
        amount = rng.randint(1, total - 1)
        new = total - amount
        return f"Then gives away {amount} {item}.", f"{total} - {amount} = <<{total}-{amount}={new}>>{new}", new
    if kind == "times":
        factor = rng.randint(2, 4)
        new = total * factor
        return f"Then the number of {item} grows {factor} times.", f"{total} * {factor} = <<{total}*{factor}={new}>>{new}", new
    new = total + amount
    return f"Then gets {amount} more {item}.", f"{total} + {amount} = <<{total}+{amount}={new}>>{new}", new


def make_problem(rng: random.Random, max_steps: int = 3, max_number: int = 50, filler_rate: float = 0.3) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, max_number)
    question = [f"{name} has {total} {item}."]
    solution = [f"{name} starts with {total} {item}."]
    for _ in range(rng.randint(1, max_steps)):
        sentence, line, total = _step(rng, total, item, max_number)
        question.append(sentence)
        if rng.random() < filler_rate:
            solution.append(rng.choice(FILLERS))
        solution.append(line + ".")
    question.append(f"How many {item} does {name} have now?")
    solution.append(f"#### {total}")
    return {"question": " ".join(question), "answer": "\n".join(solution)}


def make_problems(n: int, seed: int = 0, **kwargs) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng, **kwargs) for _ in range(n)]


def write_splits(out_dir: str, n_train: int = 200, n_test: int = 50, seed: int = 0) -> None:
    """`<out_dir>/train.jsonl` and `test.jsonl`, the test split drawn from another seed."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1)):
        rows = make_problems(n, seed=split_seed)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    import sys

    write_splits(sys.argv[1] if len(sys.argv) > 1 else "data/arith")
