"""Choosing tokens from decoder logits, as the official ``sample_with_strategies`` does (spec §5.4 step 5)."""

from __future__ import annotations

import torch

GREEDY_TEMPERATURE = 1e-5  # temperatures below this decode greedily


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Penalise every id in ``history`` ``(B, H)`` at every position of ``logits`` ``(B, L, V)``.

    Positive logits are divided by ``penalty``, negative ones multiplied (CTRL-style); ids inside the
    current block are not penalised. Returns a new tensor (the official code edits in place).
    """
    if history is None or history.shape[1] == 0 or penalty == 1.0:
        return logits
    seen = torch.zeros(logits.shape[0], logits.shape[-1], dtype=torch.bool, device=logits.device)
    seen.scatter_(1, history, True)
    seen = seen[:, None, :]  # (B, 1, V)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask logits ``(N, V)`` outside the top-k and the top-p nucleus to -inf (ties at the k-th kept)."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def select_tokens(
    logits: torch.Tensor,
    history: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = 50,
    top_p: float | None = 0.9,
    repetition_penalty: float = 1.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token ids ``(B, L)`` from logits ``(B, L, V)``; greedy when ``temperature < 1e-5``.

    The repetition penalty applies in greedy mode too (official behaviour, spec §7.12).
    """
    bsz, length, vocab = logits.shape
    logits = torch.nan_to_num(logits, nan=0.0, posinf=1e4, neginf=-1e4)
    logits = apply_repetition_penalty(logits, history, repetition_penalty)
    if temperature < GREEDY_TEMPERATURE:
        return logits.argmax(-1)
    flat = filter_top_k_top_p(logits.reshape(-1, vocab) / temperature, top_k, top_p)
    probs = torch.nan_to_num(flat.softmax(-1), nan=1.0 / vocab)
    return torch.multinomial(probs, 1, generator=generator).view(bsz, length)
