"""The token-by-token decode loop shared by `MPlus.generate` (reads through memory) and the evaluations' plain-window
baseline (the backbone alone): both pre-fill their own cache, then hand this loop the first logits and a step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def pick_token(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids [B] from logits [B, V]: the argmax, or a draw from softmax(logits / temperature) over the top k."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[:, 0]


def decode_loop(logits: torch.Tensor, step: Callable[[torch.Tensor, int], torch.Tensor], max_new_tokens: int, *,
                stop_ids: Sequence[int] = (), pick: Callable[[torch.Tensor], torch.Tensor] = pick_token
                ) -> torch.Tensor:
    """New ids [B, t <= max_new_tokens], one per loop turn.

    Args:
        logits: [B, V] for the first new token (the pre-fill's last position).
        step: `step(tokens [B, 1], i)` feeds the i-th new token (0-based) through the model and returns the logits
            [B, V] for the next one; it is not called after the last token.
        stop_ids: a row that emits any of them is finished and repeats `stop_ids[0]` from then on; the loop stops
            once every row is finished. Empty: always `max_new_tokens` tokens.
        pick: logits [B, V] -> ids [B] (default greedy).
    """
    batch = logits.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=logits.device)
    out: list[torch.Tensor] = []
    for i in range(max_new_tokens):
        token = pick(logits)
        if len(stop_ids):
            token = torch.where(finished, torch.full_like(token, stop_ids[0]), token)
            finished |= torch.isin(token, stops)
        out.append(token[:, None])
        if i == max_new_tokens - 1 or (len(stop_ids) and bool(finished.all())):
            break
        logits = step(token[:, None], i)
    if not out:
        return torch.empty(batch, 0, dtype=torch.long, device=logits.device)
    return torch.cat(out, dim=1)
