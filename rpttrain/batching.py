"""Model inputs for the trainer, the rollout engine and eval: left padding and the forward pass
that keeps only each sequence's last k positions. The micro-batch planner they all use is
`rptdata.batching.plan_batches` (the scorer uses it too).

    ids, attention, positions = left_pad([[5, 6, 7], [8]])
    logits = last_positions_logits(model, [[5, 6, 7], [8]], k=1)    # [2, 1, V]: each one's next token

Left padding puts every sequence's end in the last column, so `logits_to_keep=k` gives each
sequence's last k positions with one LM-head call over N x k rows instead of N x width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rptdata.batching import plan_batches

__all__ = ["left_pad", "last_positions_logits", "plan_batches"]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask, position_ids), all [N, width].

    Position ids restart at 0 on each sequence's first real token.

    >>> ids, attention, positions = left_pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), attention.tolist(), positions.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]], [[0, 1, 2], [0, 0, 0]])
    """
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        input_ids[i, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        attention[i, width - len(seq) :] = 1
    return input_ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)


def last_positions_logits(model, seqs: Sequence[Sequence[int]], k: int, pad_id: int = 0) -> torch.Tensor:
    """Logits [N, k, V] of each sequence's last k positions (column j predicts the token after
    position width - k + j), from one left-padded forward on the model's device."""
    device = next(model.parameters()).device
    ids, attention, positions = left_pad(seqs, pad_id)
    out = model(
        input_ids=ids.to(device),
        attention_mask=attention.to(device),
        position_ids=positions.to(device),
        logits_to_keep=k,
    )
    return out.logits
