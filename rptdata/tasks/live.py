"""Will a group of G samples get mixed rewards? The live-group estimate from the proxy's scores.

    accepted_prediction(token_bytes, continuation_bytes, boundaries) -> bool
    tempered_accept_mass(logprobs, accepted, temperature, tail_logprob)  -> q
    live_probability(q, group_size)                                      -> 1 - q**G - (1-q)**G
    predicted_zero_variance(tasks, group_size)                           -> mean(1 - live) of a batch

GRPO learns only from groups whose rewards differ: a group whose G samples all score 1, or all
score 0, has zero advantage everywhere (the "zero-variance" groups, 44-46% of the groups in our
runs). If a policy draws a rewarded prediction with probability q, a group of G independent
samples is mixed with probability

    live = 1 - q**G - (1 - q)**G.

q is estimated from what `rpt score-entropy` saved for the position: the proxy's full-softmax
log-probability of the true next token (`target_logprob`), and with `--save-topk` its k most
likely tokens and their log-probabilities. A one-token prediction is rewarded (prefix matching,
`rpttrain.reward.prefix_reward`) when its bytes are the first bytes of the continuation and end
on one of its token boundaries that is also a character boundary (a piece of a multi-byte
character decodes to U+FFFD and cannot match): the true token, and any other saved token
spanning whole continuation tokens (" para" + "graph" -> " paragraph").

Temperature. Sampling at T draws token i with probability p_i**(1/T) / sum_j p_j**(1/T), and
the scores know only some p_i. The approximation used here: the mass R = 1 - sum(known p) that
no saved token accounts for is treated as R / p_tail tokens of probability p_tail each, where
p_tail is the smallest probability the saved tokens vouch for as an upper bound of every
unsaved token (the k-th top-k probability when top-k was saved, else p(target)). So

    q = sum_{known accepted} p_i**(1/T) / (sum_{known} p_i**(1/T) + R * p_tail**(1/T - 1)).

It is exact at T = 1 (every term is then the plain probability) and whenever R = 0. With top-k
saved (or a rank-1 target without it) every unsaved token has p <= p_tail, so for T <= 1 the
tail term is an upper bound and q a lower bound of the proxy's tempered accepted mass. Without
top-k and a target that is not the proxy's top choice, the tokens above it are folded into the
flat tail too and q is only an approximation (too high for T < 1). Note that with the target
alone the flat tail at p(target) makes q = p(target) at every T: without top-k, temperature
cannot be accounted for, and `rpt score-entropy --save-topk` is what makes the estimate use it.

The estimate describes the *proxy* sampling one token from the raw context: it is exact only
when the policy is the proxy and the prompt format is `continuation` (one sampled token). For a
trained policy, another model, or a reasoning format it is a prior, not a measurement.

Left out on purpose: accepted predictions the top-k does not list (a multi-token spelling of the
continuation outside the top-k adds mass the estimate cannot see), top-p sampling, and
multi-token completions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "accepted_prediction",
    "live_probability",
    "position_accept_mass",
    "predicted_zero_variance",
    "tempered_accept_mass",
]


def _is_char_boundary(data: bytes, offset: int) -> bool:
    return offset >= len(data) or (data[offset] & 0xC0) != 0x80


def accepted_prediction(token_bytes: bytes, continuation_bytes: bytes, boundaries: Sequence[int]) -> bool:
    """True when a one-token prediction with these bytes earns the prefix reward.

    The bytes must be the start of the continuation and end on one of its token boundaries; the
    boundary must also be a character boundary, since a prediction is compared as text and a
    piece of a multi-byte character does not survive decoding.

    >>> accepted_prediction(b" para", b" paragraph", [5, 10])
    True
    >>> accepted_prediction(b" paragraph", b" paragraph", [5, 10])
    True
    >>> accepted_prediction(b" par", b" paragraph", [5, 10])
    False
    >>> accepted_prediction("世".encode()[:2], "世".encode(), [2, 3])   # half a character
    False
    """
    n = len(token_bytes)
    return (
        n > 0
        and n in boundaries
        and continuation_bytes.startswith(token_bytes)
        and _is_char_boundary(continuation_bytes, n)
    )


def tempered_accept_mass(
    logprobs: Sequence[float], accepted: Sequence[bool], temperature: float, tail_logprob: float
) -> float:
    """q: the probability, at `temperature`, of sampling one of the accepted tokens.

    `logprobs` are full-softmax log-probabilities of distinct known tokens, `accepted` says
    which of them the reward accepts, and `tail_logprob` is log p_tail, the level at which the
    unknown mass is spread (see the module docstring). NaN when a log-probability is NaN.

    >>> round(tempered_accept_mass([math.log(0.5), math.log(0.3)], [True, False], 1.0, math.log(0.3)), 6)
    0.5
    >>> # the whole vocabulary known: plain tempered softmax, p**(1/T) renormalized
    >>> round(tempered_accept_mass([math.log(0.75), math.log(0.25)], [True, False], 0.5, math.log(0.25)), 6)
    0.9
    >>> tempered_accept_mass([math.log(0.75)], [False], 0.8, math.log(0.75))
    0.0
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for a sampled group, not {temperature}")
    if len(logprobs) != len(accepted) or not len(logprobs):
        raise ValueError("give one accepted flag per known log-probability, and at least one")
    if any(math.isnan(lp) for lp in logprobs) or math.isnan(tail_logprob):
        return math.nan
    inv = 1.0 / temperature
    top = max(logprobs)
    # scale by exp(-top/T) so neither exp underflows for very unlikely tokens
    weights = [math.exp((lp - top) * inv) for lp in logprobs]
    rest = max(0.0, 1.0 - sum(math.exp(lp) for lp in logprobs))
    tail = rest * math.exp(tail_logprob * (inv - 1.0) - top * inv) if rest > 0 else 0.0
    hit = sum(w for w, ok in zip(weights, accepted) if ok)
    return min(1.0, hit / (sum(weights) + tail))


