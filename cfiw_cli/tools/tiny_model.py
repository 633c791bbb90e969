"""`cfiw tiny-model`: a locally trained byte-level BPE tokenizer plus a random-init model.

Everything is built offline and saved with `save_pretrained`, so tests and demos load it by
path through exactly the code a hub id goes through. Same arguments and seed give identical
files.
"""

from __future__ import annotations

from pathlib import Path

from cfiw_cli.artifacts import sha256_of
from cfiw_cli.configs import ARCHS, TinyModelConfig
from cfiw_cli.console import info
from cfiw_cli.errors import CfiwError
from cfiw_cli.modeling import quiet_libraries
from cfiw_cli.stage import StageResult, StageRun
from cfiw_cli.tasks.arith import make_problems
from cfiw_cli.tasks.gsm8k import load_questions

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus(dataset: str | None) -> list[str]:
    """Training text: question + answer of a GSM8K-format dataset, or generated problems."""
    if dataset is None:
        rows = make_problems(2000, seed=0)
    else:
        rows = load_questions(dataset, split="train")
    return [f"{row['question']}\n{row['answer']}" for row in rows]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_model(config: TinyModelConfig, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=max(len(tokenizer), config.pad_vocab),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate or config.hidden * 3,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_positions,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_config = Qwen2Config(tie_word_embeddings=True, **common) if config.arch == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=model_config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def run(config: TinyModelConfig, force: bool = False) -> StageResult:
    if config.arch not in ARCHS:
        raise CfiwError(f"unknown architecture {config.arch!r}", f"choose one of {', '.join(ARCHS)}")
    if config.hidden % config.heads or config.heads % config.kv_heads:
        raise CfiwError(
            "--hidden must be divisible by --heads, and --heads by --kv-heads", "try --hidden 64 --heads 4 --kv-heads 2"
        )
    if config.pad_vocab and config.pad_vocab < config.vocab_size:
        raise CfiwError(
            f"--pad-vocab {config.pad_vocab} is below --vocab-size {config.vocab_size}",
            "pad to at least the tokenizer's size (it counts all rows), or pass 0",
        )
    with StageRun("tiny-model", config, {"dataset": config.dataset}, force=force, directory=True) as stage:
        if stage.up_to_date:
            return stage.skipped()
        quiet_libraries()
        texts = corpus(config.dataset)
        tokenizer = train_tokenizer(texts, config.vocab_size)
        model = build_model(config, tokenizer)
        params = sum(p.numel() for p in model.parameters())
        manifest = stage.manifest(
            rows=len(texts),
            metrics={"parameters": params, "vocab_size": len(tokenizer)},
            device="cpu",
            seed=config.seed,
        )

        def fill(staging: Path) -> None:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            manifest["weights_sha256"] = sha256_of(staging / "model.safetensors")

        result = stage.write_directory(fill, manifest)
    info(f"wrote {config.arch} model ({params:,} parameters, vocabulary {len(tokenizer)}) to {stage.out}")
    return result
