"""Every gold answer of the real GSM8K parses, and the gold solution earns reward 1.0."""

import json

import pytest

from cfiw_cli.tasks.gsm8k import load_questions, parse_gold, reward


@pytest.mark.parametrize("split, rows", [("train", 7473), ("test", 1319)])
def test_every_gold_parses_and_earns_full_reward(gsm8k_dir, split, rows):
    records = [json.loads(line) for line in (gsm8k_dir / f"{split}.jsonl").open()]
    assert len(records) == rows
    failures = []
    for index, record in enumerate(records):
        gold = parse_gold(record["answer"])
        if reward(record["answer"], gold) != 1.0:
            failures.append((index, gold, record["answer"][-60:]))
    assert failures == []


def test_load_questions_from_directory_and_file(gsm8k_dir):
    by_dir = load_questions(str(gsm8k_dir), split="test", offset=5, limit=3)
    by_file = load_questions(str(gsm8k_dir / "test.jsonl"), offset=5, limit=3)
    assert [r["prompt_id"] for r in by_dir] == ["test-5", "test-6", "test-7"]
    assert by_dir == by_file
    assert by_dir[0]["gold"] == parse_gold(by_dir[0]["answer"])
