"""Scorers: token id sequences in, per-position next-token statistics out.

One narrow interface, two backends chosen by name (`rptdata.engine_choice`) and imported lazily
(`import rptdata` never needs vLLM):

    scorer = load_scorer("hf", "smollm2-135m", dtype="auto", device="auto", top_k=16)
    for i, scores in scorer.score(sequences, firsts):   # any order; every i exactly once
        scores.entropy[j]  # position firsts[i] + j of sequences[i]

`HFScorer` (hf.py) runs transformers, `VLLMScorer` (vllm.py) vLLM's prompt log-probabilities.
(The generators of `rpt train`/`probe`/`eval` are `rpttrain.rollout`'s engines.)

For a sequence `seq` (a list/array of token ids) and its `first`, the scorer scores every
position j in [first, len(seq)): context seq[:j], target seq[j]. A scorer that can carry a
key/value cache (`scorer.carries_kv`, the transformers scorer) also scores whole long documents
in consecutive chunks, each token through the model once (`plan_chunks`):

    for i, scores in scorer.score_carried(documents, chunk=1024, max_context=2048, first_end=2048):
        scores.entropy[j]  # position min_context + j of documents[i]

`PositionScores` holds, per
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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from rptdata.engine_choice import choose_engine
from rptdata.errors import BadOption

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

    # optional, where `carries_kv` is True:
    # score_carried(documents, *, chunk, max_context, min_context=1, first_end=None, progress=None)


def check_first(sequence: Sequence[int], first: int) -> None:
    """`Scorer.score`'s contract: a sequence's first scored position has context and a target."""
    n = len(sequence)
    if not 1 <= first < n:
        raise ValueError(f"first scored position {first} must be in 1..{n - 1} for a sequence of {n}")


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
    raise BadOption(f"entropy mode must be one of {', '.join(ENTROPY_MODES)}, not {mode!r}")


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


class Chunk(NamedTuple):
    """One forward of a document scored with a carried key/value cache: positions [first, end)
    are scored, and their context begins at token `start` (tokens before `first - 1` come from
    the cache, so each token goes through the model once)."""

    start: int
    first: int
    end: int


def plan_chunks(
    n_tokens: int, chunk: int, max_context: int, min_context: int = 1, first_end: int | None = None
) -> list[Chunk]:
    """Consecutive chunks over positions [min_context, n_tokens) for key/value-carry scoring.

    The first chunk scores positions up to `first_end` (default `chunk`), each later one `chunk`
    more. Before a chunk the cache is cut to the tokens from `start = nominal_end - max_context`
    on, where nominal_end is where the chunk would end in a long enough document; so a position
    never sees more than max_context - 1 tokens of context, later chunks see at least
    max_context - chunk, and the plan of a document depends only on its own length. With
    first_end = max_context and chunk = max_context - overlap, a chunk covers the positions of
    the matching `plan_windows` window with the same context start (the windows' last one is
    shifted back, the chunks' is not).

    >>> plan_chunks(10, chunk=2, max_context=4, first_end=4)
    [Chunk(start=0, first=1, end=4), Chunk(start=2, first=4, end=6), Chunk(start=4, first=6, end=8), Chunk(start=6, first=8, end=10)]
    >>> plan_chunks(9, chunk=4, max_context=64)  # context never cut: every position sees its whole prefix
    [Chunk(start=0, first=1, end=4), Chunk(start=0, first=4, end=8), Chunk(start=0, first=8, end=9)]
    """
    first_end = chunk if first_end is None else first_end
    if not 1 <= min_context < first_end <= max_context or not 1 <= chunk <= max_context - min_context:
        raise ValueError(
            f"need 1 <= min_context ({min_context}) < first_end ({first_end}) <= max_context ({max_context}) "
            f"and 1 <= chunk ({chunk}) <= max_context - min_context"
        )
    chunks: list[Chunk] = []
    first, nominal_end = min_context, first_end
    while first < n_tokens:
        chunks.append(Chunk(max(0, nominal_end - max_context), first, min(n_tokens, nominal_end)))
        first, nominal_end = nominal_end, nominal_end + chunk
    return chunks


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
        raise BadOption(f"--entropy must be one of {', '.join(ENTROPY_MODES)}, not {entropy!r}")
    name = choose_engine(name, device)
    if name == "hf":
        from rptdata.scorers.hf import HFScorer

        return HFScorer(
            model,
            dtype=dtype,
            device=device,
            top_k=top_k,
            entropy=entropy,
            batch_tokens=batch_tokens,
            trust_remote_code=trust_remote_code,
        )
    from rptdata.scorers.vllm import VLLMScorer

    return VLLMScorer(
        model,
        dtype=dtype,
        top_k=top_k,
        entropy=entropy,
        batch_tokens=batch_tokens,
        max_context=max_context,
        trust_remote_code=trust_remote_code,
    )


RUNTIME_KEYS = ("batch_tokens", "device")  # what `scorer_runtime` reports


def scorer_runtime(scorer) -> dict:
    """The settings a shard was scored with that are not part of the run's identity, as the scorer
    resolved them where it ran (here or in a Ray actor): `batch_tokens` (None: default), and
    `device` as its type ("cuda", "cpu": the GPU index is the process's, not the run's)."""
    device = getattr(scorer, "device", None)
    return {"batch_tokens": getattr(scorer, "batch_tokens", None), "device": device and str(device).split(":")[0]}
