"""The micro-batch policy loss every GRPO-style objective shares (`rpt`'s two-pass and fused
one-token steps, and RLP): the clip, the KL term, the aggregation and the clip statistics, in one
place; and the update over sampled completions that the two-pass step and RLP run through it
(`policy_gradient_update`: micro-batches, the completions' log-probs, backward, optimizer step).

    update = PolicyUpdate(config, denominator=algos.loss_denominator(all_mask, config.loss_agg, ...))
    for each micro-batch:
        with precision.autocast():
            logp, mask = ...                         # [N, T] log-probs of the trained tokens
            loss = update.loss(logp, advantages, mask, ref_logp)
        loss.backward()
        update.update_tokens += tokens the forward ran
    stats = update.finish(*optimizer_step(update.loss_sum))

One on-policy update per batch: the old log-probs are the current ones, detached (ratio 1; the clip
is still applied as written). The denominator is the whole update batch's, so micro-batch losses
add up to the full-batch loss (`algos.aggregate_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rpttrain.batching import last_positions_logits, plan_batches
from rpttrain.objectives import algos
from rpttrain.precision import Precision


class PolicyUpdate:
    """The sums of one optimizer step's policy-gradient update, micro-batch by micro-batch."""

    def __init__(self, config, denominator: float):
        self.config, self.denominator = config, denominator
        self.loss_sum = 0.0
        self.kl_sum = 0.0
        self.clipped = 0.0
        self.tokens = 0.0
        self.update_tokens = 0  # tokens the update's forwards ran (6·N FLOPs each)

    def loss(
        self, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This micro-batch's share of the batch loss: the clipped surrogate per token (logp, mask
        [N, T]; advantages [N]), plus kl_coef times the k3 KL to `ref_logp` when given, aggregated
        by --loss-agg over the whole batch's denominator. Its statistics are added up here."""
        c = self.config
        loss_tok, was_clipped = algos.policy_loss(logp, logp.detach(), advantages, c.clip_eps, c.clip_eps_high)
        if ref_logp is not None:
            kl = algos.kl_k3(logp, ref_logp)
            loss_tok = loss_tok + c.kl_coef * kl
            self.kl_sum += float((kl.detach() * mask).sum())
        loss = algos.aggregate_loss(loss_tok, mask, c.loss_agg, self.denominator)
        self.loss_sum += float(loss.detach())
        self.clipped += float((was_clipped.float() * mask).sum())
        self.tokens += float(mask.sum())
        return loss

    def finish(self, grad_norm: float, skipped: bool, logprob_mismatch: float | None) -> dict:
        """The update's metrics once the optimizer has stepped (or skipped)."""
        return {
            "clip_frac": self.clipped / max(self.tokens, 1),
            "logprob_mismatch": logprob_mismatch,
            "kl": self.kl_sum / max(self.tokens, 1),
            "loss": self.loss_sum,
            "update_tokens": self.update_tokens,
            "grad_norm": grad_norm,
            "skipped": skipped,
        }

    @staticmethod
    def metrics(upd: dict) -> dict:
        """The update's part of a step's metrics line (from `finish` or `empty`)."""
        return {
            "clip_frac": upd["clip_frac"],
            "kl": upd["kl"],
            "loss": upd["loss"],
            "grad_norm": upd["grad_norm"],
            "skipped_update": upd["skipped"],
            "logprob_mismatch": upd["logprob_mismatch"],
        }

    @staticmethod
    def empty() -> dict:
        """An update with nothing to train (no completion token in the batch)."""
        return {
            "clip_frac": 0.0,
            "logprob_mismatch": None,
            "kl": 0.0,
            "loss": 0.0,
            "update_tokens": 0,
            "grad_norm": 0.0,
            "skipped": False,
        }


# ---------------------------------------------------------------------------------------------
# the update over sampled completions: anything with prompt_ids, completion_ids, reward, advantage
# and engine_logprobs (the engine's log-prob of each sampled token, or None)


def set_advantages(groups: Sequence[Sequence], scale: str) -> None:
    """Each rollout's `advantage` from its group's rewards (`algos.group_advantages`, --scale-rewards)."""
    rewards = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float32)
    adv = algos.group_advantages(rewards, scale=scale)
    for g, a in zip(groups, adv.tolist()):
        for r, x in zip(g, a):
            r.advantage = x


