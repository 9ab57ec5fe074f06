"""The `rpt` objective: one GRPO step over RPT tasks, as named, timed phases (paper Sec. 3.2).

    rollout    B contexts x G samples from the rollout engine (transformers or vLLM)
    reward     the prompt format's extraction + `rpttrain.reward` (prefix / first-token, or App. A's
               dense / conditional-dense with P(y[0] | x<t) from the policy: `rpttrain.dense`)
    advantage  group-normalized advantages (`objectives.algos`); dynamic sampling (DAPO) refills
               the batch with groups whose rewards differ, from step --dynamic-sampling-from
    update     clipped policy-gradient loss over completion tokens (the shared
               `objectives.policy_update.PolicyUpdate`), micro-batched by a token budget, then the
               trainer's optimizer step (clip, skip non-finite, AdamW)
    record     the step's metrics, token counts and samples (`step_result`), which the trainer
               adds to the run's totals and FLOPs and writes (`rpttrain.step_record`)

Log-probs for the update come from the training model itself; the engine's own log-probs are only
compared with them (`logprob_mismatch`), never trained on. One on-policy update per batch, so the
ratio is 1 and old log-probs equal the current ones (the clip is still applied as written).
When every completion is one token, each distinct prompt runs once in the update and its G samples
share the logits (the same numbers, G times less compute). With the in-process transformers engine
the one-token step is fused (`--fused-one-token`, on by default): the samples are drawn from the
update's own forward pass (the policy has not changed yet), so a step costs one forward + backward
instead of a rollout forward, then the update's forward + backward. Every prompt's samples come
from a generator seeded by the prompt alone (`rollout.prompt_seed`), so the fused and the two-pass
step draw the same samples (`objectives.fused_step`). Not fused while dynamic sampling may drop
groups (their forward would be spent for nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rptdata.models import load_causal_lm, local_model_dir
from rptdata.tasks.live import predicted_zero_variance
from rpttrain.collapse import collapse_metrics
from rpttrain.dense import GroupScorer
from rpttrain.judge import judge_from_options
from rpttrain.objectives import Objective, ObjectiveParts, algos, rmt
from rpttrain.objectives.fused_step import fused_rollout_and_update
from rpttrain.objectives.policy_update import PolicyUpdate, policy_gradient_update, set_advantages
from rpttrain.precision import Precision, dtype_name
from rpttrain.prompts import load_prompt_format, task_prompt_ids
from rpttrain.rollout import Sampling, make_engine, stop_ids
from rpttrain.step_record import StepResult


@dataclass
class Rollout:
    """One sampled completion and what the update needs from it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    reward: float
    advantage: float
    prediction: str | None
    truncated: bool
    engine_logprobs: list[float] | None
    correct: bool = False
    context: str = ""  # the task's, for samples.jsonl
    target: str = ""  # the task's continuation, for samples.jsonl
    status: str | None = None  # the math reward's check: ok | no_answer | timeout | error
    band: str | None = None  # the task's entropy band, for samples.jsonl (answer tasks: None)


def build_engine(config, engine: str, model, tokenizer, precision: Precision, start_from: Path | None):
    """The rollout engine: transformers shares the training model (generating in the compute
    dtype); vLLM loads its own copy (from the resumed checkpoint when there is one) and gets the
    trained weights cast to its dtype at every sync."""
    if engine == "vllm":
        eng = make_engine(
            "vllm",
            model,
            tokenizer,
            model_path=str(start_from) if start_from else local_model_dir(config.model),
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            seed=config.seed,
            dtype=dtype_name(precision.compute),
        )
        if start_from:
            eng.update_weights(model)
        return eng
    return make_engine("hf", model, tokenizer, compute_dtype=precision.compute)


def reference_model(config, precision: Precision, device: str):
    """The frozen base policy for the KL term; none at all when --kl-coef is 0 (the paper's)."""
    if config.kl_coef <= 0:
        return None
    ref = load_causal_lm(config.model, dtype=dtype_name(precision.compute), device=device).eval()
    return ref.requires_grad_(False)


