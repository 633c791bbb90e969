"""Batched sampling with HF `generate` that also returns each sampled token's log-probability.

The log-probabilities are those of the distribution the token was actually drawn from:
softmax of `logits / temperature`, restricted to the top-p nucleus and renormalized. HF applies
its own temperature/top-p warpers *after* user logits processors, so we switch those off and
apply temperature and top-p in `_SamplingDistribution`, which is then the last processor:
the scores it returns are exactly what `generate` samples from. Only one `[B, V]` step of
log-probabilities is alive at a time (no `output_scores`, which would keep `[B, T, V]`).
Greedy decoding (temperature 0) records the log-probabilities at temperature 1.

Sampling does not use `generate`'s own sampler (one global random stream, so a sequence's
sample would depend on the batch and the process it ran in). Each sequence has its own seeded
generator; `_SamplingDistribution` adds Gumbel noise drawn from it to the final scores, and
`generate` runs greedily: the argmax of `scores + Gumbel` is an exact sample from
`softmax(scores)` (the Gumbel-max trick). A sequence's sample then depends only on its own
seed, whatever the batch size, the order, or the number of processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cfiw_cli.batching import left_padded_batch
from cfiw_cli.console import progress_bar
from cfiw_cli.kv_cache import cache_argument, growing_cache
from cfiw_cli.modeling import stop_token_ids
from cfiw_cli.tasks.gsm8k import build_prompt

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Completion:
    ids: list[int]  # sampled tokens, up to and including the stop token
    logprobs: list[float]  # one per token in `ids`
    finish_reason: str  # "stop" | "length"


def sequence_seed(seed: int, prompt_id: str, sample_idx: int) -> int:
    """The seed of one sequence's random stream: a function of the run's seed, the question and
    the sample index alone (a stable hash, not Python's salted `hash`)."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{sample_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _SamplingDistribution:
    """Logits processor: temperature + top-p, the log-prob of the token chosen last step, and,
    when sampling, each row's Gumbel noise from its own generator (`seeds`, one per row)."""

    def __init__(self, temperature: float, top_p: float, seeds: Sequence[int] = (), device: Any = None):
        import torch

        self.temperature = temperature
        self.top_p = top_p
        self.chosen_logprobs: list[torch.Tensor] = []  # one [B] tensor per finished step
        self._last_logprobs = None  # [B, V] of the step whose token is not chosen yet
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds] if temperature > 0 else []

    def gumbel(self, scores: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B, V]
        import torch

        tiny = torch.finfo(torch.float32).tiny
        uniform = torch.stack(
            [torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators]
        )  # [B, V]: step t of row r is the t-th draw of row r's generator
        return -torch.log(-torch.log(uniform.clamp_(min=tiny, max=1 - 2**-24)))

    def record(self, chosen_tokens: torch.Tensor) -> None:  # [B]
        self.chosen_logprobs.append(self._last_logprobs.gather(1, chosen_tokens[:, None]).squeeze(1))  # [B]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # [B, S], [B, V] -> [B, V]
        import torch

        if self._last_logprobs is not None:
            self.record(input_ids[:, -1])
        scores = scores.float()  # [B, V]
        if self.temperature > 0:
            scores = scores / self.temperature
            if self.top_p < 1.0:
                sorted_scores, order = scores.sort(dim=-1, descending=True)  # [B, V]
                probs = sorted_scores.softmax(-1)
                mass_before = probs.cumsum(-1) - probs  # [B, V] mass of strictly better tokens
                drop_sorted = mass_before >= self.top_p  # the best token always has 0 before it
                drop = drop_sorted.scatter(1, order, drop_sorted)
                scores = scores.masked_fill(drop, float("-inf"))
        self._last_logprobs = torch.log_softmax(scores, dim=-1)  # [B, V]
        if self.generators:
            return scores + self.gumbel(scores)  # generate's argmax of this is a sample from softmax(scores)
        return scores


def generation_config(tokenizer: Any, max_new_tokens: int, temperature: float) -> Any:
    """A clean config: nothing inherited from the checkpoint alters the sampling distribution.
    Decoding is greedy: sampling happens in `_SamplingDistribution` (Gumbel-max)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
        use_cache=True,
    )


def cut_at_stop(ids: Sequence[int], logprobs: Sequence[float], stop_ids: set[int]) -> Completion:
    """Truncate after the first stop token; without one the completion hit the length limit."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return Completion(list(ids[: position + 1]), list(logprobs[: position + 1]), "stop")
    return Completion(list(ids), list(logprobs), "length")


