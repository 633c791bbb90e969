"""`cfiw synth`: deterministic GSM8K-format problems whose sentence labels tell the truth."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_errors import assert_clean_error

from cfiw_cli.artifacts import sha256_of
from cfiw_cli.tasks.arith import FILLERS, LABELS
from cfiw_cli.tasks.gsm8k import load_questions, parse_gold

ROOT = Path(__file__).resolve().parents[1]


def synth(cli, out, *extra):
    result = cli("synth", "--out", out, "--n-train", "300", "--n-test", "60", *extra)
    assert result.exit_code == 0, result.stderr
    return out


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_files_other_seed_other_files(cli, tmp_path):
    first, second = synth(cli, tmp_path / "a"), synth(cli, tmp_path / "b")
    other = synth(cli, tmp_path / "c", "--seed", "1")
    for split in ("train.jsonl", "test.jsonl"):
        assert (first / split).read_bytes() == (second / split).read_bytes()
        assert (first / split).read_bytes() != (other / split).read_bytes()
    manifest = json.loads((first / "cfiw_manifest.json").read_text())
    assert manifest["stage"] == "synth" and manifest["seed"] == 0
    assert manifest["metrics"]["rows"] == {"train": 300, "test": 60}


def test_labels_describe_the_solution_and_the_arithmetic_is_right(cli, tmp_path):
    out = synth(cli, tmp_path / "d", "--max-number", "30", "--max-steps", "3", "--filler-rate", "0.5")
    train, test = read(out / "train.jsonl"), read(out / "test.jsonl")
    assert not {r["question"] for r in train} & {r["question"] for r in test}, (
        "a test question repeats a train question"
    )
    seen = set()
    for row in train + test:
        labels = row["labels"]
        # the labels are the solution, line by line
        assert row["answer"] == "\n".join(s["text"] for s in labels)
        assert {s["label"] for s in labels} <= set(LABELS)
        assert labels[0]["label"] == "restatement" and labels[-1]["label"] == "answer"
        calculations = [s["text"] for s in labels if s["label"] == "calculation"]
        assert 1 <= len(calculations) <= 3
        total = int(re.search(r"\d+", labels[0]["text"]).group())
        for line in calculations:
            a, op, b, result = re.fullmatch(r"(\d+) ([-+*]) (\d+) = <<\1\2\3=(\d+)>>\4\.", line).groups()
            assert int(a) == total, "each calculation continues from the running total"
            total = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert total == int(result) and 1 <= total <= 30
        assert parse_gold(row["answer"]) == str(total)
        for sentence in labels:
            if sentence["label"] == "filler":
                assert sentence["text"] in FILLERS and not re.search(r"\d", sentence["text"])
            seen.add(sentence["label"])
        assert max(int(n) for n in re.findall(r"\d+", row["question"])) <= 30
    assert seen == set(LABELS) - {"distractor", "noise"}
    no_filler = synth(cli, tmp_path / "e", "--filler-rate", "0")
    assert all(s["label"] != "filler" for row in read(no_filler / "train.jsonl") for s in row["labels"])


def test_loads_as_a_gsm8k_dataset_with_labels(cli, tmp_path):
    out = synth(cli, tmp_path / "f")
    rows = load_questions(str(out), split="test", limit=3)
    assert [r["prompt_id"] for r in rows] == ["test-0", "test-1", "test-2"]
    assert all(r["labels"][-1]["text"] == f"#### {r['gold']}" for r in rows)


def test_up_to_date_force_and_bad_input(cli, tmp_path):
    out = synth(cli, tmp_path / "g")
    before = sha256_of(out / "train.jsonl")
    again = cli("synth", "--out", out, "--n-train", "300", "--n-test", "60")
    assert again.exit_code == 0 and "up to date" in again.stderr
    changed = cli("synth", "--out", out, "--n-train", "301", "--n-test", "60")
    assert_clean_error(changed, "already exists")
    assert cli("synth", "--out", out, "--n-train", "301", "--n-test", "60", "--force").exit_code == 0
    assert sha256_of(out / "train.jsonl") != before
    assert cli("synth", "--out", tmp_path / "h", "--filler-rate", "1.5").exit_code == 2
    too_many = cli(
        "synth", "--out", tmp_path / "i", "--n-train", "10", "--n-test", "3000", "--max-number", "4", "--max-steps", "1"
    )
    assert_clean_error(too_many, "distinct test problems")
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize("name", ["arith", "arith-distractors"])
def test_committed_copy_is_what_synth_writes(tmp_path, name):
    """data/arith* are `cfiw synth` output; their manifests' settings regenerate them byte for byte."""
    from cfiw_cli.tools.synth import SynthConfig, run

    settings = json.loads((ROOT / "data" / name / "cfiw_manifest.json").read_text())["config"]
    out = run(SynthConfig(out=str(tmp_path / "copy"), **settings)).path
    for split in ("train.jsonl", "test.jsonl", "sft.jsonl"):
        assert (out / split).read_bytes() == (ROOT / "data" / name / split).read_bytes(), split


