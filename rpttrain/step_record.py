"""What one training step leaves behind, written by the trainer alone: the step's counts added to
the run's totals, its FLOPs, its metrics line and (every --sample-every steps) its samples.

    result = objective.step(step)                  # StepResult: metrics, counts, samples
    metrics = record_step(result, step, totals, n_params, run_dir, sample_every)

Every objective returns what it computed as token counts; the FLOPs follow from them here, the same
way for every objective, so runs of different objectives compare at equal compute:
6·N per token through a forward + backward (`update_tokens`), 2·N per token through a forward alone
(`FORWARD_COUNTS`: the rollout engine's tokens, and the scoring forwards an objective runs without
a gradient), N = the model's parameters; plus the FLOPs of other models the step ran
(`OTHER_MODEL_FLOPS`: a judge's, at its own N).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# counts of tokens that ran through a forward without a backward (2·N FLOPs each)
FORWARD_COUNTS = ("rollout_forward_tokens", "scoring_forward_tokens")
# FLOPs of other models the step ran, counted by whoever ran them with their own N (the judge of
# --reward judge: 2·N_judge per token, rpttrain.judge)
OTHER_MODEL_FLOPS = ("judge_flops",)


@dataclass
class StepResult:
    """One objective step, as the trainer records it.

    metrics: the step's own metrics (its line of metrics.jsonl, before the FLOPs are added);
    counts: what to add to the run's totals (`update_tokens`, `FORWARD_COUNTS`, `samples`, and any
        count of the objective's own, e.g. `rollout_tokens`, `verify_timeouts`);
    samples: lines for samples.jsonl, written on the steps --sample-every picks."""

    metrics: dict
    counts: dict
    samples: list[dict] = field(default_factory=list)


def step_flops(counts: dict, n_params: int) -> float:
    """Training FLOPs of one step's counts (6·N per update token, 2·N per forward-only token).

    >>> step_flops({"update_tokens": 10, "rollout_forward_tokens": 5}, n_params=100)
    7000.0
    """
    forward = sum(counts.get(k, 0) for k in FORWARD_COUNTS)
    own = 6.0 * n_params * counts.get("update_tokens", 0) + 2.0 * n_params * forward
    return own + sum(counts.get(k, 0.0) for k in OTHER_MODEL_FLOPS)


def record_step(result: StepResult, step: int, totals: dict, n_params: int, run_dir: Path, sample_every: int) -> dict:
    """Add the step's counts to `totals`, add its FLOPs to its metrics, and append its samples to
    RUN/samples.jsonl when step + 1 is a multiple of `sample_every` (0: never). Returns the metrics."""
    flops = step_flops(result.counts, n_params)
    totals["flops"] += flops
    for key, n in result.counts.items():
        totals[key] = totals.get(key, 0) + n
    if sample_every and (step + 1) % sample_every == 0 and result.samples:
        with (run_dir / "samples.jsonl").open("a") as f:
            for line in result.samples:
                f.write(json.dumps({"step": step + 1, **line}) + "\n")
    return {**result.metrics, "flops": flops, "flops_total": totals["flops"]}
