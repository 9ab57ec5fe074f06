"""The training objectives of `rpt train`, one module each, and what they share.

    rpt          grpo.py        GRPO with the prefix reward (RPT); its fused one-token step: fused_step.py
    rlp          rlp.py         RLP: a thought before the next token, rewarded by its information gain
                                over an EMA copy of the policy that does not think (arXiv 2510.01265)
    rmt          grpo.py        rpt with RMT's options on (arXiv 2509.24375): rmt.py, rpttrain/curriculum.py
    ntp          ntp.py         next-token cross-entropy (the baseline at equal compute)
    shaped-ntp   ntp.py         the reward-shaped next-token loss (arXiv 2512.22955)

    algos.py          the math, as small pure tensor functions (advantages, clip, KL, aggregation)
    policy_update.py  the one micro-batch policy loss every GRPO-style step calls, and the update
                      over sampled completions that runs it

An objective is an `Objective`: built by `build(config, parts)` from the trainer's
`ObjectiveParts`, its `step(step) -> rpttrain.step_record.StepResult` accumulates the gradient,
calls `parts.optimizer_step` once and returns the step's metrics, token counts and samples; the
trainer alone adds the counts to the run's totals and FLOPs and writes the step's record. State of
its own beyond the policy (RLP's EMA) goes into each checkpoint through `save_state` and comes
back in `build` from `parts.start_from`. A new objective is one module here, its name in
`OBJECTIVE_CLASSES` and `rpttrain.config.OBJECTIVES`, and its config fields.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rpttrain.precision import Precision

# objective name -> "module:class" (imported when a run builds it)
OBJECTIVE_CLASSES = {
    "rpt": "rpttrain.objectives.grpo:GRPOObjective",
    "rlp": "rpttrain.objectives.rlp:RLPObjective",
    "rmt": "rpttrain.objectives.grpo:GRPOObjective",  # rpt with RMT's options on (rmt.py)
    "ntp": "rpttrain.objectives.ntp:NextTokenObjective",
    "shaped-ntp": "rpttrain.objectives.ntp:NextTokenObjective",
}


@dataclass
class ObjectiveParts:
    """What the trainer hands an objective: the policy in its master dtype, its tokenizer, the data
    sampler, the precision, the device, the rollout engine's name (`rptdata.engine_choice`, chosen
    before anything loads; None for objectives that do not sample), the checkpoint the run resumes
    from (None: a fresh start) and the trainer's optimizer step (clip, skip a non-finite update,
    AdamW, schedule)."""

    model: object
    tokenizer: object
    sampler: object
    precision: Precision
    device: str
    optimizer_step: Callable[[float], tuple[float, bool]]
    engine: str | None = None
    start_from: Path | None = None


class Objective:
    """What the trainer calls on an objective (see the module docstring)."""

    # metrics shown beside the progress bar
    progress_keys: tuple[str, ...] = ()

    @classmethod
    def build(cls, config, parts: ObjectiveParts) -> Objective:
        raise NotImplementedError

    def step(self, step: int, batch_size: int | None = None):
        """One step on `batch_size` tasks (None: --batch-size; fewer only for a run's last step under
        --compute-budget, cut to fit the budget: `rpttrain.train.step_batch`)."""
        raise NotImplementedError

    def save_state(self, folder: Path) -> None:
        """Write the objective's own state into a checkpoint folder being written (none by default)."""

    def close(self) -> None:
        """Release what the objective holds (a rollout engine)."""


def objective_class(name: str):
    module, cls = OBJECTIVE_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_objective(config, parts: ObjectiveParts):
    """The objective --objective names, built from the trainer's parts."""
    return objective_class(config.objective).build(config, parts)
