"""The `rpt` objective: one GRPO step over RPT tasks, as named, timed phases (paper Sec. 3.2).

    rollout    B contexts x G samples from the rollout engine (transformers or vLLM)
    reward     the prompt format's extraction + `rpttrain.reward` (prefix / first-token, or App. A's
               dense / conditional-dense with P(y[0] | x<t) from the policy: `rpttrain.dense`)
    advantage  group-normalized advantages (`rpttrain.algos`); dynamic sampling (DAPO) refills
               the batch with groups whose rewards differ, from step --dynamic-sampling-from
    update     clipped policy-gradient loss over completion tokens, micro-batched by a token
               budget, then the trainer's optimizer step (clip, skip non-finite, AdamW)

Log-probs for the update come from the training model itself; the engine's own log-probs are only
compared with them (`logprob_mismatch`), never trained on. One on-policy update per batch, so the
ratio is 1 and old log-probs equal the current ones (the clip is still applied as written).
When every completion is one token, each distinct prompt runs once in the update and its G samples
share the logits (the same numbers, G times less compute). With the in-process transformers engine
the one-token step is fused (`--fused-one-token`, on by default): the samples are drawn from the
update's own forward pass (the policy has not changed yet), so a step costs one forward + backward
instead of a rollout forward, then the update's forward + backward. Every prompt's samples come
from a generator seeded by the prompt alone (`rollout.prompt_seed`), so the fused and the two-pass
step draw the same samples. Not fused while dynamic sampling may drop groups (their forward would
be spent for nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rptdata.models import local_model_dir
from rptdata.tasks.live import predicted_zero_variance
from rpttrain import algos
from rpttrain.batching import last_positions_logits, plan_batches
from rpttrain.dense import GroupScorer
from rpttrain.fused_step import fused_rollout_and_update
from rpttrain.precision import Precision, dtype_name
from rpttrain.prompts import load_prompt_format, task_prompt_ids
from rpttrain.rollout import Sampling, make_engine, stop_ids
from rpttrain.step_record import record_step


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


class GRPOObjective:
    """One GRPO step: generate, reward, advantage, accumulate the policy-gradient; the trainer owns
    the model, optimizer, data, checkpoints and the cumulative totals this step adds to."""

    def __init__(
        self,
        config,
        model,
        tokenizer,
        engine,
        sampler,
        precision: Precision,
        optimizer_step: Callable,
        totals: dict,
        n_params: int,
        samples_path: Path,
        ref_model=None,
    ):
        self.config = config
        self.model, self.tokenizer, self.engine, self.sampler = model, tokenizer, engine, sampler
        self.precision, self.optimizer_step, self.totals, self.n_params = precision, optimizer_step, totals, n_params
        self.samples_path, self.ref_model = samples_path, ref_model
        self.fmt = load_prompt_format(config.prompt_template)
        self.scorer = GroupScorer(
            config.reward, self.fmt, tokenizer, model, config.max_prompt_tokens, config.micro_batch_tokens
        )
        self.stops = stop_ids(tokenizer)

    def close(self) -> None:
        self.engine.close()

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
        rewards = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float32)
        adv = algos.group_advantages(rewards, scale=self.config.scale_rewards)
        for g, a in zip(groups, adv.tolist()):
            for r, x in zip(g, a):
                r.advantage = x

    def update(self, rollouts: list[Rollout]) -> dict:
        c = self.config
        rollouts = [r for r in rollouts if r.completion_ids]
        stats = {"clip_frac": 0.0, "logprob_mismatch": None, "kl": 0.0, "loss": 0.0, "update_tokens": 0}
        if not rollouts:
            return {**stats, "grad_norm": 0.0, "skipped": False}
        all_mask = torch.zeros(len(rollouts), max(len(r.completion_ids) for r in rollouts))
        for i, r in enumerate(rollouts):
            all_mask[i, : len(r.completion_ids)] = 1
        denom = algos.loss_denominator(all_mask, c.loss_agg, max_len=c.max_new_tokens)
        clipped = total = 0.0
        mismatch_sum, mismatch_n = 0.0, 0
        for mb in self.micro_batches(rollouts):
            batch = [rollouts[i] for i in mb]
            with self.precision.autocast():  # log-probs and the loss come out in float32
                logp, mask = self.completion_logprobs(self.model, batch)
                old = logp.detach()  # one on-policy update per batch: old policy == current policy
                adv = torch.tensor([r.advantage for r in batch], dtype=torch.float32, device=logp.device)
                loss_tok, was_clipped = algos.policy_loss(logp, old, adv, c.clip_eps, c.clip_eps_high)
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref, _ = self.completion_logprobs(self.ref_model, batch)
                    kl = algos.kl_k3(logp, ref)
                    loss_tok = loss_tok + c.kl_coef * kl
                    stats["kl"] += float((kl * mask).sum())
                loss = algos.aggregate_loss(loss_tok, mask, c.loss_agg, denom)
            loss.backward()
            stats["loss"] += float(loss.detach())
            clipped += float((was_clipped.float() * mask).sum())
            total += float(mask.sum())
            stats["update_tokens"] += self.forward_tokens(batch)
            for j, r in enumerate(batch):
                if r.engine_logprobs:
                    n = min(len(r.engine_logprobs), int(mask[j].sum()))
                    eng = torch.tensor(r.engine_logprobs[:n])
                    mismatch_sum += float((eng - old[j, :n].cpu()).abs().sum())
                    mismatch_n += n
        grad_norm, bad = self.optimizer_step(stats["loss"])
        stats.update(
            clip_frac=clipped / max(total, 1),
            kl=stats["kl"] / max(total, 1),
            grad_norm=grad_norm,
            skipped=bad,
            logprob_mismatch=(mismatch_sum / mismatch_n) if mismatch_n else None,
        )
        return stats

    # -- the update's forward -----------------------------------------------------------------
    @staticmethod
    def single_token(batch: list[Rollout]) -> bool:
        return all(len(r.completion_ids) == 1 for r in batch)

    def forward_tokens(self, batch: list[Rollout]) -> int:
        """Tokens the update's forward actually runs (a shared prompt counts once on the fast path)."""
        if self.single_token(batch):
            return sum(len(p) for p in {tuple(r.prompt_ids) for r in batch})
        return sum(len(r.prompt_ids) + len(r.completion_ids) for r in batch)

    def micro_batches(self, rollouts: list[Rollout]) -> list[list[int]]:
        """Micro-batches of at most micro_batch_tokens padded tokens; on the one-token path the
        samples of a prompt are one row and stay together."""
        widths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
        keys = [tuple(r.prompt_ids) for r in rollouts] if self.single_token(rollouts) else None
        return plan_batches(widths, max_tokens=self.config.micro_batch_tokens, row_keys=keys)

    def completion_logprobs(self, model, batch: list[Rollout]):
        """Log-probs [N, T] (left-aligned) and mask of each completion token under `model` at the
        sampling temperature; only the last T+1 positions go through the LM head."""
        temperature = self.config.temperature
        if self.single_token(batch):
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

    # -- the fused one-token step (rpttrain/fused_step.py) --------------------------------------
    def fused(self, step: int) -> bool:
        c = self.config
        return (
            c.fused_one_token
            and c.max_new_tokens == 1
            and self.engine.name == "hf"
            and not 0 <= c.dynamic_sampling_from <= step
        )

    # -- the step -----------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        c = self.config
        timings = {"rollout_s": 0.0, "reward_s": 0.0, "advantage_s": 0.0, "update_s": 0.0, "weight_sync_s": 0.0}
        t0 = time.time()
        scored_before = self.scorer.forward_tokens
        if self.fused(step):
            tasks = self.sampler.take(c.batch_size)
            all_groups, upd = fused_rollout_and_update(self, tasks, step, timings)
            timings["update_s"] = time.time() - t0 - timings["rollout_s"] - timings["reward_s"]
            zero_var = sum(max(r.reward for r in g) == min(r.reward for r in g) for g in all_groups)
            counts = {
                "drawn": len(tasks),
                "rounds": 1,
                "zero_var": zero_var,
                "kept": len(all_groups),
                "forward_tokens": 0,
                "predicted_zero_var": predicted_zero_variance(tasks, c.group_size),
            }
        else:
            all_groups, upd, counts = self.two_pass(step, timings)
        counts["forward_tokens"] += self.scorer.forward_tokens - scored_before  # the dense rewards' P(y[0] | x<t)
        return record_step(self, step, all_groups, upd, counts, timings, t0)

    def two_pass(self, step: int, timings: dict) -> tuple[list[list[Rollout]], dict, dict]:
        """Rollouts (with dynamic sampling's extra rounds), rewards, advantages, then the update."""
        c = self.config
        dynamic = 0 <= c.dynamic_sampling_from <= step
        kept: list[list[Rollout]] = []
        all_groups: list[list[Rollout]] = []
        drawn = rounds = zero_var = forward_tokens = 0
        all_tasks: list[dict] = []
        while True:
            tasks = self.sampler.take(c.batch_size)
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
            if not dynamic or len(kept) >= c.batch_size or rounds > c.dynamic_sampling_rounds:
                break
        kept = kept[: c.batch_size]
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
