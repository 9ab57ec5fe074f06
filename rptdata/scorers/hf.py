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

Left out on purpose: packing several documents into one row (needs per-document attention
masks); tensor/pipeline parallelism (use vLLM for big proxies).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from rptdata.scorers import PositionScores, plan_token_batches, topk_entropy
from rptdata.models import load_causal_lm, resolve_device

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
            if not 1 <= f < len(s):
                raise ValueError(f"first scored position {f} must be in 1..{len(s) - 1} for a sequence of {len(s)}")
        input_lengths = [len(s) - 1 for s in sequences]
        for batch in plan_token_batches(input_lengths, self.batch_tokens):
            results = self._score_batch([sequences[i] for i in batch], [firsts[i] for i in batch])
            for i, scores in zip(batch, results):
                yield i, scores
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
                hidden = self._body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
                hidden = hidden.reshape(n * width, -1).index_select(0, rows_t)
                to_logits = self._logits_from_hidden
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                hidden = logits.reshape(n * width, -1).index_select(0, rows_t)
                to_logits = None
            parts = []
            for c in range(0, hidden.shape[0], self.chunk_rows):
                chunk = hidden[c : c + self.chunk_rows]
                logits = (to_logits(chunk) if to_logits else chunk).float()
                parts.append(self._chunk_stats(logits, targets_t[c : c + self.chunk_rows]))
            stats = [torch.cat(cols).cpu().numpy() for cols in zip(*parts)]

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
