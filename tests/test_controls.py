"""The controls of `cfiw train`: oracle and entropy weights, the importance floor, SGD."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import leftovers, write_rollouts
from test_errors import assert_clean_error

from cfiw_cli.algo.weights import quantile
from cfiw_cli.tasks.arith import make_problems

BAD_VALUES = [
    ("--importance-floor", "1.5"),
    ("--importance-floor", "-0.1"),
    ("--entropy-quantile", "0"),
    ("--entropy-quantile", "1"),
    ("--optimizer", "rmsprop"),
    ("--momentum", "1.0"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_VALUES)
def test_bad_control_values_exit_2_before_anything_loads(cli, tmp_path, flag, value):
    result = cli("train", "--model", tmp_path / "m", "--rollouts", tmp_path / "r.parquet", "--out", tmp_path / "p",
                 "--weighting", "uniform", flag, value)  # fmt: skip
    assert result.exit_code == 2, result.stderr
    assert flag in result.stderr and leftovers(tmp_path) == []


def labelled_rollouts(path, tokenizer):
    """Reference solutions with a filler line, and the same with a wrong answer (so every group
    is kept), carrying their problems' ground-truth labels."""
    problems = make_problems(3, seed=5, filler_rate=1.0, max_steps=2, max_number=9)
    texts, golds = [], []
    for problem in problems:
        gold = problem["answer"].rsplit("#### ", 1)[1]
        texts += [problem["answer"], problem["answer"].rsplit("#### ", 1)[0] + f"#### {int(gold) + 1}"]
        golds += [gold, gold]
    write_rollouts(path, tokenizer, texts, golds)
    table = pq.read_table(path)
    labels = [problems[i // 2]["labels"] for i in range(len(texts))]
    pq.write_table(table.append_column("labels", pa.array(labels)), path)
    return problems


@pytest.mark.slow
def test_oracle_weights_follow_the_labels(cli, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rollouts, spans = tmp_path / "rollouts.parquet", tmp_path / "spans.parquet"
    problems = labelled_rollouts(rollouts, tokenizer)
    assert cli("segment", "-r", rollouts, "-m", tiny_model, "--out", spans).exit_code == 0
    out = tmp_path / "policy"
    result = cli(
        "train", "-m", tiny_model, "-r", rollouts, "-s", spans, "--out", out, "--weighting", "oracle", "--lr", "0"
    )  # fmt: skip  (no --scores: the oracle reads labels, not deltas)
    assert result.exit_code == 0, result.stderr
    weights = {r["rollout_id"]: r["token_weights"] for r in pq.read_table(out / "weights.parquet").to_pylist()}
    answers = {
        r["rollout_id"]: r for r in pq.read_table(spans).to_pylist() if r["kind"] == "answer"
    }  # fmt: skip
    for index, row in enumerate(pq.read_table(rollouts).to_pylist()):
        w, answer = weights[row["rollout_id"]], answers[row["rollout_id"]]
        # before conservation: boost 2 on restatement and calculation lines, min_weight 0.5 on
        # the filler line, answer_weight 1.5; divided by their mean; EOS stays 1.
        ids = row["completion_ids"]
        fillers = [s["text"] for s in problems[index // 2]["labels"] if s["label"] == "filler"]
        lines = []  # [start, end) of each filler line, its newline included
        for filler in fillers:
            start = row["completion_text"].index(filler)
            lines.append((start, start + len(filler) + 1))
        offsets = [0]
        for token in ids[:-1]:
            offsets.append(offsets[-1] + len(tokenizer.decode([token])))
        raw = []
        for t in range(len(ids) - 1):
            if t >= answer["tok_start"]:
                raw.append(1.5)
            else:
                raw.append(0.5 if any(a <= offsets[t] and offsets[t + 1] <= b for a, b in lines) else 2.0)
        mean = sum(raw) / len(raw)
        assert w == pytest.approx([x / mean for x in raw] + [1.0], abs=1e-6)
        assert 0.5 in raw and 2.0 in raw
    # without the labels column: one line naming it, nothing written
    plain = write_rollouts(tmp_path / "plain" / "rollouts.parquet", tokenizer, ["1 + 1 = 2.\n#### 2"] * 2, ["2", "3"])
    assert cli("segment", "-r", plain, "-m", tiny_model, "--out", plain.parent / "spans.parquet").exit_code == 0
    before = leftovers(plain.parent)
    bad = cli("train", "-m", tiny_model, "-r", plain, "-s", plain.parent / "spans.parquet", "--out",
              plain.parent / "policy", "--weighting", "oracle")  # fmt: skip
    assert_clean_error(bad, "labels column")
    assert leftovers(plain.parent) == before


@pytest.mark.slow
def test_entropy_weights_mark_the_batchs_highest_entropy_tokens(cli, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rollouts = tmp_path / "rollouts.parquet"
    texts = ["3 + 4 = 7.\n#### 7", "3 + 4 = 8.\n#### 8", "Ava has 2 pens and 5 more.\n#### 7", "#### 6"]
    write_rollouts(rollouts, tokenizer, texts, ["7", "7", "7", "7"])
    out = tmp_path / "policy"
    result = cli(
        "train",
        "-m",
        tiny_model,
        "-r",
        rollouts,
        "--out",
        out,
        "--weighting",
        "entropy",
        "--entropy-quantile",
        "0.75",
        "--temperature",
        "0.7",
        "--lr",
        "0",
    )  # fmt: skip  (no spans, no scores)
    assert result.exit_code == 0, result.stderr
    # by hand: each token's entropy under the model at T = 0.7, the 0.75-quantile over every
    # token but the EOS of the kept rollouts (all four: rewards 1, 0, 1, 0 in two groups)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = pq.read_table(rollouts).to_pylist()
    entropies = {}
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(row["prompt_ids"]) - 1 : -1].float() / 0.7
        entropies[row["rollout_id"]] = torch.distributions.Categorical(logits=logits).entropy().tolist()
    threshold = quantile([h for values in entropies.values() for h in values[:-1]], 0.75)
    weights = {r["rollout_id"]: r["token_weights"] for r in pq.read_table(out / "weights.parquet").to_pylist()}
    for rollout_id, values in entropies.items():
        expected = [1.0 if h >= threshold else 0.0 for h in values[:-1]] + [1.0]
        near = [abs(h - threshold) < 1e-5 for h in values[:-1]] + [False]  # float ties may fall either way
        assert [w for w, n in zip(weights[rollout_id], near, strict=True) if not n] == [
            e for e, n in zip(expected, near, strict=True) if not n
        ]
    share = sum(sum(w[:-1]) for w in weights.values()) / sum(len(w) - 1 for w in weights.values())
    assert share == pytest.approx(0.25, abs=0.05)
    assert json.loads((out / "cfiw_manifest.json").read_text())["config"]["entropy_quantile"] == 0.75


def max_change(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def parameters(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_sgd_state_is_saved_and_resumed(cli, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    rollouts = write_rollouts(
        tmp_path / "rollouts.parquet", AutoTokenizer.from_pretrained(tiny_model), ["1 + 1 = 2.\n#### 2"] * 2, ["2", "3"]
    )

    def train(model, out, *extra):
        return cli("train", "-m", model, "-r", rollouts, "--out", tmp_path / out, "--weighting", "uniform",
                   "--optimizer", "sgd", "--grad-clip", "0", *extra)  # fmt: skip

    assert train(tiny_model, "a", "--lr", "0.01").exit_code == 0
    assert train(tiny_model, "b", "--lr", "0.02").exit_code == 0
    # a plain gradient step is linear in the learning rate (AdamW's first step is lr * sign(g))
    start, a, b = parameters(tiny_model), parameters(tmp_path / "a"), parameters(tmp_path / "b")
    for name in start:  # (float32 parameters near 1 are rounded at ~1e-7)
        assert torch.allclose(b[name] - start[name], 2 * (a[name] - start[name]), rtol=1e-3, atol=3e-7), name
    assert max_change(a, start) > 1e-4
    # momentum keeps a buffer, saved with the checkpoint and resumed
    assert train(tiny_model, "m1", "--lr", "0.01", "--momentum", "0.9").exit_code == 0
    assert train(tmp_path / "m1", "m2", "--lr", "0.01", "--momentum", "0.9").exit_code == 0
    assert json.loads((tmp_path / "m2" / "trainer_state.json").read_text()) == {"global_step": 2, "optimizer": "sgd"}
    state = torch.load(tmp_path / "m2" / "optimizer.pt", weights_only=True)
    assert "momentum_buffer" in next(iter(state["state"].values()))
    assert state["param_groups"][0]["momentum"] == 0.9
    # AdamW cannot resume SGD's state
    result = cli("train", "-m", tmp_path / "m2", "-r", rollouts, "--out", tmp_path / "m3", "--weighting", "uniform")
    assert_clean_error(result, "holds sgd optimizer state")
    assert not (tmp_path / "m3").exists()
