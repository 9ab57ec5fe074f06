"""Rollouts with transformers `generate` (CPU or GPU). Shares the training model's weights.

Prompts are left-padded into micro-batches of at most `max_batch_sequences` sequences
(prompts x n), so memory stays bounded whatever the batch. Sampling is seeded per call, so a run
with a fixed seed is reproducible on CPU. Log-probs returned are those of the sampling
distribution (temperature applied), as vLLM reports them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rpttrain.batching import last_positions_logits, left_pad
from rpttrain.rollout import Completion, Sampling, fed_back_tokens, prompt_seed


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p."""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, idx, sorted_p)


@torch.no_grad()
def sample_next_tokens(
    logits: torch.Tensor, sampling: Sampling, seeds: Sequence[int], tokenizer
) -> list[list[Completion]]:
    """`sampling.n` draws of one next token for each row of `logits` [P, V], row i from its own
    generator seeded `seeds[i]` (so a row's samples do not depend on the other rows): the one-token
    rollout of the engine, and of the trainer's fused step, which samples from its own forward."""
    logits = logits.detach().float()
    if sampling.temperature == 0:
        picks = logits.argmax(-1, keepdim=True)
        logp = torch.log_softmax(logits, -1)
    else:
        logp = torch.log_softmax(logits / sampling.temperature, -1)
        probs = _nucleus(logp.exp(), sampling.top_p)
        rows = []
        for i, seed in enumerate(seeds):
            gen = torch.Generator(device=probs.device).manual_seed(int(seed))
            rows.append(torch.multinomial(probs[i], sampling.n, replacement=True, generator=gen))
        picks = torch.stack(rows)
    chosen = logp.gather(-1, picks).cpu()
    picks = picks.cpu()
    stop = set(sampling.stop_token_ids)
    groups = []
    for i in range(picks.shape[0]):
        group = []
        for j in range(picks.shape[1]):
            t = int(picks[i, j])
            group.append(
                Completion(
                    token_ids=[t],
                    text="" if t in stop else tokenizer.decode([t]),
                    finish_reason="stop" if t in stop else "length",
                    logprobs=[float(chosen[i, j])],
                )
            )
        groups.append(group)
    return groups


class _SampledLogprobs(LogitsProcessor):
    """Records log p(sampled token) under the processed (temperature-scaled) distribution,
    keeping one step of log-softmax at a time instead of every step's full-vocabulary logits."""

    def __init__(self, temperature: float):
        # custom processors run before transformers' temperature warper: apply it here
        self.temperature = temperature if temperature > 0 else 1.0
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1).float().cpu())
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, sequences[:, -1:]).squeeze(-1).float().cpu())
            self.prev = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(sequences.shape[0], 0)


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, max_batch_sequences: int = 64, compute_dtype: torch.dtype | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_sequences = max_batch_sequences
        # a mixed-precision trainer's float32 model generates under autocast, in its compute dtype
        self.compute_dtype = compute_dtype
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def update_weights(self, model) -> None:
        self.model = model  # same object as the trainer's: nothing to copy

    def close(self) -> None:
        pass

    def forward_tokens(self, prompts, groups, sampling: Sampling) -> int:
        """The one-token path runs each prompt once and feeds nothing back; generate() runs each
        prompt n times (num_return_sequences expands the batch), then the fed-back tokens."""
        prompt = sum(len(p) for p in prompts)
        if sampling.max_new_tokens == 1:
            return prompt
        return sampling.n * prompt + fed_back_tokens(groups)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[Completion]]:
        # one new token: one forward per distinct prompt, then n draws from its distribution
        # (generate() would run the prompt n times over)
        one_token = sampling.max_new_tokens == 1
        per_chunk = self.max_batch_sequences if one_token else max(1, self.max_batch_sequences // sampling.n)
        out: list[list[Completion]] = []
        was_training = self.model.training
        self.model.eval()
        param = next(self.model.parameters())
        mixed = self.compute_dtype is not None and self.compute_dtype != param.dtype
        try:
            with torch.autocast(param.device.type, dtype=self.compute_dtype, enabled=mixed):
                for start in range(0, len(prompts), per_chunk):
                    chunk = prompts[start : start + per_chunk]
                    # one seed per chunk: reproducible, and independent of how many chunks came before
                    torch.manual_seed(sampling.seed + start)
                    out += (
                        self._one_token_chunk(chunk, sampling, start)
                        if one_token
                        else self._generate_chunk(chunk, sampling)
                    )
        finally:
            self.model.train(was_training)
        return out

    def _left_pad(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention, _ = left_pad(prompts, self.pad_id)
        return input_ids, attention

    def _one_token_chunk(self, prompts, sampling: Sampling, first: int) -> list[list[Completion]]:
        logits = last_positions_logits(self.model, prompts, k=1, pad_id=self.pad_id)[:, -1]
        seeds = [prompt_seed(sampling.seed, first + i) for i in range(len(prompts))]
        return sample_next_tokens(logits, sampling, seeds, self.tokenizer)

    def _generate_chunk(self, prompts, sampling: Sampling) -> list[list[Completion]]:
        device = next(self.model.parameters()).device
        input_ids, attention = self._left_pad(prompts)
        width = input_ids.shape[1]
        greedy = sampling.temperature == 0
        stop = list(sampling.stop_token_ids)
        recorder = _SampledLogprobs(sampling.temperature)
        gen = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,  # sample from the whole distribution, as vLLM does
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=stop or None,
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList([recorder]),
        )
        new = gen[:, width:].cpu()
        logp = recorder.finish(gen)
        groups: list[list[Completion]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(sampling.n):
                row = i * sampling.n + j
                ids = new[row].tolist()
                finish = "length"
                for k, t in enumerate(ids):
                    if t in stop:
                        ids, finish = ids[: k + 1], "stop"
                        break
                text_ids = ids[:-1] if finish == "stop" else ids
                group.append(
                    Completion(
                        token_ids=ids,
                        text=self.tokenizer.decode(text_ids, skip_special_tokens=False),
                        finish_reason=finish,
                        logprobs=logp[row, : len(ids)].tolist(),
                    )
                )
            groups.append(group)
        return groups
