"""The fused one-token GRPO step (`--fused-one-token`, on by default with the transformers engine).

When every completion is one token, the samples are drawn from the update's own forward pass (the
policy has not changed yet), so a step costs one forward + backward instead of a rollout forward,
then the update's forward + backward. Every prompt's samples come from a generator seeded by the
prompt alone (`rollout.prompt_seed`), so the fused and the two-pass step draw the same samples.
`GRPOObjective.fused(step)` says when it applies; this module is the step itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from rpttrain import algos
from rpttrain.batching import last_positions_logits, plan_batches
from rpttrain.rollout import prompt_seed
from rpttrain.rollout.hf import sample_next_tokens

if TYPE_CHECKING:
    from rpttrain.grpo import GRPOObjective, Rollout


def fused_rollout_and_update(
    objective: GRPOObjective, tasks: list[dict], step: int, timings: dict
) -> tuple[list[list[Rollout]], dict]:
    """Sample, reward and accumulate the gradient from one forward per micro-batch of prompts;
    then the optimizer step. Returns the groups (in task order) and the update's stats."""
    c = objective.config
    prompts, sampling = objective.prompts(tasks), objective.sampling(step, 0)
    n = len(tasks) * c.group_size
    denom = algos.loss_denominator(torch.ones(n, 1), c.loss_agg, max_len=c.max_new_tokens)
    groups: list[list[Rollout] | None] = [None] * len(tasks)
    stats = {"loss": 0.0, "kl": 0.0, "update_tokens": 0}
    clipped = 0.0
    for mb in plan_batches([len(p) for p in prompts], max_tokens=c.micro_batch_tokens):
        t = time.time()
        batch_prompts = [prompts[i] for i in mb]
        with objective.precision.autocast():
            logits = last_positions_logits(objective.model, batch_prompts, k=1)  # [P, 1, V], with grad
        sampled = sample_next_tokens(
            logits[:, -1], sampling, [prompt_seed(sampling.seed, i) for i in mb], objective.tokenizer
        )
        timings["rollout_s"] += time.time() - t
        t = time.time()
        rolled = objective.score([tasks[i] for i in mb], list(zip(batch_prompts, sampled)), logits[:, -1])
        objective.advantages(rolled)
        timings["reward_s"] += time.time() - t
        flat = [r for g in rolled for r in g]
        dev = logits.device
        rows = torch.arange(len(mb), device=dev).repeat_interleave(c.group_size)
        tokens = torch.tensor([[r.completion_ids[0]] for r in flat], device=dev)
        with objective.precision.autocast():
            logp = algos.token_logprobs(logits[rows], tokens, c.temperature)  # [N, 1]
            mask = torch.ones_like(logp)
            adv = torch.tensor([r.advantage for r in flat], dtype=torch.float32, device=dev)
            loss_tok, was_clipped = algos.policy_loss(logp, logp.detach(), adv, c.clip_eps, c.clip_eps_high)
            if objective.ref_model is not None:
                with torch.no_grad():
                    ref = algos.token_logprobs(
                        last_positions_logits(objective.ref_model, batch_prompts, k=1)[rows], tokens, c.temperature
                    )
                kl = algos.kl_k3(logp, ref)
                loss_tok = loss_tok + c.kl_coef * kl
                stats["kl"] += float(kl.sum())
            loss = algos.aggregate_loss(loss_tok, mask, c.loss_agg, denom)
        loss.backward()
        stats["loss"] += float(loss.detach())
        clipped += float(was_clipped.float().sum())
        stats["update_tokens"] += sum(len(p) for p in batch_prompts)
        for i, g in zip(mb, rolled):
            groups[i] = g
    grad_norm, bad = objective.optimizer_step(stats["loss"])
    # the samples come from the very log-probs the update uses: no engine mismatch to measure
    stats.update(
        clip_frac=clipped / max(n, 1),
        kl=stats["kl"] / max(n, 1),
        grad_norm=grad_norm,
        skipped=bad,
        logprob_mismatch=0.0,
    )
    return groups, stats
