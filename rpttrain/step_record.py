"""What one GRPO step leaves behind: its compute added to the run's totals, its metrics line,
and (every --sample-every steps) a few samples. `GRPOObjective.step` calls `record_step` last.

FLOPs are what was actually computed: 6 N per update token (forward + backward) and 2 N per token
the rollout engine ran (a prompt its G samples share counts once where the engine computes it
once; none when the step is fused).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import numpy as np

from rpttrain.collapse import collapse_metrics

if TYPE_CHECKING:
    from rpttrain.grpo import GRPOObjective, Rollout


def record_step(
    objective: GRPOObjective,
    step: int,
    all_groups: list[list[Rollout]],
    upd: dict,
    counts: dict,
    timings: dict,
    t0: float,
) -> dict:
    """A step's compute added to the run's totals; its metrics (the line of metrics.jsonl); every
    --sample-every steps, two groups' samples appended to samples.jsonl (step, the task's band when
    it has one, context, completion, prediction, target, reward, correct, the math check's status;
    `rpt samples` shows them, `rpttrain.samples` reads them)."""
    c = objective.config
    rolls = [r for g in all_groups for r in g]
    gen_tokens = sum(len(r.completion_ids) for r in rolls)
    prompt_tokens = sum(len(r.prompt_ids) for r in rolls)
    forward_tokens = counts["forward_tokens"]
    # compute actually spent: rollouts count the tokens the engine ran (a prompt its samples
    # share counts once where the engine computes it once; none when fused), not prompt x samples
    flops = 6.0 * objective.n_params * upd["update_tokens"] + 2.0 * objective.n_params * forward_tokens
    objective.totals["flops"] += flops
    objective.totals["update_tokens"] += upd["update_tokens"]
    objective.totals["rollout_tokens"] += gen_tokens + prompt_tokens
    objective.totals["rollout_forward_tokens"] = objective.totals.get("rollout_forward_tokens", 0) + forward_tokens
    objective.totals["samples"] += len(rolls)
    lengths = [len(r.completion_ids) for r in rolls]
    metrics = {
        "reward_mean": float(np.mean([r.reward for r in rolls])),
        "accuracy": float(np.mean([r.correct for r in rolls])),
        "zero_variance_share": counts["zero_var"] / max(len(all_groups), 1),
        # groups where some rollout earned a reward: with a small policy on hard tasks, often none
        "groups_with_reward_share": sum(max(r.reward for r in g) > 0 for g in all_groups) / max(len(all_groups), 1),
        # make-tasks' estimate for the same tasks (rptdata.tasks.live), when the tasks carry it
        **(
            {"predicted_zero_variance_share": counts["predicted_zero_var"]}
            if counts["predicted_zero_var"] is not None
            else {}
        ),
        "groups_trained": counts["kept"],
        "contexts_drawn": counts["drawn"],
        "sampling_rounds": counts["rounds"],
        "completion_len_mean": float(np.mean(lengths)),
        "completion_len_max": int(max(lengths)),
        "truncated_share": float(np.mean([r.truncated for r in rolls])),
        "no_prediction_share": float(np.mean([r.prediction is None for r in rolls])),
        **collapse_metrics([([r.prediction for r in g], [r.correct for r in g]) for g in all_groups]),
        "clip_frac": upd["clip_frac"],
        "kl": upd["kl"],
        "loss": upd["loss"],
        "grad_norm": upd["grad_norm"],
        "skipped_update": upd["skipped"],
        "logprob_mismatch": upd["logprob_mismatch"],
        "rollout_tokens_per_s": gen_tokens / max(timings["rollout_s"], 1e-9),
        "rollout_forward_tokens": forward_tokens,
        "update_tokens": upd["update_tokens"],
        **{k: round(v, 4) for k, v in timings.items()},
        "step_s": round(time.time() - t0, 4),
        "flops": flops,
        "flops_total": objective.totals["flops"],
    }
    statuses = [r.status for r in rolls if r.status is not None]
    if statuses:  # the math reward: checks that ran out of time or failed scored 0 (rptdata.math_answers)
        metrics["verify_timeouts"] = statuses.count("timeout")
        metrics["verify_errors"] = statuses.count("error")
        objective.totals["verify_timeouts"] = objective.totals.get("verify_timeouts", 0) + metrics["verify_timeouts"]
        objective.totals["verify_errors"] = objective.totals.get("verify_errors", 0) + metrics["verify_errors"]
    if c.sample_every and (step + 1) % c.sample_every == 0:
        with objective.samples_path.open("a") as f:
            for g in all_groups[:2]:
                for r in g:
                    line = {
                        "step": step + 1,
                        **({"band": r.band} if r.band is not None else {}),
                        "context": r.context,
                        "completion": r.text,
                        "prediction": r.prediction,
                        "target": r.target,
                        "reward": r.reward,
                        "correct": bool(r.correct),
                        **({"status": r.status} if r.status is not None else {}),
                    }
                    f.write(json.dumps(line) + "\n")
    return metrics
