"""RMT (Reinforcement Mid-Training, arXiv 2509.24375) as options of the `rpt` objective: the
length budget, its reward, the prompt that states it, and the next-token term on the batch's
contexts. `--objective rmt` turns them on with the paper's values (`rpttrain.config.RMT_PRESET`); the
easy-to-hard curriculum is `rpttrain.curriculum`. docs/family.md (RMT) says where we chose.

    length_budget(step, steps, 800, 1, 0.2)        # B_t = max(B_min, floor(B_0 * gamma ** (t / T)))
    length_reward(length, budget)                  # r_len: triangular, 1 at the budget, 0 at 2 * budget
    mixed_reward(reward, length, budget, w)        # (1 - w) * reward + w * r_len
    budget_format(fmt, budget)                     # the prompt format with the budget stated in it
    context_ntp_backward(...)                      # lambda * next-token loss on the contexts, backward

Left out on purpose: the paper's reasoning length is counted inside <think></think>; rpt's formats
have no think tags, so the length is the whole completion's, in tokens (the boxed answer adds a
few). The raw `continuation` format cannot state a budget and is refused with one
(`rpttrain.config`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from rpttrain.batching import last_positions_logits, left_pad, plan_batches
from rpttrain.objectives import algos
from rpttrain.prompts import PromptFormat, build_prompt_ids, load_prompt_format

BUDGET_LINE = "Please use exactly {budget} tokens to reason before your final answer."


def length_budget(step: int, steps: int, initial: int, minimum: int, decay: float) -> int:
    """The token budget at 0-based step `step` of a `steps`-step run:
    B_t = max(B_min, floor(B_0 * gamma ** (t / T))).

    >>> [length_budget(t, 4, 800, 1, 0.2) for t in range(4)]
    [800, 534, 357, 239]
    >>> length_budget(3, 4, 10, 5, 0.01)
    5
    """
    return max(minimum, math.floor(initial * decay ** (step / steps)))


def length_reward(length: int, budget: int) -> float:
    """r_len(l; B): rises linearly from 0 at l = 0 to 1 at the budget, falls linearly to 0 at
    2 * budget, and is 0 beyond.

    >>> [length_reward(n, 4) for n in (0, 2, 4, 6, 8, 9)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    if budget < 1:
        raise ValueError(f"budget must be at least 1, not {budget}")
    if length <= budget:
        return max(length, 0) / budget
    return max(0.0, (2 * budget - length) / budget)


def mixed_reward(reward: float, length: int, budget: int, weight: float) -> float:
    """(1 - w) * reward + w * r_len(length; budget): the paper's r = (1 - w) * r_pos + w * r_len,
    with rpt's --reward in place of the exact-match r_pos.

    >>> mixed_reward(1.0, 4, 4, 0.2), mixed_reward(0.0, 4, 4, 0.2), mixed_reward(1.0, 8, 4, 0.2)
    (1.0, 0.2, 0.8)
    """
    return (1.0 - weight) * reward + weight * length_reward(length, budget)


def budget_format(fmt: PromptFormat, budget: int) -> PromptFormat:
    """`fmt` with the budget stated at the end of its user message (the paper injects "use exactly
    B_t tokens" into the prompt); the extraction is unchanged.

    >>> f = budget_format(load_prompt_format("v0"), 12)
    >>> f.user_template.endswith("Please use exactly 12 tokens to reason before your final answer.")
    True
    """
    if not fmt.uses_chat or fmt.user_template is None:
        raise ValueError(f"prompt format {fmt.name!r} is raw text: it cannot state a length budget")
    return dataclasses.replace(fmt, user_template=fmt.user_template + "\n\n" + BUDGET_LINE.format(budget=budget))


RAW = load_prompt_format("continuation")


def context_ntp_backward(
    model, tokenizer, contexts: list[str], weight: float, max_tokens: int, micro_batch_tokens: int, precision
) -> dict:
    """Accumulate the gradient of weight * (mean next-token cross-entropy over every position of
    `contexts`), each the raw text's last `max_tokens` tokens (the `continuation` format's prompt),
    by micro-batches of at most `micro_batch_tokens` padded tokens. Returns the weighted loss,
    the positions trained and the tokens run forward and backward (for the FLOPs)."""
    seqs = [build_prompt_ids(RAW, c, tokenizer, max_tokens) for c in contexts]
    seqs = [s for s in seqs if len(s) >= 2]  # a one-token context predicts nothing
    positions = sum(len(s) - 1 for s in seqs)
    out = {"ntp_loss": 0.0, "ntp_positions": positions, "ntp_tokens": 0}
    if not positions:
        return out
    for mb in plan_batches([len(s) for s in seqs], max_tokens=micro_batch_tokens):
        batch = [seqs[i] for i in mb]
        width = max(len(s) for s in batch)
        with precision.autocast():
            logits = last_positions_logits(model, batch, k=width)[:, :-1]  # column j predicts token j + 1
        targets = left_pad(batch)[0][:, 1:].to(logits.device)
        mask = torch.zeros(len(batch), width - 1, dtype=torch.bool)
        for i, s in enumerate(batch):
            mask[i, width - len(s) :] = True  # left-padded: a sequence's real targets are its last len - 1
        mask = mask.to(logits.device)
        loss = weight * algos.shaped_ntp_loss(logits[mask], targets[mask]).sum() / positions
        loss.backward()
        out["ntp_loss"] += float(loss.detach())
        out["ntp_tokens"] += sum(len(s) for s in batch)
    return out
