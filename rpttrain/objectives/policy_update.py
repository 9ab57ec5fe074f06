"""The micro-batch policy loss every GRPO-style objective shares (`rpt`'s two-pass and fused
one-token steps, and RLP): the clip, the KL term, the aggregation and the clip statistics, in one
place.

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

import torch

from rpttrain.objectives import algos


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
