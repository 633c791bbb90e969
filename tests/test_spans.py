"""Segmentation: typed spans that are exact token ranges, on hand-written and real GSM8K text."""

import json
import random
import re

import pytest
from conftest import COMPLETIONS

from cfiw_cli.algo.spans import _Alignment, decode_with_offsets, find_spans


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def spans_of(tokenizer, text, **kwargs):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, find_spans(ids, tokenizer, **kwargs)


def check_invariants(tokenizer, ids, spans):
    """What every segmentation must satisfy."""
    body = ids[:-1]
    text, _ = decode_with_offsets(body, tokenizer)
    assert [s.kind for s in spans].count("answer") == 1 and spans[-1].kind == "answer"
    previous_end = 0
    for span in spans:
        assert span.kind in ("calculation", "numeric", "scaffolding", "answer")
        assert previous_end <= span.tok_start < span.tok_end <= len(body)  # ordered, disjoint, in the body
        previous_end = span.tok_end
        assert tokenizer.decode(body[span.tok_start : span.tok_end]) == span.text
        assert text[span.char_start : span.char_end] == span.text
    assert (
        spans[-1].tok_end == len(body) or spans[-1].text.strip().replace(",", "").lstrip("$").replace(".", "").isdigit()
    )


@pytest.mark.parametrize("text", COMPLETIONS)
def test_invariants_on_hand_written_completions(tokenizer, text):
    ids, spans = spans_of(tokenizer, text)
    if "not sure" in text:
        assert spans == []  # no extractable answer: no rows
    else:
        check_invariants(tokenizer, ids, spans)


def kinds_by_text(spans):
    return {s.text.strip(): s.kind for s in spans}


def test_calculations_with_and_without_spaces_and_annotations(tokenizer):
    _, spans = spans_of(tokenizer, COMPLETIONS[0])
    kinds = kinds_by_text(spans)
    assert kinds["3 + 4 = 7"] == "calculation"
    assert kinds["12 + 7 = <<12+7=19>>19"] == "calculation"
    assert kinds["Ava starts with 12 apples."] == "numeric"
    assert kinds["#### 19"] == "answer"
    _, spans = spans_of(tokenizer, COMPLETIONS[1])
    kinds = kinds_by_text(spans)
    assert kinds["3*4=12"] == "calculation" and kinds["12 / 2 = 6"] == "calculation"
    assert kinds["Let me think about this carefully. First,"] == "scaffolding"
    assert kinds["The answer is 6."] == "answer"


def test_dollars_and_decimals(tokenizer):
    _, spans = spans_of(tokenizer, COMPLETIONS[2])
    assert kinds_by_text(spans)["9 * 2.5 = $<<9*2.5=22.5>>22.5"] == "calculation"
    assert spans[-1].text.strip() == "#### 22.5"


def test_answer_only_and_single_sentence(tokenizer):
    ids, spans = spans_of(tokenizer, "#### 5")
    assert [(s.kind, s.tok_start, s.tok_end) for s in spans] == [("answer", 0, len(ids) - 1)]
    _, spans = spans_of(tokenizer, COMPLETIONS[6])
    assert [s.kind for s in spans] == ["scaffolding", "scaffolding", "numeric", "answer"]
    assert spans[-1].text.strip() == "42"  # no marker: the answer is the last number alone
    ids, spans = spans_of(tokenizer, "She has 12 apples and eats 2 of them, so 10 remain")
    assert [s.kind for s in spans] == ["numeric", "answer"]
    assert spans[-1].text.strip() == "10" and spans[-1].tok_end < len(ids) - 1  # " remain" is in no span


def test_unicode_completion(tokenizer):
    ids, spans = spans_of(tokenizer, COMPLETIONS[5])
    check_invariants(tokenizer, ids, spans)
    kinds = kinds_by_text(spans)
    assert kinds["13 × 2 = 26"] == "calculation"
    assert kinds["16 − 3 = 13"] == "calculation"  # the unicode minus is an operator too
    assert any("🦆" in s.text for s in spans)


