"""The per-layer retriever: f_q and f_k projectors, mean-of-sigmoid scoring, top-K0 selection, BCE loss.

score_j = mean_i sigmoid(f_q(RMSNorm_in(h_i)) . key_j) over the query tokens i, key_j = f_k(RMSNorm_in(row_j)) computed
once when row j enters the long-term memory (as officially). No temperature, no 1/sqrt(s).
"""

from __future__ import annotations

import torch
from torch import nn

# Keys are scanned in blocks so that scoring never materialises an [n, M] matrix for the whole store. A block's
# scores should stay cache-sized on CPU (measured at the mid shape: 2 MB blocks score 1.4-2.6x faster than 16 MB
# ones); on GPU, bigger blocks keep the GEMMs large.
SCORE_BLOCK_BYTES = {"cpu": 2 << 20, "cuda": 256 << 20}


def projector(hidden_size: int, width: int, num_layers: int) -> nn.Sequential:
    """Linear(d, 2s) - SiLU - Linear(2s, s) (official `get_projector`), or Linear(d, s) for one layer."""
    if num_layers == 1:
        return nn.Sequential(nn.Linear(hidden_size, width, bias=False))
    if num_layers != 2:
        raise ValueError(f"num_selector_layers must be 1 or 2, got {num_layers}")
    return nn.Sequential(nn.Linear(hidden_size, 2 * width, bias=False), nn.SiLU(),
                         nn.Linear(2 * width, width, bias=False))


class Retriever(nn.Module):
    """f_q (query_proj), f_k (key_proj) and optionally f_q^enc (encoder_query_proj) of one layer."""

    def __init__(self, hidden_size: int, width: int, num_layers: int = 2, encoder_query: bool = False):
        super().__init__()
        self.query_proj = projector(hidden_size, width, num_layers)
        self.key_proj = projector(hidden_size, width, num_layers)
        self.encoder_query_proj = projector(hidden_size, width, num_layers) if encoder_query else None


def mean_sigmoid_scores(queries: torch.Tensor, keys: torch.Tensor, block_rows: int | None = None
                        ) -> torch.Tensor:
    """[B, n, s] queries x [M, s] keys -> [B, M] scores = mean over n of sigmoid(q . k), memory linear in M."""
    B, n, _ = queries.shape
    if block_rows is None:
        budget = SCORE_BLOCK_BYTES.get(queries.device.type, SCORE_BLOCK_BYTES["cpu"])
        block_rows = max(256, budget // (B * n * queries.element_size()))
    out = queries.new_empty(B, keys.shape[0])
    q_t = queries.transpose(1, 2)                                # [B, s, n]
    for start in range(0, keys.shape[0], block_rows):
        block = keys[start:start + block_rows]
        logits = torch.matmul(block, q_t)                        # [B, m, n]: the mean runs over the contiguous dim
        out[:, start:start + block.shape[0]] = torch.sigmoid_(logits).mean(dim=2)
    return out


def select_oldest_first(scores: torch.Tensor, ages: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k rows by score per batch row ([B, M] -> [B, min(k, M)] indices), ordered oldest (largest age) first.

    Ties in age keep the official order: indices sorted ascending, then a reversed stable argsort of the ages.
    Fewer than k stored rows: all of them (the official code repeats rows to fill k; we do not).
    """
    m = min(k, scores.shape[1])
    if m == scores.shape[1]:
        idx = torch.arange(m, device=scores.device).expand(scores.shape[0], m)
    else:
        idx = torch.topk(scores, m, dim=1).indices.sort(dim=1).values
    order = torch.argsort(ages[idx], dim=1, stable=True).flip(1)
    return torch.gather(idx, 1, order)


def retriever_bce_loss(scores: torch.Tensor, labels: torch.Tensor, negative_weight: float = 1.0,
                       eps: float = 1e-5) -> torch.Tensor:
    """Class-balanced BCE of the official retriever training: (L_pos + lambda L_neg) / (1 + lambda).

    L_pos = mean over positives of -log(w + eps), L_neg = mean over negatives of -log(1 - w + eps). A class with no
    members contributes 0 (the official code would produce NaN).
    """
    labels = labels.bool()
    zero = scores.sum() * 0
    pos = -torch.log(scores[labels] + eps).mean() if labels.any() else zero
    neg = -torch.log(1 - scores[~labels] + eps).mean() if (~labels).any() else zero
    return (pos + negative_weight * neg) / (1 + negative_weight)
