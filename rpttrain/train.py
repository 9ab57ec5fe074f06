"""`rpt train`: the training loop, shared by the objectives (`rpttrain.objectives`).

    run_train(TrainConfig(tasks_dir="out/tasks", out="out/run", model="smollm2-135m", ...)) -> summary

The loop owns the run: the run directory (claimed like every stage's: refuse, resume, overwrite),
the model in its master dtype, AdamW and the schedule, the data sampler, the optimizer step
(clip, skip non-finite updates and count them), signals, logging and checkpoints. One step of the
objective (`objectives.grpo.GRPOObjective` for `rpt`, `objectives.rlp.RLPObjective` for `rlp`,
`objectives.ntp.NextTokenObjective` for `ntp` and `shaped-ntp`) accumulates gradients and returns its metrics and token counts; the loop
alone adds those to the run's totals and FLOPs and writes the step's record
(`rpttrain.step_record`); options: `rpttrain.config`.

The run directory holds config.yaml (the resolved config), run.json (the identity a resume must
match), trained_on.json (what the run trained on, read by `rpt eval`), metrics.jsonl (one line per
step), samples.jsonl (completions every --sample-every steps), checkpoints/ (`rpttrain.checkpoint`)
and, by --report-to (`rpttrain.report_to`), tb/ (when tensorboard is installed) and wandb/.

Compute accounting (FLOPs, logged per step and cumulatively; N = model parameters):
    6 * N per token through the update's forward+backward (a prompt shared by a group's samples
    counts once on the one-token fast path), plus 2 * N per token the rollout engine runs through
    the model (`RolloutEngine.forward_tokens`: one-token rollouts and vLLM's shared prefill run a
    prompt once per group, transformers generate() n times; plus the fed-back generated tokens).
    RLP adds 2 * N per token of its two scoring forwards (with the thought, and the EMA's
    without it). Counting what runs, not prompt x samples, keeps the objectives comparable.

Precision (`rpttrain.precision`): bf16 compute over float32 master weights on GPU by default.
Left out on purpose: multi-GPU (`rpt train --backend verl|trl`), sequence packing, a value model
(GRPO needs none), and PPO epochs > 1 (the paper does one on-policy update per batch).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from rptdata import faults
from rptdata.engine_choice import choose_engine
from rptdata.errors import RptError
from rptdata.io import STAGE_TRAIN, truncate_jsonl, write_json_atomic, write_text_atomic
from rptdata.models import load_causal_lm, resolve_device
from rptdata.stage import claim_run_dir
from rpttrain.checkpoint import (
    checkpoint_origin,
    list_checkpoints,
    load_master_weights,
    load_trainer_state,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from rpttrain.config import TrainConfig, config_from_dict  # noqa: F401  (the config of this loop)
from rpttrain.curriculum import make_sampler
from rpttrain.data import (
    DATA_CACHE,
    TRAINED_ON,
    DocWindows,
    TaskRows,
    open_tasks,
    policy_tokenizer,
    trained_on_record,
)
from rpttrain.objectives import ObjectiveParts, build_objective
from rpttrain.precision import dtype_name, resolve_precision
from rpttrain.preflight import PREFLIGHT, RunPreflight
from rpttrain.report_to import WANDB_DIR, check_reporters, open_loggers
from rpttrain.step_record import record_step

log = logging.getLogger(__name__)

# what `rpt train` writes under its run directory (removed by --overwrite; nothing else is)
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "samples.jsonl",
    "tb",
    WANDB_DIR,
    "summary.json",
    "config.yaml",
    TRAINED_ON,
    DATA_CACHE,
    PREFLIGHT,
)


def step_batch(spent: float, steps: int, batch_size: int, budget: float | None) -> int:
    """How many tasks the next step draws under --compute-budget: --batch-size, except the step that
    reaches the budget, cut to the tasks the rest of the budget buys at the run's mean cost a task
    (at least one). So a run ends within about half a task's cost of the budget, not a whole step's
    (the first step has no cost to go by: a budget below one step is overshot by it).

    >>> step_batch(0.0, 0, 8, 100.0), step_batch(80.0, 2, 8, 100.0), step_batch(80.0, 2, 8, 200.0)
    (8, 4, 8)
    >>> step_batch(80.0, 2, 8, None), step_batch(99.0, 2, 8, 100.0)
    (8, 1)
    """
    if budget is None or steps == 0 or spent <= 0:
        return batch_size
    per_task = spent / (steps * batch_size)
    return max(1, min(batch_size, round((budget - spent) / per_task)))


def budget_reached(spent: float, steps: int, batch_size: int, budget: float | None) -> bool:
    """Whether a run with --compute-budget stops after its `steps`-th step: when what is left of the
    budget buys less than half a task at the run's mean cost a task (`step_batch` cut the last
    step to fit).

    >>> budget_reached(100.0, 2, 8, 102.0), budget_reached(100.0, 2, 8, 110.0), budget_reached(5.0, 1, 8, None)
    (True, False, False)
    """
    if budget is None:
        return False
    return budget - spent < spent / max(steps * batch_size, 1) / 2


class TrainingDiverged(RptError):
    """Too many consecutive non-finite losses or gradients."""


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.run_dir = Path(config.out)
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.compute_dtype, config.master_dtype, self.device)
        self.tasks_manifest = open_tasks(config)
        self.started_from = checkpoint_origin(config.model)  # another run's checkpoint, when it is one
        self.stop_flag = False

    # -- setup --------------------------------------------------------------------------------
    def setup(self, resume: bool, overwrite: bool) -> None:
        c = self.config
        engine = choose_engine(c.engine, self.device) if c.samples_rollouts else None
        check_reporters(c.report_to)  # a missing wandb stops here, before anything loads
        self.tokenizer = policy_tokenizer(c, self.tasks_manifest)
        # before anything is loaded or written: a run that cannot fit stops here (`rpttrain.preflight`)
        self.memory = RunPreflight.plan(c, self.device, self.precision, self.tasks_manifest, self.tokenizer)
        checkpoints = self._claim_run_dir(resume, overwrite)
        self.memory.start(self.run_dir)  # RUN/preflight.json; what the run adds from here on is measured
        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        start_from = checkpoints[-1] if (resume and checkpoints) else None
        if start_from:  # sizes and checksums of its weights and optimizer state, before loading them
            verify_checkpoint(start_from, checkpoints[-2] if len(checkpoints) > 1 else None)
        self._load_model(start_from)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay
        )
        warm = max(c.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
        self.step = 0
        self.totals = {"flops": 0.0, "update_tokens": 0, "rollout_tokens": 0, "rollout_forward_tokens": 0, "samples": 0}
        cursor = {"epoch": 0, "offset": 0}
        if start_from:
            state = load_trainer_state(start_from, self.optimizer, self.scheduler)
            self.step, cursor, self.totals = state["step"], state["cursor"], state["totals"]
            log.info("resumed from %s", start_from)
        # lines logged after the step this run starts from are redone: all of them when it starts
        # afresh (a run killed while writing its first checkpoint counts as "resume" but has none)
        truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
        truncate_jsonl(self.run_dir / "samples.jsonl", self.step)
        cache = self.run_dir / DATA_CACHE
        if c.on_documents:
            source = DocWindows(self.tasks_manifest, c.max_prompt_tokens, cache)
        else:
            source = TaskRows(c.tasks_dir, cache)
        self.sampler = make_sampler(c, source, self.tasks_manifest, cursor)
        parts = ObjectiveParts(
            self.model,
            self.tokenizer,
            self.sampler,
            self.precision,
            self.device,
            self._optimizer_step,
            engine,
            start_from,
        )
        self.objective = build_objective(c, parts)
        self.loggers = open_loggers(c.report_to, self.run_dir, asdict(c))  # tensorboard, wandb (--report-to)
        faults.hit("begin")

    def _claim_run_dir(self, resume: bool, overwrite: bool) -> list[Path]:
        """Refuse another run's directory, resume this one's, or clear it with --overwrite (the
        rules of `rptdata.stage.claim_run_dir`, shared by every stage); then write config.yaml
        and trained_on.json. Returns the complete checkpoints to resume from."""
        c = self.config
        identity = {"train": c.identity(), "tasks": self.tasks_manifest.get("fingerprint")}
        status = claim_run_dir(
            self.run_dir,
            STAGE_TRAIN,
            identity,
            own=RUN_OUTPUTS,
            overwrite=overwrite,
            resume=resume,
            progress=("checkpoints/step-*/state.json",),
        )
        if status == "new":  # lines of a run that died before its first checkpoint are redone
            for name in ("metrics.jsonl", "samples.jsonl"):
                (self.run_dir / name).unlink(missing_ok=True)
        _write_yaml(self.run_dir / "config.yaml", asdict(c))
        # what this run trains on, for `rpt eval`'s held-out check
        write_json_atomic(
            self.run_dir / TRAINED_ON,
            trained_on_record(c.objective, c.ntp_positions, c.tasks_dir, self.tasks_manifest, self.started_from),
        )
        return list_checkpoints(self.run_dir) if status == "resume" else []

    def _load_model(self, start_from: Path | None) -> None:
        """Tokenizer (checked against the tasks'), then the policy in the master dtype: from the
        base model, or a checkpoint's HF folder overwritten by its exact master weights."""
        c = self.config
        master = dtype_name(self.precision.master)
        source = str(start_from) if start_from else c.model
        self.model = load_causal_lm(source, dtype=master, device=self.device, trust_remote_code=c.trust_remote_code)
        if start_from and load_master_weights(start_from, self.model):
            log.info("resumed the exact %s master weights of %s", master, start_from.name)
        elif not start_from and self.started_from and load_master_weights(Path(c.model), self.model):
            log.info("started from the exact %s master weights of %s", master, c.model)
        if c.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def _optimizer_step(self, loss: float) -> tuple[float, bool]:
        """Clip, then step, unless the loss or gradient is not finite (then skip and say so); then
        drop the gradients. A step's gradient is its own: left in place, the clipped gradient of
        step k would be added to step k+1's by the next backward, in a run that is not interrupted
        but not in one resumed from step k's checkpoint (which holds no gradients)."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip))
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not bad:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return grad_norm, bad

    # -- loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        c = self.config
        bad_in_a_row = 0
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._on_signal)
        bar = tqdm(
            total=c.steps, initial=self.step, desc="train", unit="step", disable=not c.progress, dynamic_ncols=True
        )
        stopped_by = None
        try:
            while self.step < c.steps:
                metrics = self.train_step()
                self.step += 1
                metrics["step"] = self.step
                self._log(metrics)
                faults.hit("train-step")
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:.3f}" for k in self.objective.progress_keys})
                bad_in_a_row = bad_in_a_row + 1 if metrics["skipped_update"] else 0
                if bad_in_a_row >= c.max_bad_steps:
                    self.save()
                    raise TrainingDiverged(
                        f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at step "
                        f"{self.step}); stopped. Lower --lr, or check the tasks and the model's dtype."
                    )
                budget_hit = budget_reached(self.totals["flops"], self.step, c.batch_size, c.compute_budget)
                if self.step % c.save_every == 0 or self.step == c.steps or budget_hit or self.stop_flag:
                    self.save()
                if budget_hit:
                    stopped_by = "compute_budget"
                    break
                if self.stop_flag:
                    stopped_by = "signal"
                    break
        finally:
            bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
            self.loggers.close()
        prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
        summary = {"steps": self.step, "stopped_by": stopped_by, "totals": self.totals, "run_dir": str(self.run_dir)}
        if c.compute_budget is not None:  # how close to the budget the run ended
            summary["compute_budget"] = c.compute_budget
            summary["flops_of_budget"] = round(self.totals["flops"] / c.compute_budget, 4)
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.memory.finish()
        return summary

    def _on_signal(self, signum, frame) -> None:
        log.warning("signal %s: finishing the current step, then saving a checkpoint", signum)
        self.stop_flag = True

    def train_step(self) -> dict:
        """One step of the objective; its counts added to the run's totals, its samples written."""
        c = self.config
        self.sampler.at_step(self.step)
        batch = step_batch(self.totals["flops"], self.step, c.batch_size, c.compute_budget)
        result = self.objective.step(self.step, batch)
        metrics = record_step(result, self.step, self.totals, self.n_params, self.run_dir, c.sample_every)
        if batch != c.batch_size:  # the last step of a --compute-budget run, cut to fit the budget
            metrics["batch_size"] = batch
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _log(self, metrics: dict) -> None:
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.loggers.log(metrics, metrics["step"])

    def save(self) -> Path:
        # a checkpoint must hold the whole training state; a pending gradient is state it does not
        # hold, which a resumed run would lack (it diverged from the uninterrupted run by that much)
        pending = [n for n, p in self.model.named_parameters() if p.grad is not None]
        if pending:
            raise RuntimeError(f"gradients pending at a checkpoint (e.g. {pending[0]}): --resume would not be exact")
        return save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            {
                "cursor": self.sampler.cursor(),
                "totals": self.totals,
                "n_params": self.n_params,
                "precision": self.precision.describe(),
            },
            keep=self.config.keep_checkpoints,
            hf_dtype=self.precision.compute,
            objective_state=self.objective.save_state,
        )


def run_train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    trainer = Trainer(config)
    trainer.setup(resume=resume, overwrite=overwrite)
    try:
        return trainer.run()
    finally:
        trainer.objective.close()


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
