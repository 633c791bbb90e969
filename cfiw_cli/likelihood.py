"""Teacher-forced log-likelihood of reference solutions: a deterministic probe of a policy.

For each question the sequence is the prompt exactly as `cfiw rollout` builds it, then the
dataset's reference solution (`answer`) and the EOS token, as `cfiw sft` trains on it. The
log-probs are at T = 1. Two numbers summarise a policy:

- `loglik_per_token`: the sum of log-probs of every solution token (EOS included) over all
  questions, divided by the number of those tokens;
- `answer_loglik`: the mean over questions of the summed log-prob of the answer line, the
  tokens that overlap `#### <number>`.

Unlike the sampled reward, neither has sampling noise: the same policy gives the same value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cfiw_cli.logprobs import completion_logprobs
from cfiw_cli.tasks.gsm8k import build_prompt

ANSWER_MARK = "####"


@dataclass(frozen=True)
class ReferenceSequence:
    prompt_id: str
    tokens: list[int]  # prompt + solution + EOS
    prompt_length: int
    answer_start: int  # index (within the solution tokens) of the first answer-line token


def reference_sequences(
    tokenizer: Any, rows: list[dict], prompt_template: str | None = None, chat_template: bool = True
) -> list[ReferenceSequence]:

    use_chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
    out = []
    for row in rows:
        prompt = tokenizer(
            build_prompt(row["question"], tokenizer, prompt_template, chat=use_chat), add_special_tokens=not use_chat
        )["input_ids"]
        solution = tokenizer(row["answer"], add_special_tokens=False, return_offsets_mapping=True)
        mark = row["answer"].rfind(ANSWER_MARK)
        mark = len(row["answer"]) if mark < 0 else mark
        answer_start = next(
            (i for i, (_, end) in enumerate(solution["offset_mapping"]) if end > mark), len(solution["input_ids"])
        )
        tokens = list(prompt) + list(solution["input_ids"]) + [tokenizer.eos_token_id]
        out.append(ReferenceSequence(row["prompt_id"], tokens, len(prompt), answer_start))
    return out


def reference_likelihood(
    model: Any, tokenizer: Any, sequences: list[ReferenceSequence], batch_size: int = 32
) -> dict[str, Any]:
    """`loglik_per_token`, `answer_loglik`, their token and question counts, and per question
    (`per_question`: prompt_id, solution log-likelihood, solution tokens, answer log-likelihood)."""
    import torch

    was_training = model.training
    model.eval()
    per_question = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            logprobs, _ = completion_logprobs(
                model, [(s.tokens, s.prompt_length) for s in batch], tokenizer.pad_token_id
            )  # [B, C]
            for row, s in enumerate(batch):
                length = len(s.tokens) - s.prompt_length
                values = logprobs[row, logprobs.shape[1] - length :].double()  # [L], solution tokens then EOS
                answer = values[s.answer_start : length - 1]  # the answer line, EOS excluded
                per_question.append(
                    {
                        "prompt_id": s.prompt_id,
                        "loglik": float(values.sum()),
                        "tokens": length,
                        "answer_loglik": float(answer.sum()),
                    }
                )
    if was_training:
        model.train()
    tokens = sum(q["tokens"] for q in per_question)
    return {
        "loglik_per_token": sum(q["loglik"] for q in per_question) / max(tokens, 1),
        "answer_loglik": sum(q["answer_loglik"] for q in per_question) / max(len(per_question), 1),
        "tokens": tokens,
        "questions": len(per_question),
        "per_question": per_question,
    }
