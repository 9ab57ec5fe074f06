"""The fused one-token GRPO step (`--fused-one-token`, on by default with the transformers engine).

When every completion is one token, the samples are drawn from the update's own forward pass (the
policy has not changed yet), so a step costs one forward + backward instead of a rollout forward,
then the update's forward + backward. Every prompt's samples come from a generator seeded by the
prompt alone (`rollout.prompt_seed`), so the fused and the two-pass step draw the same samples.
`GRPOObjective.fused(step)` says when it applies; this module is the step's forward, sampling and
backward, given what it needs: the reward and advantages come from the `score` callable, the loss
from the shared `PolicyUpdate`; the optimizer step is the caller's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from rpttrain.batching import last_positions_logits, plan_batches
from rpttrain.objectives import algos
from rpttrain.objectives.policy_update import PolicyUpdate
from rpttrain.precision import Precision
from rpttrain.rollout import Sampling, prompt_seed
from rpttrain.rollout.hf import sample_next_tokens


def fused_rollout_and_update(
    model,
    ref_model,
    precision: Precision,
    tokenizer,
    config,
    prompts: Sequence[list[int]],
    sampling: Sampling,
    score: Callable,
    update: PolicyUpdate,
    timings: dict,
) -> list[list]:
    """Sample, reward and accumulate the gradient from one forward per micro-batch of prompts.

    `score(indices, sampled, last_logits)` turns the micro-batch's prompts (by index into
    `prompts`) and their sampled completions into groups of rollouts, each with `.completion_ids`
    and `.advantage` set. Returns the groups in prompt order; the gradient is left accumulated."""
    c = config
    groups: list[list | None] = [None] * len(prompts)
    for mb in plan_batches([len(p) for p in prompts], max_tokens=c.micro_batch_tokens):
        t = time.time()
        batch_prompts = [prompts[i] for i in mb]
        with precision.autocast():
            logits = last_positions_logits(model, batch_prompts, k=1)  # [P, 1, V], with grad
        sampled = sample_next_tokens(logits[:, -1], sampling, [prompt_seed(sampling.seed, i) for i in mb], tokenizer)
        timings["rollout_s"] += time.time() - t
        t = time.time()
        rolled = score(mb, sampled, logits[:, -1])
        timings["reward_s"] += time.time() - t
        flat = [r for g in rolled for r in g]
        dev = logits.device
        rows = torch.arange(len(mb), device=dev).repeat_interleave(c.group_size)
        tokens = torch.tensor([[r.completion_ids[0]] for r in flat], device=dev)
        with precision.autocast():
            logp = algos.token_logprobs(logits[rows], tokens, c.temperature)  # [N, 1]
            adv = torch.tensor([r.advantage for r in flat], dtype=torch.float32, device=dev)
            ref = None
            if ref_model is not None:
                with torch.no_grad():
                    ref = algos.token_logprobs(
                        last_positions_logits(ref_model, batch_prompts, k=1)[rows], tokens, c.temperature
                    )
            loss = update.loss(logp, adv, torch.ones_like(logp), ref)
        loss.backward()
        update.update_tokens += sum(len(p) for p in batch_prompts)
        for i, g in zip(mb, rolled):
            groups[i] = g
    return groups