class GRPOObjective(Objective):
    """One GRPO step: generate, reward, advantage, accumulate the policy-gradient, then the
    trainer's optimizer step. Returns the step's metrics, token counts and samples
    (`rpttrain.step_record.StepResult`); the trainer owns the model, optimizer, data, checkpoints,
    the run's totals and what is written."""

    progress_keys = ("reward_mean", "zero_variance_share")

    def __init__(
        self,
        config,
        model,
        tokenizer,
        engine,
        sampler,
        precision: Precision,
        optimizer_step: Callable,
        ref_model=None,
        judge=None,
    ):
        self.config = config
        self.model, self.tokenizer, self.engine, self.sampler = model, tokenizer, engine, sampler
        self.precision, self.optimizer_step, self.ref_model = precision, optimizer_step, ref_model
        self.fmt = load_prompt_format(config.prompt_template)
        self.judge = judge
        self.scorer = GroupScorer(
            config.reward, self.fmt, tokenizer, model, config.max_prompt_tokens, config.micro_batch_tokens, judge=judge
        )
        self.stops = stop_ids(tokenizer)
        self.base_fmt, self.budget, self.ntp_stats = self.fmt, None, {}

    @classmethod
    def build(cls, config, parts: ObjectiveParts) -> GRPOObjective:
        """The rollout engine (`parts.engine`), the reference model (--kl-coef > 0), then the objective."""
        return cls(
            config,
            parts.model,
            parts.tokenizer,
            build_engine(config, parts.engine, parts.model, parts.tokenizer, parts.precision, parts.start_from),
            parts.sampler,
            parts.precision,
            parts.optimizer_step,
            ref_model=reference_model(config, parts.precision, parts.device),
            judge=judge_from_options(
                config, parts.device, parts.engine or "hf", config.compute_dtype, config.vllm_gpu_memory_utilization
            ),
        )

    def close(self) -> None:
        self.engine.close()
        if self.judge is not None:
            self.judge.close()

    # -- phases -------------------------------------------------------------------------------
    def sampling(self, step: int, round_index: int) -> Sampling:
        c = self.config
        return Sampling(
            n=c.group_size,
            temperature=c.temperature,
            top_p=c.top_p,
            max_new_tokens=c.max_new_tokens,
            seed=c.seed * 1_000_003 + step * 101 + round_index,
            stop_token_ids=self.stops,
        )

    def prompts(self, tasks: list[dict]) -> list[list[int]]:
        return [task_prompt_ids(self.fmt, t, self.tokenizer, self.config.max_prompt_tokens) for t in tasks]

    def rollout(self, tasks: list[dict], step: int, round_index: int) -> tuple[list, int]:
        prompts, sampling = self.prompts(tasks), self.sampling(step, round_index)
        groups = self.engine.generate(prompts, sampling)
        return list(zip(prompts, groups)), self.engine.forward_tokens(prompts, groups, sampling)

    def score(self, tasks, prompted, last_logits=None) -> list[list[Rollout]]:
        """Rewards of each group; `last_logits` (the prompts' last position) spare the dense
        rewards their forward when the prompt is the raw context."""
        scored = self.scorer.score(tasks, [group for _, group in prompted], last_logits)
        out = []
        for task, (prompt, group), sg in zip(tasks, prompted, scored):
            if self.budget is not None:  # RMT: (1 - w) * reward + w * r_len(completion tokens; B_t)
                w = self.config.length_weight
                sg.rewards = [
                    rmt.mixed_reward(r, len(comp.token_ids), self.budget, w) for r, comp in zip(sg.rewards, group)
                ]
            out.append(
                [
                    Rollout(
                        prompt,
                        comp.token_ids,
                        comp.text,
                        r,
                        0.0,
                        pred,
                        comp.finish_reason == "length",
                        comp.logprobs,
                        ok,
                        task["context"],
                        task["continuation"],
                        None if sg.statuses is None else sg.statuses[j],
                        task.get("band"),
                    )
                    for j, (comp, pred, r, ok) in enumerate(zip(group, sg.predictions, sg.rewards, sg.correct))
                ]
            )
        return out

    def advantages(self, groups: list[list[Rollout]]) -> None:
        set_advantages(groups, self.config.scale_rewards)

    def update(self, rollouts: list[Rollout]) -> dict:
        contexts = dict.fromkeys(r.context for r in rollouts if r.completion_ids)
        return policy_gradient_update(
            rollouts,
            self.model,
            self.ref_model,
            self.precision,
            self.config,
            self.optimizer_step,
            before_step=lambda update: self.ntp_term(contexts, update),
        )

    def ntp_term(self, contexts, update: PolicyUpdate) -> None:
        """RMT's lambda * next-token loss on the batch's contexts (`objectives.rmt`), into the gradient
        and the update's loss; its tokens are update tokens (6 N FLOPs each)."""
        c = self.config
        if c.ntp_weight <= 0:
            return
        self.ntp_stats = rmt.context_ntp_backward(
            self.model,
            self.tokenizer,
            list(contexts),
            c.ntp_weight,
            c.max_prompt_tokens,
            c.micro_batch_tokens,
            self.precision,
        )
        update.loss_sum += self.ntp_stats["ntp_loss"]
        update.update_tokens += self.ntp_stats["ntp_tokens"]

    def rmt_metrics(self, groups: list[list[Rollout]]) -> dict:
        """The step's RMT values for metrics.jsonl: the budget and the mean length reward, the
        next-token term, the curriculum's band weights."""
        c, out = self.config, {}
        if self.budget is not None:
            lengths = [len(r.completion_ids) for g in groups for r in g]
            out.update(
                length_budget=self.budget,
                length_weight=c.length_weight,
                length_reward_mean=sum(rmt.length_reward(n, self.budget) for n in lengths) / max(len(lengths), 1),
            )
        if c.ntp_weight > 0:
            out.update(ntp_weight=c.ntp_weight, **self.ntp_stats)
        if c.curriculum != "none":
            out.update(self.sampler.schedule_metrics())
        return out

    # -- the fused one-token step (rpttrain/objectives/fused_step.py) ---------------------------
    def fused(self, step: int) -> bool:
        c = self.config
        return (
            c.fused_one_token
            and c.max_new_tokens == 1
            and self.engine.name == "hf"
            and not 0 <= c.dynamic_sampling_from <= step
        )

    # -- the step -----------------------------------------------------------------------------
    def step(self, step: int, batch_size: int | None = None) -> StepResult:
        c = self.config
        self.batch = batch_size or c.batch_size
        timings = {"rollout_s": 0.0, "reward_s": 0.0, "advantage_s": 0.0, "update_s": 0.0, "weight_sync_s": 0.0}
        t0 = time.time()
        if c.length_weight > 0:  # RMT: this step's budget, stated in the prompt and scored by the reward
            self.budget = rmt.length_budget(step, c.steps, c.length_budget, c.length_budget_min, c.length_budget_decay)
            self.fmt = rmt.budget_format(self.base_fmt, self.budget)
        self.ntp_stats = {}
        scored_before = self.scorer.forward_tokens
        one_pass = self.fused_pass if self.fused(step) else self.two_pass
        all_groups, upd, counts = one_pass(step, timings)
        counts["forward_tokens"] += self.scorer.forward_tokens - scored_before  # the dense rewards' P(y[0] | x<t)
        result = step_result(all_groups, upd, counts, timings, t0, math=c.reward == "math")
        result.metrics.update(self.rmt_metrics(all_groups))
        if self.judge is not None:  # its calls, cache hits, unparseable verdicts, tokens and FLOPs
            judged = self.judge.take_counts()
            result.metrics.update(judged)
            result.counts.update(judged)
        return result

    def fused_pass(self, step: int, timings: dict) -> tuple[list[list[Rollout]], dict, dict]:
        """Rollouts, rewards, advantages and the update from one forward + backward
        (`objectives.fused_step`), then the optimizer step."""
        c = self.config
        t0 = time.time()
        tasks = self.sampler.take(self.batch)
        prompts, sampling = self.prompts(tasks), self.sampling(step, 0)
        n = len(tasks) * c.group_size
        update = PolicyUpdate(c, algos.loss_denominator(torch.ones(n, 1), c.loss_agg, max_len=c.max_new_tokens))

        def score(mb: list[int], sampled, last_logits) -> list[list[Rollout]]:
            groups = self.score([tasks[i] for i in mb], list(zip([prompts[i] for i in mb], sampled)), last_logits)
            self.advantages(groups)
            return groups

        all_groups = fused_rollout_and_update(
            self.model, self.ref_model, self.precision, self.tokenizer, c, prompts, sampling, score, update, timings
        )
        self.ntp_term([t["context"] for t in tasks], update)
        # the samples come from the very log-probs the update uses: no engine mismatch to measure
        upd = update.finish(*self.optimizer_step(update.loss_sum), logprob_mismatch=0.0)
        timings["update_s"] = time.time() - t0 - timings["rollout_s"] - timings["reward_s"]
        counts = {
            "drawn": len(tasks),
            "rounds": 1,
            "zero_var": sum(max(r.reward for r in g) == min(r.reward for r in g) for g in all_groups),
            "kept": len(all_groups),
            "forward_tokens": 0,
            "predicted_zero_var": predicted_zero_variance(tasks, c.group_size),
        }
        return all_groups, upd, counts

    def two_pass(self, step: int, timings: dict) -> tuple[list[list[Rollout]], dict, dict]:
        """Rollouts (with dynamic sampling's extra rounds), rewards, advantages, then the update."""
        c = self.config
        dynamic = 0 <= c.dynamic_sampling_from <= step
        kept: list[list[Rollout]] = []
        all_groups: list[list[Rollout]] = []
        drawn = rounds = zero_var = forward_tokens = 0
        all_tasks: list[dict] = []
        while True:
            tasks = self.sampler.take(self.batch)
            drawn += len(tasks)
            all_tasks += tasks
            t = time.time()
            prompted, ran = self.rollout(tasks, step, rounds)
            forward_tokens += ran
            timings["rollout_s"] += time.time() - t
            t = time.time()
            groups = self.score(tasks, prompted)
            timings["reward_s"] += time.time() - t
            all_groups += groups
            for g in groups:
                rewards = [r.reward for r in g]
                if max(rewards) == min(rewards):
                    zero_var += 1
                    if dynamic:
                        continue
                kept.append(g)
            rounds += 1
            if not dynamic or len(kept) >= self.batch or rounds > c.dynamic_sampling_rounds:
                break
        kept = kept[: self.batch]
        t = time.time()
        self.advantages(kept) if kept else None
        timings["advantage_s"] = time.time() - t
        t = time.time()
        upd = self.update([r for g in kept for r in g])
        timings["update_s"] = time.time() - t
        t = time.time()
        if self.engine.name != "hf" and not upd["skipped"]:
            self.engine.update_weights(self.model)
        timings["weight_sync_s"] = time.time() - t
        counts = {
            "drawn": drawn,
            "rounds": rounds,
            "zero_var": zero_var,
            "kept": len(kept),
            "forward_tokens": forward_tokens,
            "predicted_zero_var": predicted_zero_variance(all_tasks, c.group_size),
        }
        return all_groups, upd, counts