def live_probability(q: float, group_size: int) -> float:
    """The probability that G independent samples, each rewarded with probability q, get mixed
    rewards: 1 - q**G - (1-q)**G. NaN in, NaN out.

    >>> live_probability(0.5, 2)
    0.5
    >>> live_probability(0.0, 8), live_probability(1.0, 8)
    (0.0, 0.0)
    >>> round(live_probability(0.1, 8), 4)
    0.5695
    """
    if group_size < 1:
        raise ValueError(f"a group holds at least one sample, not {group_size}")
    if math.isnan(q):
        return math.nan
    q = min(1.0, max(0.0, q))
    return max(0.0, 1.0 - q**group_size - (1.0 - q) ** group_size)


def position_accept_mass(
    target_logprob: float,
    target_accepted: bool,
    temperature: float,
    topk: tuple[Sequence[int], Sequence[float], Sequence[bool]] | None = None,
    target_id: int | None = None,
) -> float:
    """q for one scored position: the true token, plus the saved top-k when there is one.

    `topk` is (ids, logprobs, accepted flags) best first; the target is counted once even when
    it is in the top-k (matched by `target_id`). Without top-k the tail level is p(target).

    >>> round(position_accept_mass(math.log(0.4), True, 1.0), 6)
    0.4
    >>> # " para" (0.4) and " paragraph" (0.2) are both accepted, " the" (0.3) is not
    >>> topk = ([7, 9, 8], [math.log(0.4), math.log(0.3), math.log(0.2)], [True, False, True])
    >>> round(position_accept_mass(math.log(0.4), True, 1.0, topk, target_id=7), 6)
    0.6
    """
    if topk is None:
        return tempered_accept_mass([target_logprob], [target_accepted], temperature, target_logprob)
    ids, lps, ok = topk
    logprobs, accepted = [float(x) for x in lps], [bool(x) for x in ok]
    if target_id is None or target_id not in ids:
        logprobs.append(float(target_logprob))
        accepted.append(bool(target_accepted))
    tail = float(lps[-1]) if len(lps) else float(target_logprob)
    return tempered_accept_mass(logprobs, accepted, temperature, tail)


def predicted_zero_variance(tasks: Iterable[Mapping], group_size: int | None = None) -> float | None:
    """The predicted share of zero-variance groups in a batch of task rows: mean of 1 - live.

    With `group_size`, live is recomputed from each row's `accept_mass` (q) for that G, so a
    trainer with another G than make-tasks' `--group-size` still gets the right prediction;
    otherwise the stored `live` is used. Rows without the columns (older task directories) or
    with NaN are left out; None when no row carries an estimate.

    >>> predicted_zero_variance([{"live": 0.25}, {"live": 0.75}])
    0.5
    >>> predicted_zero_variance([{"accept_mass": 0.5}, {"accept_mass": 0.0}], group_size=2)
    0.75
    >>> predicted_zero_variance([{"context": "no estimate"}]) is None
    True
    """
    dead = []
    for t in tasks:
        if group_size is not None and t.get("accept_mass") is not None:
            live = live_probability(float(t["accept_mass"]), group_size)
        elif t.get("live") is not None:
            live = float(t["live"])
        else:
            continue
        if not math.isnan(live):
            dead.append(1.0 - live)
    return sum(dead) / len(dead) if dead else None