def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    *,
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seeds: Sequence[int],
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Completion]:
    """Complete every prompt (already tokenized, unpadded), `batch_size` sequences per call.

    Sequence i samples from its own random stream, seeded with `seeds[i]`, so its sample does
    not depend on the other sequences of its batch or on the batches before it. `on_batch(sequences,
    tokens)` is called after each batch (progress bars).
    """
    from transformers import GenerationConfig

    config = generation_config(tokenizer, max_new_tokens, temperature)
    config.eos_token_id = list(stop_ids)
    results: list[Completion] = []
    # `generate` fills every unset option from the checkpoint's generation config (a hub model
    # may set min_p, suppress_tokens, ...); an empty one keeps our distribution exact.
    checkpoint_config, model.generation_config = model.generation_config, GenerationConfig()
    try:
        for start in range(0, len(prompt_ids), batch_size):
            batch = _complete_batch(
                model,
                tokenizer,
                prompt_ids[start : start + batch_size],
                config,
                set(stop_ids),
                temperature,
                top_p,
                seeds[start : start + batch_size],
            )
            results.extend(batch)
            if on_batch:
                on_batch(len(batch), sum(len(c.ids) for c in batch))
    finally:
        model.generation_config = checkpoint_config
    return results


def _complete_batch(model, tokenizer, batch, config, stop_ids, temperature, top_p, seeds) -> list[Completion]:
    import torch

    dev = next(model.parameters()).device
    input_ids, attention_mask = left_padded_batch(batch, tokenizer.pad_token_id, dev)  # [B, P] each
    processor = _SamplingDistribution(temperature, top_p, seeds, dev)
    cache = growing_cache()
    with torch.inference_mode():
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=[processor],
            **({cache_argument(model): cache} if cache is not None else {}),
        )  # [B, P + N]
    new_tokens = sequences[:, input_ids.shape[1] :]  # [B, N]
    processor.record(new_tokens[:, -1])
    logprobs = torch.stack(processor.chosen_logprobs, dim=1)  # [B, N]
    return [cut_at_stop(ids, lps, stop_ids) for ids, lps in zip(new_tokens.tolist(), logprobs.tolist(), strict=True)]


@dataclass(frozen=True)
class QuestionSample:
    row: dict  # the dataset row (prompt_id, question, gold, ...)
    sample_idx: int
    prompt_text: str
    prompt_ids: list[int]
    completion: Completion
    text: str  # completion decoded, without its stop token


def prompts_of(
    rows: list[dict], tokenizer: Any, prompt_template: str | None, chat_template: bool
) -> tuple[list[str], list[list[int]]]:
    """Each row's prompt text and its token ids, in the chat template when asked and the
    tokenizer has one."""
    use_chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
    prompts = [build_prompt(row["question"], tokenizer, prompt_template, chat=use_chat) for row in rows]
    # A chat template already writes the special tokens it needs (BOS included).
    return prompts, [list(ids) for ids in tokenizer(prompts, add_special_tokens=not use_chat)["input_ids"]]


def sample_questions(
    model: Any,
    tokenizer: Any,
    rows: list[dict],
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    prompt_template: str | None = None,
    chat_template: bool = True,
    description: str = "sampling",
) -> list[QuestionSample]:
    """`samples` completions per question, the samples of one question kept adjacent."""

    prompts, encoded = prompts_of(rows, tokenizer, prompt_template, chat_template)
    stop_ids = stop_token_ids(model, tokenizer)
    jobs = [(i, s) for i in range(len(rows)) for s in range(samples)]
    with progress_bar(description, total=len(jobs), unit="sequences") as advance:
        tokens_so_far = 0

        def on_batch(sequences: int, tokens: int) -> None:
            nonlocal tokens_so_far
            tokens_so_far += tokens
            advance(sequences, status=f"{tokens_so_far} tokens")

        completions = generate(
            model,
            tokenizer,
            [list(encoded[i]) for i, _ in jobs],
            stop_ids=stop_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            seeds=[sequence_seed(seed, rows[i]["prompt_id"], s) for i, s in jobs],
            on_batch=on_batch,
        )
    out = []
    for (i, s), completion in zip(jobs, completions, strict=True):
        body = completion.ids[:-1] if completion.finish_reason == "stop" else completion.ids
        text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(QuestionSample(rows[i], s, prompts[i], list(encoded[i]), completion, text))
    return out
