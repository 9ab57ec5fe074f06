"""TRL's GRPOTrainer, bent to rpt's contract (imports trl; rpttrain/backends/trl.py drives it).

- `RptGRPOTrainer._tokenize_prompts`: the dataset's `prompt` column holds the raw task context;
  each prompt is rendered and cut exactly as `rpt train` does (`rpttrain.prompts.build_prompt_ids`:
  the prompt format, the chat template, at most max_prompt_tokens, losing the context's start).
  TRL itself has no prompt-length limit and would add special tokens to a raw prompt.
- Dynamic sampling (DAPO), from step `dynamic_sampling_from` on: a group whose G rewards are all
  equal has advantage 0 and no signal; its completions are masked out of the loss (and of the
  token count that normalizes it), so they no longer dilute the groups that carry signal.
  Unlike `rpt train`, the batch is NOT refilled with new groups (TRL draws one generation batch
  per step); `groups_trained` in metrics.jsonl says how many groups each step kept.
- `RptReward`: the TRL reward function (named "rpt"): the prompt format's extraction and the
  rpt reward; it also logs accuracy and no_prediction_share, and writes samples.jsonl (the rpt
  backend's fields but `correct`; older runs' lines lack context, target and band).
- `RunLog`: a callback that writes metrics.jsonl with the rpt backend's keys, and links each TRL
  checkpoint as RUN/checkpoints/step-N with a state.json, so `rpt plot` and `rpt eval
  --checkpoints RUN` read a TRL run like an rpt one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from rptdata.math_answers import DEFAULT_TIMEOUT_S, check_answer
from rpttrain.prompts import PromptFormat, build_prompt_ids
from rpttrain.reward import ANSWER_REWARDS, get_reward_fn

# TRL's log key -> the rpt backend's metrics.jsonl key
METRIC_KEYS = {
    "reward": "reward_mean",
    "accuracy": "accuracy",
    "frac_reward_zero_std": "zero_variance_share",
    "groups_trained": "groups_trained",
    "completions/mean_length": "completion_len_mean",
    "completions/max_length": "completion_len_max",
    "completions/clipped_ratio": "truncated_share",
    "no_prediction_share": "no_prediction_share",
    "clip_ratio/region_mean": "clip_frac",
    "kl": "kl",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "lr",
    "step_time": "step_s",
    "entropy": "entropy_mean",
}


class RptReward:
    """rpt's reward for TRL: one float per completion, from the `continuation` and `boundaries`
    columns; the prediction is the prompt format's extraction of the completion text (the math
    reward: math-verify's reading of the final answer, with its checks' timeouts and errors logged)."""

    __name__ = "rpt"  # TRL logs rewards/rpt/mean

    def __init__(self, fmt: PromptFormat, reward: str, samples_path: Path | None, sample_every: int):
        self.fmt, self.reward, self.reward_fn = fmt, reward, get_reward_fn(reward)
        self.samples_path, self.sample_every = samples_path, sample_every

    def __call__(
        self, prompts, completions, continuation, boundaries, band=None, trainer_state=None, log_metric=None, **_
    ):
        statuses = None
        if self.reward in ANSWER_REWARDS:  # the same check as rpt's trainer (rpttrain.dense.GroupScorer)
            verdicts = [check_answer(c, answer, DEFAULT_TIMEOUT_S) for c, answer in zip(completions, continuation)]
            preds, rewards = [v.extracted for v in verdicts], [v.reward for v in verdicts]
            statuses = [v.status for v in verdicts]
        else:
            preds = [self.fmt.extract(c) for c in completions]
            rewards = [self.reward_fn(p, cont, list(b)) for p, cont, b in zip(preds, continuation, boundaries)]
        if log_metric is not None:
            log_metric("accuracy", sum(r == 1.0 for r in rewards) / len(rewards))
            log_metric("no_prediction_share", sum(p is None for p in preds) / len(preds))
            if statuses is not None:
                log_metric("verify_timeouts", statuses.count("timeout"))
                log_metric("verify_errors", statuses.count("error"))
        step = (trainer_state.global_step + 1) if trainer_state is not None else 0
        if self.samples_path and self.sample_every and step % self.sample_every == 0 and _is_main():
            bands = band or [None] * len(completions)
            with self.samples_path.open("a") as f:
                for j in range(min(16, len(completions))):
                    line = {
                        "step": step,
                        **({"band": bands[j]} if bands[j] is not None else {}),
                        "context": prompts[j],  # the raw task context (the dataset's prompt column)
                        "completion": completions[j],
                        "prediction": preds[j],
                        "target": continuation[j],
                        "reward": rewards[j],
                        **({"status": statuses[j]} if statuses is not None else {}),
                    }
                    f.write(json.dumps(line) + "\n")
        return rewards


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class RptGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with rpt's prompt rendering and drop-only dynamic sampling (module docstring)."""

    def __init__(self, *args, rpt_format: PromptFormat, max_prompt_tokens: int, dynamic_sampling_from: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rpt_format, self.rpt_max_prompt_tokens = rpt_format, max_prompt_tokens
        self.rpt_dynamic_from = dynamic_sampling_from
        self._rpt_rewards = None

    def _tokenize_prompts(self, prompts: list):
        ids = [build_prompt_ids(self.rpt_format, p, self.processing_class, self.rpt_max_prompt_tokens) for p in prompts]
        return ids, None, {}

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rpt_rewards = rewards  # gathered over processes, in generation-batch order
        return rewards

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        g = self.num_generations
        rewards = torch.nansum(self._rpt_rewards, dim=1).view(-1, g)
        flat = (rewards.amax(dim=1) == rewards.amin(dim=1)).repeat_interleave(g)
        dynamic = 0 <= self.rpt_dynamic_from <= self.state.global_step
        if dynamic:
            n = out["completion_mask"].size(0)
            rank = self.accelerator.process_index
            keep = (~flat[rank * n : (rank + 1) * n]).to(out["completion_mask"].dtype)
            out["completion_mask"] = out["completion_mask"] * keep.unsqueeze(1)
            out["num_items_in_batch"] = self.accelerator.gather(out["completion_mask"].sum()).sum()
        groups = rewards.size(0)
        kept = groups - int(flat.view(-1, g)[:, 0].sum()) if dynamic else groups
        self._metrics["train"]["groups_trained"].append(float(kept))
        return out


class RunLog(TrainerCallback):
    """metrics.jsonl lines with the rpt backend's keys, and rpt-style checkpoint entries."""

    def __init__(self, run_dir: Path, n_params: int, compute_budget: float | None):
        self.run_dir, self.n_params, self.compute_budget = run_dir, n_params, compute_budget
        self.last_tokens = None

    def flops(self, state) -> float:
        # every sample's prompt + completion tokens: 2N in the rollout, 6N in the update (what runs)
        return 8.0 * self.n_params * float(state.num_input_tokens_seen)

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs or "loss" not in logs:
            return
        tokens = state.num_input_tokens_seen - (self.last_tokens or 0)
        self.last_tokens = state.num_input_tokens_seen
        line = {"step": state.global_step}
        line.update({ours: logs[theirs] for theirs, ours in METRIC_KEYS.items() if theirs in logs})
        line.update(
            update_tokens=int(tokens),
            flops=8.0 * self.n_params * tokens,
            flops_total=self.flops(state),
            skipped_update=False,
            trl=logs,
        )
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")

    def on_step_end(self, args, state, control, **kwargs):
        if self.compute_budget is not None and self.flops(state) >= self.compute_budget:
            control.should_save = control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rpttrain.checkpoint import link_checkpoint

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        totals = {"flops": self.flops(state), "update_tokens": int(state.num_input_tokens_seen)}
        link_checkpoint(self.run_dir, folder, state.global_step, {"totals": totals, "n_params": self.n_params})