def test_the_teacher_errs_only_by_its_misconception(cli, tmp_path):
    out = synth(cli, tmp_path / "t", "--distractors", "1", "--teacher-error-rate", "0.5")
    train, taught = read(out / "train.jsonl"), read(out / "sft.jsonl")
    assert [r["question"] for r in train] == [r["question"] for r in taught]
    assert "teacher_answer" not in train[0] and not (synth(cli, tmp_path / "none") / "sft.jsonl").exists()
    errors = chances = wrong = 0
    for row, teacher in zip(train, taught, strict=True):
        lines = [s["text"] for s in teacher["labels"]]
        assert teacher["answer"] == "\n".join(lines)
        total = int(re.search(r"\d+", lines[0]).group())
        events = re.findall(r"(gives away|gets|grows|has) (\d+)", row["question"])[1:]  # the first "has" is the start
        body = [line for line in lines[1:-1] if line not in FILLERS]
        assert len(body) == len(events)
        for (kind, number), line in zip(events, body, strict=True):
            chances += kind in ("gives away", "has")
            if kind == "has" and line.endswith("do not count."):
                continue
            a, op, b, result = re.fullmatch(r"(\d+) ([-+*]) (\d+) = <<\1\2\3=(\d+)>>\4\.", line).groups()
            assert int(a) == total and b == number, (
                "the teacher continues from its own total with the question's number"
            )
            right = {"gives away": "-", "gets": "+", "grows": "*", "has": None}[kind]
            errors += op != right
            assert op == right or (op == "+" and kind in ("gives away", "has")), "the only error is adding"
            total = int(result)
        assert lines[-1] == f"#### {total}"
        wrong += parse_gold(teacher["answer"]) != parse_gold(row["answer"])
    assert 0.4 < errors / chances < 0.6  # each chance errs with probability 0.5
    assert json.loads((out / "cfiw_manifest.json").read_text())["metrics"]["teacher_wrong_share"] == wrong / len(train)


def test_distractors_carry_numbers_the_answer_does_not_depend_on(cli, tmp_path):
    out = synth(cli, tmp_path / "k", "--distractors", "2", "--filler-rate", "0.3")
    plain = read(synth(cli, tmp_path / "plain") / "train.jsonl")
    rows = read(out / "train.jsonl") + read(out / "test.jsonl")
    for row in rows:
        labels = row["labels"]
        name = re.match(r"(\w+) has", row["question"]).group(1)
        item = re.search(r"How many (\w+) does", row["question"]).group(1)
        distractors = [s["text"] for s in labels if s["label"] == "distractor"]
        assert len(distractors) == 2 and row["answer"] == "\n".join(s["text"] for s in labels)
        for line in distractors:
            other, count = re.fullmatch(rf"(\w+)'s (\d+) {item} do not count\.", line).groups()
            assert other != name and f"{other} has {count} {item}." in row["question"]
        # the answer is the running total of the calculations alone
        total = int(re.search(r"\d+", labels[0]["text"]).group())
        for line in (s["text"] for s in labels if s["label"] == "calculation"):
            a, op, b = re.match(r"(\d+) ([-+*]) (\d+)", line).groups()
            assert int(a) == total
            total = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert parse_gold(row["answer"]) == str(total)
    assert {s["label"] for row in rows for s in row["labels"]} == {
        "restatement",
        "calculation",
        "filler",
        "distractor",
        "answer",
    }
    assert all("distractor" not in {s["label"] for s in row["labels"]} for row in plain)
    manifest = json.loads((out / "cfiw_manifest.json").read_text())
    assert (
        manifest["config"]["distractors"] == 2 and manifest["metrics"]["train_sentences_by_label"]["distractor"] == 600
    )
    too_many = cli("synth", "--out", tmp_path / "bad", "--distractors", "14")  # one per other name: at most 13
    assert too_many.exit_code == 2 and "less than or equal to 13" in too_many.stderr


