"""`--profile authors` across the stages: their span detector, their answer positions."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import leftovers, write_rollouts
from test_errors import assert_clean_error

from cfiw_cli.algo.authors import authors_spans
from cfiw_cli.algo.spans import find_spans

ROOT = Path(__file__).resolve().parents[1]


class PieceTokenizer:
    """A tokenizer whose token i decodes to PIECES[i] (not byte-level: each token's text is its own)."""

    eos_token_id = 99
    pad_token_id = 98

    def __init__(self, pieces):
        self.pieces = {**dict(enumerate(pieces)), 99: "<eos>", 98: "<pad>"}

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


# "Ava has 5 pens.\n5 - 2 = <<5-2=3>>3.\n#### 3" and EOS, one token per piece:
PIECES = ["Ava", " has", " 5", " pens", ".", "\n", "5", " -", " 2", " =", " <<", "5", "-", "2", "=", "3", ">>"]
PIECES += ["3", ".", "\n", "####", " 3"]
#          0      1       2      3        4    5     6    7      8     9     10     11   12   13   14   15   16
#          17   18   19     20      21     (22: EOS)


def test_the_authors_detector_by_hand():
    # (c) Their answer region starts at the "####" token (20) and runs to the EOS (22, left
    # out). Their arithmetic regex needs a number right after "=": "5 - 2 = <<" fails at "<<",
    # so the only match is the inner annotation "5-2=3", tokens [11, 16). The sentence ending
    # at token 4 (5 tokens) is kept; the one ending at token 18 overlaps the arithmetic span
    # and is dropped whole; the tail [19, 20) is 1 token, under min_tokens. So the outer
    # "5 - 2 = <<" (tokens 6-10, with the operator " -" at 7) and ">>3.\n" lie in no span.
    tokenizer = PieceTokenizer(PIECES)
    ids = list(range(len(PIECES))) + [99]
    spans = authors_spans(ids, tokenizer)
    assert [(s.kind, s.tok_start, s.tok_end, s.text) for s in spans] == [
        ("numeric", 0, 5, "Ava has 5 pens."),
        ("calculation", 11, 16, "5-2=3"),
        ("answer", 20, 22, "#### 3"),
    ]
    # the default profile's calculation holds the outer expression, operator included
    cfiw = find_spans(ids, tokenizer)
    calculation = next(s for s in cfiw if s.kind == "calculation")
    assert calculation.tok_start <= 7 < calculation.tok_end
    # without a marker there is no answer region, so no spans at all
    assert authors_spans(list(range(20)) + [99], tokenizer) == []


def test_their_sentences_end_at_stand_alone_stops_and_blank_lines():
    # "First we add the two numbers" (6 tokens) ends at the blank-line token; "Ok" (2 tokens)
    # ends at "."; both are sentences, but "Ok ." has fewer than min_tokens = 5 tokens.
    # "Final"+" answer" is a marker and ends the detector: "Final answer: 7" is the answer.
    pieces = ["First", " we", " add", " the", " two", " numbers", "\n\n", "Ok", ".", " Final", " answer", ":", " 7"]
    tokenizer = PieceTokenizer(pieces)
    spans = authors_spans(list(range(len(pieces))) + [99], tokenizer)
    assert [(s.kind, s.tok_start, s.tok_end) for s in spans] == [("scaffolding", 0, 7), ("answer", 9, 13)]
    # --max-tokens leaves longer spans out instead of splitting them
    assert [s.kind for s in authors_spans(list(range(len(pieces))) + [99], tokenizer, max_tokens=6)] == ["answer"]


@pytest.mark.slow
def test_no_calculation_operator_of_the_teacher_solutions_lies_in_a_span(tiny_model):
    # (c) on data/arith's 2,000 teacher solutions: every one of their 3,953 calculation lines
    # "a op b = <<a op b=c>>c." has its outer operator in no span of the authors' detector (the
    # inner annotation is the span), while the default profile's calculation span holds it.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(line) for line in (ROOT / "data" / "arith" / "sft.jsonl").read_text().splitlines()]
    lines = outside = inside_default = 0
    for row in rows:
        text = row["answer"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        authors, default = authors_spans(ids, tokenizer), find_spans(ids, tokenizer)
        offsets = [0]
        for token in ids[:-1]:
            offsets.append(offsets[-1] + len(tokenizer.decode([token])))
        start = 0
        for sentence in row["labels"]:
            start = text.index(sentence["text"], start)
            if sentence["label"] != "calculation":
                continue
            lines += 1
            operator_char = start + len(sentence["text"].split(" ")[0]) + 1  # "a op b": the op after "a "
            token = next(t for t in range(len(ids) - 1) if offsets[t] <= operator_char < offsets[t + 1])
            outside += not any(s.tok_start <= token < s.tok_end for s in authors if s.kind != "answer")
            inside_default += any(s.tok_start <= token < s.tok_end and s.kind == "calculation" for s in default)
    assert (lines, outside, inside_default) == (3953, 3953, 3953)


@pytest.mark.slow
def test_score_takes_the_authors_answer_positions(cli, tiny_model, tmp_path):
    # (b) Their answer score sums log p of positions reasoning_end + 1 .. seq_len - 1: every
    # completion token after the answer's first one ("####"), EOS included.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "Ava starts with 12 apples.\nShe buys 3 + 4 = 7 more.\n12 + 7 = <<12+7=19>>19 apples.\n#### 19"
    rollouts = write_rollouts(tmp_path / "rollouts.parquet", tokenizer, [text, "3 + 4 = 7.\n#### 7"])
    for profile in ("authors", "cfiw"):
        assert cli("segment", "-r", rollouts, "-m", tiny_model, "--out", tmp_path / f"spans-{profile}.parquet",
                   "--profile", profile).exit_code == 0  # fmt: skip
        done = cli("score", "-m", tiny_model, "-r", rollouts, "-s", tmp_path / f"spans-{profile}.parquet",
                   "--out", tmp_path / f"scores-{profile}.parquet", "--profile", profile)  # fmt: skip
        assert done.exit_code == 0, done.stderr
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    row = pq.read_table(rollouts).to_pylist()[0]
    prompt, completion = row["prompt_ids"], row["completion_ids"]
    spans = [s for s in pq.read_table(tmp_path / "spans-authors.parquet").to_pylist() if s["rollout_id"] == "0:q-0:0"]
    answer = next(s for s in spans if s["kind"] == "answer")

    def answer_logp(completion_ids, first, last):  # sum of log p(completion[t]) for t in [first, last)
        ids = torch.tensor([prompt + completion_ids])
        with torch.no_grad():
            logprobs = model(ids).logits[0].float().log_softmax(-1)
        return sum(float(logprobs[len(prompt) + t - 1, completion_ids[t]]) for t in range(first, last))

    scores = [s for s in pq.read_table(tmp_path / "scores-authors.parquet").to_pylist() if s["rollout_id"] == "0:q-0:0"]
    base = answer_logp(completion, answer["tok_start"] + 1, len(completion))  # "####" skipped, EOS in
    for score in scores:
        span = next(s for s in spans if s["span_idx"] == score["span_idx"])
        masked = list(completion)
        masked[span["tok_start"] : span["tok_end"]] = [tokenizer.pad_token_id] * (span["tok_end"] - span["tok_start"])
        assert score["base_logp"] == pytest.approx(base, abs=1e-4)
        assert score["delta"] == pytest.approx(
            base - answer_logp(masked, answer["tok_start"] + 1, len(completion)), abs=1e-4
        )
    # the default profile scores the answer span itself: "####" in, EOS out
    default = pq.read_table(tmp_path / "scores-cfiw.parquet").to_pylist()[0]
    cfiw_answer = next(
        s for s in pq.read_table(tmp_path / "spans-cfiw.parquet").to_pylist()
        if s["rollout_id"] == "0:q-0:0" and s["kind"] == "answer"
    )  # fmt: skip
    assert default["base_logp"] == pytest.approx(
        answer_logp(completion, cfiw_answer["tok_start"], cfiw_answer["tok_end"]), abs=1e-4
    )
    manifest = json.loads(pq.read_schema(tmp_path / "scores-authors.parquet").metadata[b"cfiw"])
    assert manifest["config"]["profile"] == "authors"
    # training under the other profile is allowed, never silently
    mixed = cli("train", "-m", tiny_model, "-r", rollouts, "-s", tmp_path / "spans-authors.parquet", "--scores",
                tmp_path / "scores-authors.parquet", "--out", tmp_path / "mixed", "--lr", "0")  # fmt: skip
    assert mixed.exit_code == 0, mixed.stderr
    assert "was made with --profile authors; training with --profile cfiw" in mixed.stderr
    # their trainer scores the rollout's own answer only
    out, before = tmp_path / "gold.parquet", leftovers(tmp_path)
    result = cli("score", "-m", tiny_model, "-r", rollouts, "-s", tmp_path / "spans-authors.parquet", "--out", out,
                 "--profile", "authors", "--target", "gold")  # fmt: skip
    assert_clean_error(result, "scores the rollout's own answer")
    assert not out.exists() and leftovers(tmp_path) == before