def policy_gradient_update(
    rollouts: Sequence,
    model,
    ref_model,
    precision: Precision,
    config,
    optimizer_step: Callable,
    before_step: Callable[[PolicyUpdate], None] | None = None,
) -> dict:
    """The clipped policy-gradient update over every completion token of `rollouts` (those with no
    token are left out), micro-batched by --micro-batch-tokens, then the optimizer step. The
    engine's log-probs are only compared with the trainer's (`logprob_mismatch`), never trained on.
    `before_step(update)` adds the objective's other loss terms (their backward, `update.loss_sum`,
    `update.update_tokens`) just before the optimizer step (RMT's next-token term)."""
    c = config
    rollouts = [r for r in rollouts if r.completion_ids]
    if not rollouts:
        return PolicyUpdate.empty()
    all_mask = torch.zeros(len(rollouts), max(len(r.completion_ids) for r in rollouts))
    for i, r in enumerate(rollouts):
        all_mask[i, : len(r.completion_ids)] = 1
    update = PolicyUpdate(c, algos.loss_denominator(all_mask, c.loss_agg, max_len=c.max_new_tokens))
    mismatch_sum, mismatch_n = 0.0, 0
    for mb in micro_batches(rollouts, c.micro_batch_tokens):
        batch = [rollouts[i] for i in mb]
        with precision.autocast():  # log-probs and the loss come out in float32
            logp, mask = completion_logprobs(model, batch, c.temperature)
            adv = torch.tensor([r.advantage for r in batch], dtype=torch.float32, device=logp.device)
            ref = None
            if ref_model is not None:
                with torch.no_grad():
                    ref, _ = completion_logprobs(ref_model, batch, c.temperature)
            loss = update.loss(logp, adv, mask, ref)
        loss.backward()
        update.update_tokens += forward_tokens(batch)
        for j, r in enumerate(batch):
            if r.engine_logprobs:
                n = min(len(r.engine_logprobs), int(mask[j].sum()))
                eng = torch.tensor(r.engine_logprobs[:n])
                mismatch_sum += float((eng - logp[j, :n].detach().cpu()).abs().sum())
                mismatch_n += n
    if before_step is not None:
        before_step(update)
    grad_norm, bad = optimizer_step(update.loss_sum)
    return update.finish(grad_norm, bad, (mismatch_sum / mismatch_n) if mismatch_n else None)


def single_token(batch: Sequence) -> bool:
    return all(len(r.completion_ids) == 1 for r in batch)


def forward_tokens(batch: Sequence) -> int:
    """Tokens the update's forward actually runs (a shared prompt counts once on the fast path)."""
    if single_token(batch):
        return sum(len(p) for p in {tuple(r.prompt_ids) for r in batch})
    return sum(len(r.prompt_ids) + len(r.completion_ids) for r in batch)


def micro_batches(rollouts: Sequence, micro_batch_tokens: int) -> list[list[int]]:
    """Micro-batches of at most micro_batch_tokens padded tokens; on the one-token path the
    samples of a prompt are one row and stay together."""
    widths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    keys = [tuple(r.prompt_ids) for r in rollouts] if single_token(rollouts) else None
    return plan_batches(widths, max_tokens=micro_batch_tokens, row_keys=keys)


def completion_logprobs(model, batch: Sequence, temperature: float):
    """Log-probs [N, T] (left-aligned) and mask of each completion token under `model` at the
    sampling temperature; only the last T+1 positions go through the LM head. When every
    completion is one token, each distinct prompt runs once and its samples share the logits."""
    if single_token(batch):
        prompts = list(dict.fromkeys(tuple(r.prompt_ids) for r in batch))
        row_of = {p: i for i, p in enumerate(prompts)}
        logits = last_positions_logits(model, prompts, k=1)
        dev = logits.device
        rows = torch.tensor([row_of[tuple(r.prompt_ids)] for r in batch], device=dev)
        tokens = torch.tensor([[r.completion_ids[0]] for r in batch], device=dev)
        logp = algos.token_logprobs(logits[rows], tokens, temperature)  # [N, 1]
        return logp, torch.ones_like(logp)
    t_max = max(len(r.completion_ids) for r in batch)
    logits = last_positions_logits(model, [r.prompt_ids + r.completion_ids for r in batch], k=t_max + 1)[:, :-1]
    dev = logits.device
    comp = torch.zeros(len(batch), t_max, dtype=torch.long)  # right-aligned completions
    for i, r in enumerate(batch):
        comp[i, t_max - len(r.completion_ids) :] = torch.tensor(r.completion_ids)
    logp = algos.token_logprobs(logits, comp.to(dev), temperature)
    # right-align -> left-align so column j is the j-th completion token (matches engine order)
    logp_left = torch.zeros_like(logp)
    mask_left = torch.zeros(len(batch), t_max)
    for i, r in enumerate(batch):
        n = len(r.completion_ids)
        logp_left[i, :n] = logp[i, t_max - n :]
        mask_left[i, :n] = 1
    return logp_left, mask_left.to(dev)
