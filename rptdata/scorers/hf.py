"""The transformers scorer (CPU or GPU): batched forward passes, top-k per chunk of rows.

Per batch (length-sorted, padded on the right to its longest sequence, at most `batch_tokens`
padded tokens): run the model body once under `torch.inference_mode`, gather the hidden states
of the positions being scored (padding and unscored context rows never reach the LM head), then
apply the LM head to chunks of those rows. For each chunk, in float32: logsumexp over the
vocabulary, top-k of the logits minus the logsumexp (the top-k log-probabilities), the target's
logit and its rank (1 + the number of tokens with a strictly larger logit). So no full-vocabulary
softmax is ever materialized for a whole batch, and the cost on top of the forward pass is the
head over the scored rows plus a few reductions.

Models whose logits are not simply `lm_head(last_hidden_state)` (soft-capping, a logit scale)
are handled for the known cases; a self-check at load time compares with the model's own
forward and falls back to full-forward logits (gathered the same way) when they disagree.

Long documents (`score_carried`): the stage sends documents longer than the window here. They
are scored in consecutive chunks (`plan_chunks`) that carry the previous chunks' key/value cache
(a transformers `DynamicCache`, cut from the left to the last tokens the next chunk may see), so
every token goes through the model once instead of about twice with half-overlapping windows.
Documents of similar length run side by side; a row leaves the batch (and the cache) after its
last chunk. Position ids are absolute, so a document longer than the model's max positions goes
back to windows (the stage decides). The cache is handled through `DynamicCache.layers[i].keys /
.values` ([batch, heads, seq, head_dim]) and the body's `cache=` argument, as in transformers
5.24.0; a model whose cache is not made of plain `DynamicLayer`s (sliding-window or linear
attention layers) or an older transformers without that API gets `carries_kv = False`.

Left out on purpose: packing several documents into one row (needs per-document attention
masks); tensor/pipeline parallelism (use vLLM for big proxies).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from rptdata.batching import plan_batches
from rptdata.errors import BadOption
from rptdata.models import load_causal_lm, resolve_device
from rptdata.scorers import PositionScores, check_first, plan_chunks, topk_entropy

log = logging.getLogger(__name__)


class HFScorer:
    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        top_k: int = 16,
        entropy: str = "full-softmax",
        batch_tokens: int | None = None,
        trust_remote_code: bool = False,
    ):
        import torch

        self.device = resolve_device(device)
        if self.device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
            self.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        self.model = load_causal_lm(model, dtype=dtype, device=self.device, trust_remote_code=trust_remote_code)
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        on_gpu = self.device.startswith("cuda")
        self.batch_tokens = batch_tokens or (65536 if on_gpu else 8192)
        self.entropy = entropy
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._head = self.model.get_output_embeddings()
        self.vocab_size = int(self._head.out_features if self._head is not None else self.model.config.vocab_size)
        self.top_k = min(top_k, self.vocab_size)
        # rows per LM-head chunk: 128 MB of float32 logits on CPU (682 rows of a 49k vocabulary;
        # 341-row chunks made the head ~20% slower there, 1,365 rows cost 0.5 GB more RSS), 1 GB on a GPU
        self.chunk_rows = max(1, (2**28 if on_gpu else 2**25) // self.vocab_size)
        self._body = self.model.get_decoder() if self._head is not None else None
        if self._body is not None and not self._head_matches_forward():
            log.warning("%s: lm_head(body) differs from the model's logits; using full-forward logits", model)
            self._body = None
        if self._body is None:  # whole-batch logits: keep them to about 1 GB
            self.batch_tokens = min(self.batch_tokens, max(1, 2**28 // self.vocab_size))
        self._torch = torch
        self.carries_kv = (
            self._body is not None
            and kv_carry_supported(self.model.config)
            and "cache" in inspect.signature(self._body.forward).parameters
        )

    # -- logits ---------------------------------------------------------------------------------
    def _logits_from_hidden(self, hidden):
        logits = self._head(hidden)
        cfg = self.model.config
        scale = getattr(cfg, "logit_scale", None)
        if scale:
            logits = logits * scale
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = (logits / cap).tanh() * cap
        return logits

    def _head_matches_forward(self) -> bool:
        import torch

        ids = torch.arange(1, 9, device=self.device).unsqueeze(0) % self.vocab_size
        with torch.inference_mode():
            full = self.model(input_ids=ids, use_cache=False).logits.float()
            try:
                hidden = self._body(input_ids=ids, use_cache=False).last_hidden_state
                mine = self._logits_from_hidden(hidden).float()
            except (AttributeError, TypeError, RuntimeError):  # not a plain body + head model
                return False
        return mine.shape == full.shape and bool((full - mine).abs().max() <= 1e-3 * (1 + full.abs().max()))

    # -- the interface -------------------------------------------------------------------------
    def score(
        self,
        sequences: Sequence[Sequence[int]],
        firsts: Sequence[int],
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, PositionScores]]:
        for s, f in zip(sequences, firsts):
            check_first(s, f)
        input_lengths = [len(s) - 1 for s in sequences]
        for batch in plan_batches(input_lengths, max_tokens=self.batch_tokens):
            results = self._score_batch([sequences[i] for i in batch], [firsts[i] for i in batch])
            yield from zip(batch, results)
            if progress is not None:
                progress(sum(len(r) for r in results))

    def _score_batch(self, seqs: list, firsts: list) -> list[PositionScores]:
        torch = self._torch
        n, width = len(seqs), max(len(s) - 1 for s in seqs)
        ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        rows, targets, counts = [], [], []
        for b, (s, f) in enumerate(zip(seqs, firsts)):
            s = np.asarray(s, dtype=np.int64)
            length = len(s) - 1
            ids[b, :length] = s[:-1]
            mask[b, :length] = 1
            rows.append(b * width + np.arange(f - 1, length))  # hidden state j-1 predicts token j
            targets.append(s[f:])
            counts.append(length + 1 - f)
        rows_t = torch.from_numpy(np.concatenate(rows)).to(self.device)
        targets_t = torch.from_numpy(np.concatenate(targets)).to(self.device)
        ragged = bool((mask == 0).any())

        with torch.inference_mode():
            input_ids = torch.from_numpy(ids).to(self.device)
            attention_mask = torch.from_numpy(mask).to(self.device) if ragged else None
            if self._body is not None:
                hidden = self._body(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                ).last_hidden_state
                hidden = hidden.reshape(n * width, -1).index_select(0, rows_t)
                stats = self._head_stats(hidden, targets_t, self._logits_from_hidden)
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                hidden = logits.reshape(n * width, -1).index_select(0, rows_t)
                stats = self._head_stats(hidden, targets_t, None)
        return _split_scores(stats, counts)

    def score_carried(
        self,
        documents: Sequence[Sequence[int]],
        *,
        chunk: int,
        max_context: int,
        min_context: int = 1,
        first_end: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, PositionScores]]:
        """Score positions [min_context, n) of each document in `plan_chunks` chunks, carrying the
        key/value cache between them; yield (index, scores) for every document with a position."""
        if not self.carries_kv:
            raise BadOption("this model's cache cannot be carried between chunks; score it in windows")
        plans = [plan_chunks(len(d), chunk, max_context, min_context, first_end) for d in documents]
        order = sorted((i for i in range(len(documents)) if plans[i]), key=lambda i: (-len(documents[i]), i))
        rows = max(1, self.batch_tokens // (first_end or chunk))  # the first chunk is the widest
        for b in range(0, len(order), rows):
            yield from self._score_carried_group(order[b : b + rows], documents, plans, progress)

    def _score_carried_group(self, group: list, documents, plans, progress):
        """One batch of documents in lockstep: chunk k of every row shares its start and first
        position (the plans depend only on the lengths), so the cache rows stay aligned; a row
        whose last chunk is shorter is padded on the right and leaves the batch after it."""
        torch = self._torch
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        alive, parts, k, cached_from = list(group), {i: [] for i in group}, 0, 0
        with torch.inference_mode():
            while alive:
                c = plans[alive[0]][k]
                lo = 0 if k == 0 else c.first - 1  # first input token of this chunk
                ends = [plans[i][k].end for i in alive]
                width = max(ends) - 1 - lo
                ids = np.zeros((len(alive), width), dtype=np.int64)
                rows, targets, counts = [], [], []
                for r, (i, end) in enumerate(zip(alive, ends)):
                    doc = np.asarray(documents[i], dtype=np.int64)
                    ids[r, : end - 1 - lo] = doc[lo : end - 1]
                    rows.append(r * width + np.arange(c.first - 1 - lo, end - 1 - lo))  # hidden j-1 predicts j
                    targets.append(doc[c.first : end])
                    counts.append(end - c.first)
                _trim_cache(cache, keep=lo - c.start, drop_front=c.start - cached_from)
                cached_from = c.start
                positions = torch.arange(lo, lo + width, device=self.device).unsqueeze(0).expand(len(alive), -1)
                hidden = self._body(
                    input_ids=torch.from_numpy(ids).to(self.device), position_ids=positions, cache=cache, use_cache=True
                ).last_hidden_state
                hidden = hidden.reshape(len(alive) * width, -1).index_select(
                    0, torch.from_numpy(np.concatenate(rows)).to(self.device)
                )
                stats = self._head_stats(
                    hidden, torch.from_numpy(np.concatenate(targets)).to(self.device), self._logits_from_hidden
                )
                for i, scores in zip(alive, _split_scores(stats, counts)):
                    parts[i].append(scores)
                if progress is not None:
                    progress(int(sum(counts)))
                nxt = [r for r, i in enumerate(alive) if len(plans[i]) > k + 1]
                for i in alive:
                    if len(plans[i]) == k + 1:
                        yield i, _concat_scores(parts.pop(i))
                if nxt and len(nxt) < len(alive):
                    _trim_cache(cache, rows=torch.tensor(nxt, device=self.device))
                alive = [alive[r] for r in nxt]
                k += 1

    def _head_stats(self, hidden, targets, to_logits) -> list[np.ndarray]:
        """The LM head (when `to_logits`) and `_chunk_stats` over the gathered rows, a chunk of rows
        at a time: entropy, target log-prob, rank, top-k ids, top-k log-probs (numpy)."""
        torch = self._torch
        parts = []
        for c in range(0, hidden.shape[0], self.chunk_rows):
            rows = hidden[c : c + self.chunk_rows]
            logits = (to_logits(rows) if to_logits else rows).float()
            parts.append(self._chunk_stats(logits, targets[c : c + self.chunk_rows]))
        return [torch.cat(cols).cpu().numpy() for cols in zip(*parts)]

    def _chunk_stats(self, logits, targets):
        """float32 logits [r, V], targets [r] -> entropy, target logprob, rank, top-k ids, top-k logprobs."""
        torch = self._torch
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        top_values, top_ids = logits.topk(self.top_k, dim=-1)
        target_logit = logits.gather(1, targets.unsqueeze(1))
        # When the target reaches the k-th logit, every strictly larger logit is in the top-k, so
        # the top-k values give the exact rank; only the other rows need a full-vocabulary count.
        rank = (top_values > target_logit).sum(-1, dtype=torch.int32) + 1
        outside = (target_logit.squeeze(1) < top_values[:, -1]).nonzero().squeeze(1)
        if outside.numel():
            larger = logits.index_select(0, outside) > target_logit.index_select(0, outside)
            rank[outside] = larger.sum(-1, dtype=torch.int32) + 1
        topk_lp = top_values - lse
        return topk_entropy(topk_lp, self.entropy), (target_logit - lse).squeeze(1), rank, top_ids, topk_lp


def _split_scores(stats: list[np.ndarray], counts: list[int]) -> list[PositionScores]:
    """Cut the stacked per-row statistics back into one PositionScores per sequence."""
    entropy, target_lp, rank, topk_ids, topk_lp = stats
    out, start = [], 0
    for count in counts:
        sl = slice(start, start + count)
        out.append(
            PositionScores(
                entropy=entropy[sl].astype(np.float32),
                target_logprob=target_lp[sl].astype(np.float32),
                target_rank=rank[sl].astype(np.int32),
                top1_id=topk_ids[sl, 0].astype(np.int32),
                topk_ids=topk_ids[sl].astype(np.int32),
                topk_logprobs=topk_lp[sl].astype(np.float32),
            )
        )
        start += count
    return out


def kv_carry_supported(config) -> bool:
    """True when a transformers DynamicCache for this model config is made of plain DynamicLayers
    (cut from the left by `_trim_cache`); False for sliding-window or linear-attention layers and
    for transformers versions without `DynamicCache(config=...).layers` (before 5.x)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = DynamicCache(config=config).layers
    except (ImportError, TypeError, AttributeError, ValueError):
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _concat_scores(parts: list[PositionScores]) -> PositionScores:
    if len(parts) == 1:
        return parts[0]
    return PositionScores(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("entropy", "target_logprob", "target_rank", "top1_id", "topk_ids", "topk_logprobs")
        )
    )


def _trim_cache(cache, keep: int | None = None, drop_front: int = 0, rows=None) -> None:
    """Cut a DynamicCache in place: drop its first `drop_front` tokens (so that `keep` remain,
    checked), and/or keep only the batch `rows`. Each layer holds keys and values as
    [batch, heads, seq, head_dim] (transformers 5.24.0 `DynamicLayer`)."""
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        if drop_front:
            layer.keys, layer.values = layer.keys[:, :, drop_front:], layer.values[:, :, drop_front:]
        if keep is not None and layer.keys.shape[-2] != keep:  # an internal invariant of the chunk plan
            raise AssertionError(f"the carried cache holds {layer.keys.shape[-2]} tokens, expected {keep}")
        if rows is not None:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
