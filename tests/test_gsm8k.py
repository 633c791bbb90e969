"""Answer extraction, gold parsing, reward and prompts of the GSM8K task."""

import pytest

from cfiw_cli.errors import CfiwError
from cfiw_cli.tasks.gsm8k import (
    build_prompt,
    extract_answer,
    locate_answer,
    normalize_number,
    numbers_equal,
    parse_gold,
    reward,
)

# (completion text, expected extracted answer)
TRICKY = [
    ("#### 42", "42"),
    ("So she pays 3 + 4 = 7 dollars.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("####1234", "1234"),
    ("#### $1,234.00", "1234"),
    ("#### 5.", "5"),
    ("#### 2.50", "2.5"),
    ("#### -3", "-3"),
    ("#### 0.75", "0.75"),
    ("The total is 12.\n#### 12\nI hope this helps with 99 problems.", "12"),  # `####` beats the last number
    ("#### 10 is wrong. Correction:\n#### 11", "11"),  # the last `####` wins
    ("The answer is 18.", "18"),
    ("The answer is: $18", "18"),
    ("the answer is **1,000**", "1000"),
    ("The final answer is 3.0", "3"),
    ("Final answer: 64", "64"),
    ("The answer is 5. Later I mention 7 apples.", "5"),  # marker beats the last number
    ("Thus \\boxed{72}", "72"),
    ("\\boxed{\\$1,200}", "1200"),
    ("She has 3 + 4 = 7 apples", "7"),  # no marker: the last number
    ("10-5=5", "5"),  # the minus of a subtraction is not a sign
    ("It costs $.50 each, so .5", "0.5"),
    ("The discount is 25%", "25"),
    ("There are 3, 4, 5 boxes", "5"),  # a list, not thousands
    ("Temperature fell to -7 degrees", "-7"),
    ("No numbers at all here.", None),
    ("", None),
    ("#### \nSo the result is 9", "9"),  # a bare marker falls through to the last number
    ("He earned 1,000,000 dollars.", "1000000"),
]


@pytest.mark.parametrize("text, expected", TRICKY)
def test_extract_answer_table(text, expected):
    assert extract_answer(text) == expected


def test_table_is_large_enough():
    assert len(TRICKY) >= 25


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("...\n#### 1,234", "1234"),
        ("...\n#### -5", "-5"),
        ("...\n#### 3.50", "3.5"),
        ("...\n####  $70000", "70000"),
    ],
)
def test_parse_gold(answer, gold):
    assert parse_gold(answer) == gold


@pytest.mark.parametrize("answer", ["no marker 42", "#### many"])
def test_parse_gold_rejects_non_gsm8k(answer):
    with pytest.raises(CfiwError):
        parse_gold(answer)


@pytest.mark.parametrize(
    "a, b, equal",
    [
        ("1,234", "1234", True),
        ("5.0", "5", True),
        ("$5", "5", True),
        ("0.50", ".5", True),
        ("5", "6", False),
        (None, "5", False),
    ],
)
def test_numbers_equal(a, b, equal):
    assert numbers_equal(a, b) is equal


def test_normalize_number_rejects_text():
    assert normalize_number("abc") is None
    assert normalize_number("nan") is None


def test_reward_is_one_only_for_the_gold_number():
    assert reward("3 + 4 = 7\n#### 7", "7") == 1.0
    assert reward("3 + 4 = 7\n#### 8", "7") == 0.0
    assert reward("I do not know", "7") == 0.0


def test_locate_answer_offsets_point_at_marker_and_number():
    text = "2 + 2 = 4\n#### 4"
    match = locate_answer(text)
    assert text[match.marker_start :].startswith("####")
    assert text[match.number_start : match.number_end] == "4"


def test_build_prompt_without_chat_template_is_plain_text():
    prompt = build_prompt("What is 2 + 2?", tokenizer=None)
    assert prompt.startswith("What is 2 + 2?\n") and "####" in prompt


def test_build_prompt_custom_template():
    assert build_prompt("Q?", None, template="Question: {question}\nAnswer:") == "Question: Q?\nAnswer:\n"


def test_build_prompt_uses_chat_template(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = build_prompt("What is 2 + 2?", tokenizer)
    assert prompt.startswith("<|im_start|>user\nWhat is 2 + 2?")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert build_prompt("Q", tokenizer, chat=False) == build_prompt("Q", None)
