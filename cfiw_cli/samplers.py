"""The seam between the stages that sample and the engine that samples.

`cfiw rollout` and `cfiw eval` (and through them the loop, the probe and replay) sample only
through a `Sampler`: `load_weights(model, tokenizer)` hands it the policy to sample from (the
loop's freshly trained one, cast to the stage's dtype), and `sample(rows, options, seed)`
returns `samples` completions per question with each sampled token's log-probability under the
distribution it was drawn from. `--backend` picks the engine:

- `generate` (the default): transformers' `generate` in left-padded batches, with every
  sequence drawing from its own seeded random stream (`cfiw_cli.generation`), so a sequence's
  sample does not depend on the batch size, the other questions or the number of processes.
- `continuous`: transformers' continuous batching (`generate_batch`: requests are scheduled
  into a paged KV cache as others finish, no padding). Greedy decoding (temperature 0) gives
  the tokens `generate` gives. Sampling draws from torch's one global random stream (seeded
  with the stage's seed), so the tokens differ from `generate`'s and depend on how requests
  were scheduled; their log-probs are still those of the distribution drawn from (temperature
  and top-p applied, renormalized). A test shows both.

An engine that keeps its own copy of the weights (vLLM, say) implements the same two methods:
`load_weights` is where it would receive each new policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from cfiw_cli.errors import CfiwError
from cfiw_cli.generation import QuestionSample, cut_at_stop, generation_config, prompts_of, sample_questions
from cfiw_cli.modeling import stop_token_ids

if TYPE_CHECKING:
    from cfiw_cli.configs import SamplingOptions


class Sampler(Protocol):
    def load_weights(self, model: Any, tokenizer: Any) -> None:
        """The policy (and its tokenizer) to sample from, from now on."""

    def sample(
        self, rows: list[dict], options: SamplingOptions, seed: int, samples: int = 1, description: str = "sampling"
    ) -> list[QuestionSample]:
        """`samples` completions of each row's question, a question's samples adjacent, in row order."""


class GenerateSampler:
    """transformers' `generate`, every sequence with its own seeded stream (the default)."""

    def load_weights(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def sample(
        self, rows: list[dict], options: SamplingOptions, seed: int, samples: int = 1, description: str = "sampling"
    ) -> list[QuestionSample]:
        return sample_questions(
            self.model,
            self.tokenizer,
            rows,
            samples=samples,
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            batch_size=options.batch_size,
            seed=seed,
            prompt_template=options.prompt_template,
            chat_template=options.chat_template,
            description=description,
        )


class ContinuousBatchingSampler:
    """transformers' continuous batching (`generate_batch`); see the module's docstring for
    what it does not reproduce."""

    def load_weights(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def sample(
        self, rows: list[dict], options: SamplingOptions, seed: int, samples: int = 1, description: str = "sampling"
    ) -> list[QuestionSample]:
        import torch
        from transformers import GenerationConfig

        try:
            from transformers import ContinuousBatchingConfig
        except ImportError as exc:
            raise CfiwError(
                "--backend continuous needs a transformers release with continuous batching (5.x)",
                "upgrade transformers, or use --backend generate",
            ) from exc

        prompts, encoded = prompts_of(rows, self.tokenizer, options.prompt_template, options.chat_template)
        stop_ids = stop_token_ids(self.model, self.tokenizer)
        greedy = options.temperature == 0
        config = generation_config(self.tokenizer, options.max_new_tokens, options.temperature)
        if not greedy:  # the engine's own sampler: temperature and top-p applied, one global stream
            config.do_sample, config.temperature, config.top_p = True, options.temperature, options.top_p
        config.eos_token_id = list(stop_ids)
        config.num_return_sequences = samples
        batching = ContinuousBatchingConfig(return_logprobs=True, seed=seed, max_requests_per_batch=options.batch_size)
        # `generate_batch` fills unset options from the checkpoint's generation config; an empty one keeps ours
        checkpoint_config, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:
            with torch.inference_mode():
                results = self.model.generate_batch(
                    [list(ids) for ids in encoded], config, continuous_batching_config=batching, warmup=False
                )
        finally:
            self.model.generation_config = checkpoint_config
        failed = [key for key, result in results.items() if result.error is not None]
        if failed or len(results) != len(rows) * samples:
            missing = len(rows) * samples - len(results) + len(failed)
            raise CfiwError(
                f"continuous batching returned no completion for {missing} of {len(rows) * samples} requests",
                "use --backend generate",
            )
        out = []
        for index, result in enumerate(results.values()):  # a question's samples adjacent, in row order
            row = index // samples
            completion = cut_at_stop(result.generated_tokens, result.logprobs, set(stop_ids))
            body = completion.ids[:-1] if completion.finish_reason == "stop" else completion.ids
            text = self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(QuestionSample(rows[row], index % samples, prompts[row], list(encoded[row]), completion, text))
        return out


BACKENDS: dict[str, type] = {"generate": GenerateSampler, "continuous": ContinuousBatchingSampler}


def sampler(backend: str, model: Any, tokenizer: Any) -> Sampler:
    """A sampler of `backend` holding `model`. A new one per stage: these engines keep no state of
    their own, and holding the stage's model (a dtype-cast copy, on a GPU) past the stage would
    keep its memory while score and train run. An engine with its own copy of the weights would
    be kept instead, and receive each new policy through `load_weights`."""
    chosen = BACKENDS[backend]()
    chosen.load_weights(model, tokenizer)
    return chosen
