"""Per-token log-probs and entropies of completions at the sampling temperature, memory-bounded.

`train` needs, for every completion token t, log softmax(logits_t / T)[token_t] (and the
entropy of that distribution, for the metrics). The naive way materialises the full
`[tokens, V]` logits, their fp32 log-softmax and, for the entropy, two more `[tokens, V]`
temporaries; the backward pass then adds dense `[tokens, V]` gradients. At Qwen's vocabulary
(151,936) and 16,384 tokens per micro-batch each such tensor is ~10 GB.

Here the model runs without its LM head (`logits_to_keep=1`; the decoder's last hidden state
is captured by a forward hook), only the positions that predict a completion token are kept,
and the LM head runs on chunks of at most `LOGIT_CHUNK_ELEMENTS` logits:

    logits = lm_head(h) / T                 # [n, V] fp32, one chunk
    logp   = logits[token] - logsumexp(logits)
    H      = logsumexp(logits) - sum softmax(logits) * logits

When a micro-batch needs more than one chunk, each chunk runs under activation
checkpointing, so no chunk's logits outlive it: the backward pass recomputes them one chunk
at a time. With one chunk (small vocabularies) nothing is recomputed. The no-grad pass that
computes the old log-probs runs the same function on the same chunks, so the ratio of the
first minibatch is exactly 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from cfiw_cli.batching import left_padded_batch

if TYPE_CHECKING:
    import torch

LOGIT_CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MB in fp32 (441 tokens at V = 151,936)


@contextlib.contextmanager
def captured_hidden(model: Any) -> Iterator[dict]:
    """Capture the decoder's last hidden state (after its final norm) during a forward call."""
    from accelerate.utils import extract_model_from_parallel

    decoder = extract_model_from_parallel(model).get_decoder()
    captured: dict = {}

    def hook(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = decoder.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _chunk_logprobs(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,  # [n, H]
    targets: torch.Tensor,  # [n]
    temperature: float,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # [n], [n]
    """Log-probs `[n]` of `targets` and entropies `[n]` (zeros unless wanted) for one chunk."""
    import torch

    logits = lm_head(hidden).float()  # [n, V]
    if temperature != 1.0:
        logits = logits / temperature
    normalizer = torch.logsumexp(logits, dim=-1)  # [n]
    logprobs = logits.gather(1, targets[:, None]).squeeze(1) - normalizer  # [n]
    if not want_entropy:
        return logprobs, torch.zeros_like(logprobs)
    with torch.no_grad():
        entropy = normalizer - (logits.softmax(-1) * logits).sum(-1)  # [n]
    return logprobs, entropy


def completion_logprobs(
    model: Any,
    sequences: Sequence[tuple[list[int], int]],
    pad_id: int,
    temperature: float = 1.0,
    want_entropy: bool = False,
    autocast: Any = None,
    chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:  # [B, C], [B, C]
    """`sequences`: (prompt + completion token ids, prompt length) per row. Returns log-probs and
    entropies `[B, C]` of the completion tokens, right-aligned (row b's completion ends at
    column C - 1) and zero where a row has no token; C is the longest completion."""
    import torch
    from accelerate.utils import extract_model_from_parallel
    from torch.utils.checkpoint import checkpoint

    device = next(model.parameters()).device
    width = max(len(tokens) for tokens, _ in sequences)
    longest = max(len(tokens) - prompt for tokens, prompt in sequences)
    ids, attention = left_padded_batch([tokens for tokens, _ in sequences], pad_id, device)  # [B, W] each
    positions = (attention.cumsum(1) - 1).clamp(min=0)  # [B, W]
    mixed = {"dtype": autocast or torch.bfloat16, "enabled": autocast is not None}  # autocast: a torch dtype or None
    with captured_hidden(model) as captured, torch.autocast(device.type, **mixed):
        model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=1)
    hidden = captured["hidden"][:, width - longest - 1 : width - 1]  # [B, C, H]: column j predicts completion token j
    # Right-aligned completion tokens and which slots hold one.
    targets = ids[:, width - longest :]  # [B, C]
    lengths = torch.tensor([len(t) - p for t, p in sequences], device=device)  # [B]
    present = torch.arange(longest, device=device)[None, :] >= (longest - lengths)[:, None]  # [B, C]
    rows, cols = present.nonzero(as_tuple=True)  # only real completion tokens reach the LM head
    flat_hidden, flat_targets = hidden[rows, cols], targets[rows, cols]  # [n, H], [n]

    lm_head = extract_model_from_parallel(model).get_output_embeddings()
    vocab = lm_head.weight.shape[0]
    chunk = max(1, chunk_elements // vocab)
    pieces = []
    with torch.autocast(device.type, **mixed):
        for start in range(0, flat_targets.numel(), chunk):
            args = (
                lm_head,
                flat_hidden[start : start + chunk],
                flat_targets[start : start + chunk],
                temperature,
                want_entropy,
            )
            if torch.is_grad_enabled() and flat_targets.numel() > chunk:
                pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
            else:
                pieces.append(_chunk_logprobs(*args))
    logprobs = torch.zeros(len(sequences), longest, device=device)  # [B, C]
    entropy = torch.zeros(len(sequences), longest, device=device)  # [B, C]
    if pieces:
        logprobs = logprobs.index_put((rows, cols), torch.cat([p[0] for p in pieces]))
        entropy = entropy.index_put((rows, cols), torch.cat([p[1] for p in pieces]).detach())
    return logprobs, entropy
