"""`cfiw tiny-model`: offline, deterministic, and loadable through the Auto classes by path."""

import json

import pytest

from cfiw_cli.artifacts import sha256_of


def build(cli, out, *extra):
    result = cli("tiny-model", "--out", out, "--vocab-size", "400", "--hidden", "32", *extra)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_same_seed_gives_identical_files_and_loads_by_path(cli, tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = build(cli, tmp_path / "a", "--arch", arch)
    second = build(cli, tmp_path / "b", "--arch", arch)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256_of(first / name) == sha256_of(second / name), name
    other_seed = build(cli, tmp_path / "c", "--arch", arch, "--seed", "1")
    assert sha256_of(other_seed / "model.safetensors") != sha256_of(first / "model.safetensors")

    tokenizer = AutoTokenizer.from_pretrained(first)
    model = AutoModelForCausalLM.from_pretrained(first)
    assert model.config.model_type == arch
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 400 == model.config.vocab_size
    assert tokenizer.chat_template
    # byte-level BPE: any text, multi-byte characters included, survives a round trip
    text = "Janet’s 16 ducks cost $2 — 3×4=12 🦆"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer("2 + 2 = 4")["input_ids"]])).logits
    assert logits.shape[-1] == 400 and torch.isfinite(logits).all()
    manifest = json.loads((first / "cfiw_manifest.json").read_text())
    assert manifest["stage"] == "tiny-model" and manifest["config"]["arch"] == arch


def test_rerun_is_up_to_date_and_force_rebuilds(cli, tmp_path):
    out = build(cli, tmp_path / "m")
    again = cli("tiny-model", "--out", out, "--vocab-size", "400", "--hidden", "32")
    assert again.exit_code == 0 and "up to date" in again.stderr
    changed = cli("tiny-model", "--out", out, "--vocab-size", "400", "--hidden", "32", "--layers", "3")
    assert changed.exit_code == 1 and "--force" in changed.stderr
    forced = cli("tiny-model", "--out", out, "--vocab-size", "400", "--hidden", "32", "--layers", "3", "--force")
    assert forced.exit_code == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_tokenizer_trained_on_a_dataset(cli, tmp_path, mini_dataset):
    out = build(cli, tmp_path / "m", "--dataset", mini_dataset)
    manifest = json.loads((out / "cfiw_manifest.json").read_text())
    assert manifest["inputs"]["dataset"]["sha256"] == sha256_of(mini_dataset)


def test_bad_shapes_are_input_errors(cli, tmp_path):
    result = cli("tiny-model", "--out", tmp_path / "m", "--hidden", "30", "--heads", "4")
    assert result.exit_code == 1 and result.stderr.startswith("Error:")
    assert not (tmp_path / "m").exists()


def test_pad_vocab_adds_rows_beyond_the_tokenizer(cli, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build(cli, tmp_path / "m", "--pad-vocab", "1500")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings == 1500 == model.get_output_embeddings().weight.shape[0]
    assert len(AutoTokenizer.from_pretrained(out)) <= 1024
    too_few = cli("tiny-model", "--out", tmp_path / "n", "--pad-vocab", "512")
    assert too_few.exit_code == 1 and "--pad-vocab" in too_few.stderr and not (tmp_path / "n").exists()