def step_result(
    all_groups: list[list[Rollout]], upd: dict, counts: dict, timings: dict, t0: float, math: bool = False
) -> StepResult:
    """A GRPO step's metrics, its token counts for the run's totals (FLOPs follow from them in
    `rpttrain.step_record`: the update's tokens, and the tokens the rollout engine ran, a prompt its
    samples share counted once where the engine computes it once, none when fused), and its first
    two groups' samples (step, the task's band when it has one, context, completion, prediction,
    target, reward, correct, the math check's status; `rpt samples` shows them)."""
    rolls = [r for g in all_groups for r in g]
    gen_tokens = sum(len(r.completion_ids) for r in rolls)
    prompt_tokens = sum(len(r.prompt_ids) for r in rolls)
    forward_tokens = counts["forward_tokens"]
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
        **PolicyUpdate.metrics(upd),
        "rollout_tokens_per_s": gen_tokens / max(timings["rollout_s"], 1e-9),
        "rollout_forward_tokens": forward_tokens,
        "update_tokens": upd["update_tokens"],
        **{k: round(v, 4) for k, v in timings.items()},
        "step_s": round(time.time() - t0, 4),
    }
    totals = {
        "update_tokens": upd["update_tokens"],
        "rollout_tokens": gen_tokens + prompt_tokens,
        "rollout_forward_tokens": forward_tokens,
        "samples": len(rolls),
    }
    statuses = [r.status for r in rolls if r.status is not None]
    if statuses and math:  # the math reward: checks that ran out of time or failed scored 0 (rptdata.math_answers)
        metrics["verify_timeouts"] = totals["verify_timeouts"] = statuses.count("timeout")
        metrics["verify_errors"] = totals["verify_errors"] = statuses.count("error")
    samples = [
        {
            **({"band": r.band} if r.band is not None else {}),
            "context": r.context,
            "completion": r.text,
            "prediction": r.prediction,
            "target": r.target,
            "reward": r.reward,
            "correct": bool(r.correct),
            **({"status": r.status} if r.status is not None else {}),
        }
        for g in all_groups[:2]
        for r in g
    ]
    return StepResult(metrics, totals, samples)
