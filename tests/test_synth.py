"""`cfiw synth`: deterministic GSM8K-format problems whose sentence labels tell the truth."""

import json
import re
from pathlib import Path

from cfiw_cli.artifacts import sha256_of
from cfiw_cli.tasks.arith import FILLERS, LABELS
from cfiw_cli.tasks.gsm8k import load_questions, parse_gold
from test_errors import assert_clean_error

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
    assert not {r["question"] for r in train} & {r["question"] for r in test}, "a test question repeats a train question"
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
    assert seen == set(LABELS)
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
    too_many = cli("synth", "--out", tmp_path / "i", "--n-train", "10", "--n-test", "3000", "--max-number", "4", "--max-steps", "1")
    assert_clean_error(too_many, "distinct test problems")
    assert not (tmp_path / "i").exists()


def test_committed_copy_is_what_synth_writes(tmp_path):
    """data/arith is `cfiw synth` output; its manifest's settings regenerate it byte for byte."""
    from cfiw_cli.stages.synth import SynthConfig, run

    settings = json.loads((ROOT / "data/arith/cfiw_manifest.json").read_text())["config"]
    out = run(SynthConfig(out=str(tmp_path / "copy"), **settings))
    for split in ("train.jsonl", "test.jsonl"):
        assert (out / split).read_bytes() == (ROOT / "data/arith" / split).read_bytes(), split