def test_the_dials_add_only_their_own_lines(cli, tmp_path):
    """Filler lines of L dial words and N noise lines, drawn apart from the problems: removing
    them gives back the dial-free dataset of the same seed, the teacher's errors included."""
    from cfiw_cli.tasks.arith import filler_words, label_lookup, sentence_form

    flags = ("--max-number", "10", "--teacher-error-rate", "0.5")
    plain = synth(cli, tmp_path / "plain", *flags)
    dialled = synth(
        cli, tmp_path / "dial", *flags, "--filler-length", "8", "--filler-vocab", "16", "--noise-lines", "2"
    )
    words = set(filler_words(16))
    assert len(words) == 16 and not any(re.search(r"\d", w) for w in words)
    for split in ("train.jsonl", "test.jsonl", "sft.jsonl"):
        for base, row in zip(read(plain / split), read(dialled / split), strict=True):
            assert row["question"] == base["question"]
            kept = [
                s for s in row["labels"] if s["label"] not in ("noise",) and not set(s["text"][:-1].split()) <= words
            ]
            assert kept == base["labels"]
            fillers = [s["text"] for s in row["labels"] if s["label"] == "filler" and s not in base["labels"]]
            events = sum(s["label"] == "calculation" for s in base["labels"])
            assert len(fillers) == events and all(len(f[:-1].split()) == 8 for f in fillers)
            noise = [s["text"] for s in row["labels"] if s["label"] == "noise"]
            assert len(noise) == 2
            for line in noise:
                a, op, b, result = re.fullmatch(r"Aside, (\d+) ([-+]) (\d+) = <<\1\2\3=(\d+)>>\4\.", line).groups()
                assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
                assert max(int(a), int(b), int(result)) <= 10 and min(int(a), int(b), int(result)) >= 1
            assert row["answer"] == "\n".join(s["text"] for s in row["labels"])
            # a sampled filler line of other dial words has the same form, so the same label
            assert label_lookup(row["labels"])[sentence_form(" ".join(sorted(words)[:3]) + ".")] == "filler"
    assert dialled.joinpath("train.jsonl").read_bytes() != synth(
        cli, tmp_path / "other", *flags, "--filler-length", "8", "--filler-vocab", "16", "--noise-lines", "2",
        "--seed", "1",
    ).joinpath("train.jsonl").read_bytes()  # fmt: skip


def test_no_word_of_the_base_problems_looks_like_a_dial_word():
    from cfiw_cli.tasks.arith import FILLER_RUN

    for name in ("arith", "arith-distractors"):
        text = (ROOT / "data" / name / "train.jsonl").read_text() + (ROOT / "data" / name / "sft.jsonl").read_text()
        assert not re.search(FILLER_RUN, text), name


@pytest.mark.slow
def test_just_data_writes_every_dial_point_byte_for_byte(tmp_path):
    """`just dial-data POINT` (what `just data` runs for each point) against data/dial.sha256."""
    import hashlib

    expected = dict(line.split()[::-1] for line in (ROOT / "data" / "dial.sha256").read_text().splitlines())
    points = sorted({name.split("/")[0].removeprefix("arith-") for name in expected})
    assert points == ["L32", "L32-N2", "L8", "L8-N2", "N2"]
    just = [str(Path(sys.executable).parent / "just"), "--justfile", str(ROOT / "Justfile")]
    for point in points:
        subprocess.run(
            [*just, "dial-data", point, str(tmp_path)], check=True, capture_output=True, cwd=ROOT, timeout=300
        )
    for name, digest in expected.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest, name


def test_a_line_shaped_as_a_calculation_is_one_whatever_its_operator():
    """The teacher's misconception writes `5 + 4` where the reference has `5 - 4`: that line
    still feeds the answer, so the oracle and the gradient shares call it a calculation."""
    from cfiw_cli.tasks.arith import label_lookup, line_label, sentence_form

    lookup = label_lookup(
        [
            {"text": "Noah starts with 5 stickers.", "label": "restatement"},
            {"text": "Aside, 3 - 1 = <<3-1=2>>2.", "label": "noise"},
            {"text": "5 - 4 = <<5-4=1>>1.", "label": "calculation"},
            {"text": "#### 1", "label": "answer"},
        ]
    )
    labels = {
        text: line_label(sentence_form(text), lookup)
        for text in (
            "5 + 4 = <<5+4=9>>9.\n",
            "Aside, 7 - 2 = <<7-2=5>>5.",
            "Aside, 7 + 2 = <<7+2=9>>9.",
            "#### 9",
            "hm",
        )
    }
    assert labels == {
        "5 + 4 = <<5+4=9>>9.\n": "calculation",
        "Aside, 7 - 2 = <<7-2=5>>5.": "noise",
        "Aside, 7 + 2 = <<7+2=9>>9.": "noise",  # another operator than the problem's noise lines have
        "#### 9": "answer",
        "hm": None,
    }