def test_short_sentences_merge_and_long_ones_split(tokenizer):
    text = "Ok. " + "The numbers of apples and pears in the big basket keep growing every single day. " * 4 + "#### 3"
    ids, spans = spans_of(tokenizer, text, max_tokens=30)
    check_invariants(tokenizer, ids, spans)
    reasoning = spans[:-1]
    assert all(5 <= s.tok_end - s.tok_start <= 30 for s in reasoning)
    assert reasoning[0].text.startswith("Ok.")  # the 2-token sentence joined the next one


def test_max_spans_keeps_calculations_first(tokenizer):
    lines = [f"Then we have some more apples in the basket number {i}." for i in range(8)]
    lines += [f"{i} + {i} = {2 * i}" for i in range(1, 6)]
    ids, spans = spans_of(tokenizer, "\n".join(lines) + "\n#### 10", max_spans=6)
    reasoning = spans[:-1]
    assert len(reasoning) == 6
    assert sum(s.kind == "calculation" for s in reasoning) == 5
    check_invariants(tokenizer, ids, spans)


def test_majority_rule_for_straddling_tokens():
    # tokens: "ab" [0,2), "c." [2,4), "d" [4,5); a span over characters [0, 3) = "abc"
    align = _Alignment([(0, 2), (2, 4), (4, 5)])
    assert align.tokens(0, 3) == (0, 2)  # "c." has 1 of 2 characters inside: a tie goes in
    align = _Alignment([(0, 2), (2, 5), (5, 6)])  # "c.." : 1 of 3 inside -> out
    assert align.tokens(0, 3) == (0, 1)
    align = _Alignment([(0, 1), (1, 1), (1, 2)])  # token 1 only continues the character of token 0
    assert align.tokens(0, 1) == (0, 2)


def test_token_straddling_a_calculation_edge():
    """A tokenizer without pre-tokenization merges digits with punctuation ("19." "\\n")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(["so 12 + 7 = 19.\nok"] * 50, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    text = "Ava has many apples today.\nso 12 + 7 = 19.\nok then the total is clear.\n#### 19"
    ids, spans = spans_of(tokenizer, text, min_tokens=1)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert any(
        len(tokenizer.convert_tokens_to_string([p])) > 1 and "." in tokenizer.convert_tokens_to_string([p])
        for p in pieces
    )
    check_invariants(tokenizer, ids, spans)
    calc = next(s for s in spans if s.kind == "calculation")
    assert "12 + 7 = 19" in calc.text


def test_decode_with_offsets_on_broken_utf8(tokenizer):
    """Random byte-level tokens (split multi-byte characters included) still align exactly."""
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(200):
        ids = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 30))]
        text, offsets = decode_with_offsets(ids, tokenizer)
        assert text == tokenizer.decode(ids)
        assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
        assert all(a <= b for a, b in offsets)
        assert all(offsets[i][1] == offsets[i + 1][0] for i in range(len(offsets) - 1))


@pytest.mark.slow
def test_gold_solutions_as_completions(tokenizer, gsm8k_dir):
    annotation = re.compile(r"<<[^<>]*=[^<>]*>>")
    checked = 0
    for line in (gsm8k_dir / "test.jsonl").open():
        solution = json.loads(line)["answer"]
        ids, spans = spans_of(tokenizer, solution, max_spans=100)
        check_invariants(tokenizer, ids, spans)
        text = solution
        calcs = [(s.char_start, s.char_end) for s in spans if s.kind == "calculation"]
        position = 0
        for row in text.split("\n"):
            for match in annotation.finditer(row):
                start, end = position + match.start(), position + match.end()
                assert any(a < end and start < b for a, b in calcs), (row, solution)
                checked += 1
            position += len(row) + 1
    assert checked > 3000
