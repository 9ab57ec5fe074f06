"""The math of GRPO for RPT, as small pure tensor functions (the training loop only calls them).

- `group_advantages`: GRPO's group-normalized advantage (Shao et al. 2024, DeepSeekMath), or
  Dr. GRPO's unscaled `r - mean` (Liu et al. 2025, "Understanding R1-Zero-like training"), or
  RLP's `G/(G-1) (r - mean)` (arXiv 2510.01265 Eq. 7; the leave-one-out baseline of RLOO).
- `policy_loss`: PPO's clipped surrogate per token (Schulman et al. 2017), with optional
  asymmetric clip (DAPO's clip-higher).
- `aggregate_loss` / `loss_denominator`: token-mean (DAPO), seq-mean (GRPO paper), dr-grpo
  (sum over tokens / (sequences x max length)). The denominator is computed once over the whole
  update batch, so micro-batches accumulate to exactly the full-batch loss.
- `kl_k3`: the k3 estimator of KL(pi || ref) (Schulman 2020), used only when --kl-coef > 0.
- `token_logprobs`: log p(token) from logits, with temperature, without a full softmax copy.

Shapes: B = groups (contexts), G = samples per group, N = sequences in a micro-batch,
T = completion tokens (padded).
"""

from __future__ import annotations

import torch

from rptdata.errors import BadOption

LOSS_AGGS = ("token-mean", "seq-mean", "dr-grpo")
SCALES = ("group", "none", "rloo")


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Advantages from rewards [B, G]: (r - mean_g) / (std_g + eps), or r - mean_g with
    scale="none", or G/(G-1) (r - mean_g) with scale="rloo" (= r minus the mean of the others).

    std is the unbiased sample std of the group, as in verl and TRL. A group whose rewards are all
    equal gets advantage 0 everywhere (it carries no signal).

    >>> group_advantages(torch.tensor([[1., 0., 0., 1.]]), scale="none").tolist()
    [[0.5, -0.5, -0.5, 0.5]]
    >>> group_advantages(torch.tensor([[3., 0., 0., 1.]]), scale="rloo").tolist()
    [[2.6666667461395264, -1.3333333730697632, -1.3333333730697632, 0.0]]
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, samples], got shape {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centered
    if scale == "rloo":
        g = rewards.shape[1]
        return centered * (g / (g - 1)) if g > 1 else torch.zeros_like(centered)
    if scale != "group":
        raise BadOption(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centered[:, :1])
    return centered / (std + eps)


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[B] bool: groups whose G rewards are all equal (no learning signal).

    >>> zero_variance_groups(torch.tensor([[1., 1.], [0., 1.]])).tolist()
    [True, False]
    """
    return (rewards == rewards[:, :1]).all(dim=1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens]: logits [N, T, V], tokens [N, T] -> [N, T] float32."""
    logits = logits.float()
    if temperature not in (0, 1, 1.0):
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss and a clipped-token indicator.

    logp, old_logp: [N, T]; advantages: [N] (one per sequence, broadcast over tokens).
    loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), ratio = exp(logp - old_logp).

    >>> loss, clipped = policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([2.0]))
    >>> loss.tolist(), clipped.tolist()
    ([[-2.0, -2.0]], [[False, False]])
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, clipped < unclipped


def loss_denominator(mask: torch.Tensor, agg: str, max_len: int | None = None) -> float:
    """The normalizer for the WHOLE update batch (mask [N, T] of completion tokens).

    token-mean: number of completion tokens; seq-mean: number of sequences; dr-grpo: sequences x
    max_len (a constant, so long and short answers weigh the same per token).
    """
    if agg == "token-mean":
        return float(mask.sum().clamp(min=1))
    if agg == "seq-mean":
        return float(max(mask.shape[0], 1))
    if agg == "dr-grpo":
        return float(max(mask.shape[0], 1) * (max_len or mask.shape[1]))
    raise BadOption(f"loss aggregation must be one of {', '.join(LOSS_AGGS)}, not {agg!r}")


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, agg: str, denominator: float) -> torch.Tensor:
    """Sum of this micro-batch's share of the batch loss (loss, mask [N, T]).

    seq-mean first averages each sequence over its own tokens; the others sum tokens. Dividing by
    the whole batch's `loss_denominator` makes micro-batch losses add up to the full-batch loss.
    """
    mask = mask.to(loss.dtype)
    if agg == "seq-mean":
        per_seq = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq.sum() / denominator
    if agg in ("token-mean", "dr-grpo"):
        return (loss * mask).sum() / denominator
    raise BadOption(f"loss aggregation must be one of {', '.join(LOSS_AGGS)}, not {agg!r}")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0).

    >>> kl_k3(torch.tensor([0.0]), torch.tensor([0.0])).tolist()
    [0.0]
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


# ---------------------------------------------------------------------------------------------
# next-token baselines (`rpt train --objective ntp|shaped-ntp`)


def ntp_weight(p_target: torch.Tensor, beta: float, eps: float = 1e-6) -> torch.Tensor:
    """The shaped objective's per-position weight w = stop_gradient((1 - p_x) ** beta).

    beta < 0 up-weights positions the model already gets right (sharpens, "precision"); beta > 0
    up-weights the ones it gets wrong (flattens, "diversity"); beta = 0 gives 1 (cross-entropy).
    1 - p_x is clamped at `eps`, so the weight stays finite (at most eps ** beta) when p_x -> 1.
    Kept apart so the other published form, a power of 1 / p_x, can be added beside it.

    >>> ntp_weight(torch.tensor([0.75]), beta=-0.5).tolist()
    [2.0]
    """
    return (1.0 - p_target.detach()).clamp(min=eps).pow(beta)


def shaped_ntp_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    beta: float = 0.0,
    topk: int = 100,
    lambda_top: float = 0.0,
    lambda_tail: float = 0.0,
) -> torch.Tensor:
    """Per-position generalized next-token loss ("Diversity or Precision?", arXiv 2512.22955).

    logits [N, V], targets [N] -> loss [N]:
        loss = -w * log p_x - lambda_top * sum_{a in K, a != x} p_a - lambda_tail * sum_{a not in K, a != x} p_a
    with p = softmax(logits), K = the `topk` most likely tokens (chosen without gradient) and
    w = ntp_weight(p_x, beta). With beta = 0 and both lambdas 0 it is exactly cross-entropy.
    A negative lambda_tail (the paper's -0.1) penalizes probability mass in the tail.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp_x = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    loss = -ntp_weight(logp_x.exp(), beta) * logp_x
    if lambda_top == 0.0 and lambda_tail == 0.0:
        return loss
    p = logp.exp()
    p_x = logp_x.exp()
    k = min(topk, logits.shape[-1])
    top_idx = logits.detach().topk(k, dim=-1).indices
    p_top = p.gather(-1, top_idx).sum(-1)
    x_in_top = (top_idx == targets.unsqueeze(-1)).any(-1)
    top_others = p_top - torch.where(x_in_top, p_x, torch.zeros_like(p_x))
    tail_others = (1.0 - p_top) - torch.where(x_in_top, torch.zeros_like(p_x), p_x)
    return loss - lambda_top * top_others - lambda_tail * tail_others


def entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-softmax entropy (nats) of each row of logits [..., V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
