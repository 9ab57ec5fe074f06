"""Scorers: token id sequences in, per-position next-token statistics out.

One narrow interface, two backends chosen by name (`rptdata.engine_choice`) and imported lazily
(`import rptdata` never needs vLLM):

    scorer = load_scorer("hf", "smollm2-135m", dtype="auto", device="auto", top_k=16)
    for i, scores in scorer.score(sequences, firsts):   # any order; every i exactly once
        scores.entropy[j]  # position firsts[i] + j of sequences[i]

`HFScorer` (hf.py) runs transformers, `VLLMScorer` (vllm.py) vLLM's prompt log-probabilities.
(The generators of `rpt train`/`probe`/`eval` are `rpttrain.rollout`'s engines.)

For a sequence `seq` (a list/array of token ids) and its `first`, the scorer scores every
position j in [first, len(seq)): context seq[:j], target seq[j]. `PositionScores` holds, per
scored position: the top-k entropy, the target's log-probability and rank, the top-1 id, and
the top-k ids and log-probabilities (full-softmax log-probabilities, best first).

The entropy math lives here once (`topk_entropy`, `entropy_from_logits`), so both scorers and
the tests share it:

    full-softmax:  H = -sum_{i<=k} p_i log p_i,  p_i = softmax(logits)_i over the whole vocabulary
    renormalized:  H = -sum_{i<=k} q_i log q_i,  q_i = p_i / sum_{j<=k} p_j        (0 <= H <= log k)

Left out on purpose: scoring with a BOS token prepended (documents are scored as prepared), and
any sampling; scorers only read log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from rptdata.engine_choice import choose_engine

MAX_CONTEXT_CAP = 2048  # default window: the model's max positions, capped here
ENTROPY_MODES = ("full-softmax", "renormalized")


@dataclass
class PositionScores:
    """Per-position arrays for the scored positions of one sequence (length m each)."""

    entropy: np.ndarray  # float32 [m]
    target_logprob: np.ndarray  # float32 [m]
    target_rank: np.ndarray  # int32 [m], 1 = the model's top choice
    top1_id: np.ndarray  # int32 [m]
    topk_ids: np.ndarray  # int32 [m, k], best first
    topk_logprobs: np.ndarray  # float32 [m, k], full-softmax log-probabilities

    def __len__(self) -> int:
        return len(self.entropy)


class Scorer(Protocol):
    name: str  # "hf" | "vllm"
    dtype: str  # e.g. "float32", as recorded in manifests
    max_positions: int | None  # the model's longest sequence, if known
    top_k: int
    entropy: str  # one of ENTROPY_MODES

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        firsts: Sequence[int],
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, PositionScores]]:
        """Yield (index, scores) for every sequence, in any order; `progress(n)` after n positions."""
        ...


# ---------------------------------------------------------------------------------------------
# entropy math (torch; shared by both scorers)


def topk_entropy(topk_logprobs, mode: str = "full-softmax"):
    """Entropy of the top-k distribution from its full-softmax log-probabilities [..., k].

    >>> import math, torch
    >>> lp = torch.log(torch.tensor([0.5, 0.3]))       # top-2 of [0.5, 0.3, 0.2]
    >>> round(float(topk_entropy(lp)), 4)               # -(.5 ln .5 + .3 ln .3)
    0.7078
    >>> round(float(topk_entropy(lp, "renormalized")), 4)  # q = (.625, .375)
    0.6616
    """
    import torch

    lp = topk_logprobs.float()
    if mode == "full-softmax":
        return -(lp.exp() * lp).sum(-1)
    if mode == "renormalized":
        q = torch.log_softmax(lp, dim=-1)
        return -(q.exp() * q).sum(-1)
    raise ValueError(f"entropy mode must be one of {', '.join(ENTROPY_MODES)}, not {mode!r}")


def entropy_from_logits(logits, k: int = 16, mode: str = "full-softmax"):
    """Top-k entropy of next-token logits [..., V] (float32 math; k is capped at V).

    >>> import torch
    >>> round(float(entropy_from_logits(torch.zeros(4), k=2)), 4)  # p = (.25, .25): log 2
    0.6931
    """
    import torch

    logits = logits.float()
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).values
    return topk_entropy(top - torch.logsumexp(logits, dim=-1, keepdim=True), mode)


# ---------------------------------------------------------------------------------------------
# batching (pure)


def plan_token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Length-sorted batches within a padded-token budget: lists of indices into `lengths`.

    Longest first; a batch holds as many sequences as fit in `batch_tokens` once padded to its
    longest member (always at least one, so a sequence longer than the budget goes alone).
    Ties keep their input order, so the plan is deterministic.

    >>> plan_token_batches([3, 10, 4, 9], batch_tokens=20)
    [[1, 3], [2, 0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


# ---------------------------------------------------------------------------------------------
# loading a scorer


def load_scorer(
    name: str,
    model: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    top_k: int = 16,
    entropy: str = "full-softmax",
    batch_tokens: int | None = None,
    max_context: int | None = None,
    trust_remote_code: bool = False,
) -> Scorer:
    """Build the named scorer (`--engine` auto/hf/vllm, resolved here); model loading happens now."""
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"--entropy must be one of {', '.join(ENTROPY_MODES)}, not {entropy!r}")
    name = choose_engine(name, device)
    if name == "hf":
        from rptdata.scorers.hf import HFScorer

        return HFScorer(model, dtype=dtype, device=device, top_k=top_k, entropy=entropy,
                        batch_tokens=batch_tokens, trust_remote_code=trust_remote_code)
    from rptdata.scorers.vllm import VLLMScorer

    return VLLMScorer(model, dtype=dtype, top_k=top_k, entropy=entropy, batch_tokens=batch_tokens,
                      max_context=max_context, trust_remote_code=trust_remote_code)
