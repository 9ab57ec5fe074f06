"""The `rlp` objective: RLP, reinforcement as a pretraining objective (Hatamizadeh et al. 2025,
arXiv 2510.01265), on the same tasks and compute accounting as RPT.

    rollout    per task, G thoughts c ~ pi_theta(. | x<t) from the rollout engine, in the `rlp`
               prompt format (`rpttrain.prompts`): x<t, then " <think>"; a thought ends at its
               "</think>", a stop token or --max-new-tokens
    reward     r(c) = log p_theta(x_t | x<t, <think> c </think>) - log pbar_phi(x_t | x<t) (paper
               Eq. 3-5), both teacher-forced at temperature 1 and without gradient: the policy
               scores the observed next token after the thought (`scored_with`), the EMA copy phi
               scores it after the context alone (`scored_without`)
    advantage  A_i = G/(G-1) (r_i - mean r) (Eq. 7; --scale-rewards rloo, the default for rlp)
    update     the clipped surrogate over the thought tokens only, each thought's loss divided by
               its length (Eq. 8; --loss-agg seq-mean, the default for rlp), through the one
               micro-batch policy loss every GRPO-style objective shares
               (`objectives.policy_update`); then the trainer's optimizer step; no next-token term
    ema        phi <- tau phi + (1 - tau) theta after every optimizer step that was taken (tau =
               --ema-decay, 0.999 as in the paper; a skipped, non-finite update changes neither);
               phi starts equal to the policy. Checkpoints hold phi (ema.safetensors, float32),
               so --resume is exact

Compute (`rpttrain.step_record`): the engine's rollout tokens (2 N each), the update's forward +
backward over prompt + thought (6 N), and the two scoring forwards, with the thought (every
`scored_with` token) and the EMA's without it (every context once per group), 2 N a token each
(`scoring_forward_tokens`).

What is the thought, exactly: the tokens the policy sampled, up to and including the token that
completes "</think>" (when it writes one) or a stop token; those tokens are the action the update
trains. `scored_with` is the prompt, the thought without a trailing stop token, and "</think>"
appended when the policy did not close it itself. Tokens sampled after the closing tag were
computed (and counted) but are no part of the thought.

Left out on purpose: the paper's several updates per batch (theta_old != theta): one on-policy
update per batch, as `rpt` does (the ratio is 1, the clip is applied as written); dynamic sampling
(rewards are continuous; --dynamic-sampling-from is ignored) and the fused one-token step (a
thought is many tokens).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rptdata.errors import RptError
from rpttrain.batching import last_positions_logits, plan_batches
from rpttrain.data import target_token
from rpttrain.objectives import Objective, ObjectiveParts, algos
from rpttrain.objectives.grpo import build_engine, reference_model
from rpttrain.objectives.policy_update import PolicyUpdate, policy_gradient_update, set_advantages
from rpttrain.precision import Precision
from rpttrain.prompts import build_prompt_ids, load_prompt_format
from rpttrain.rollout import Completion, Sampling, stop_ids
from rpttrain.step_record import StepResult

EMA_WEIGHTS = "ema.safetensors"


@dataclass
class Thought:
    """One sampled thought and what scoring and the update need from it."""

    prompt_ids: list[int]  # x<t, then the format's opening tag: what the thought was sampled after
    completion_ids: list[int]  # the thought's tokens as sampled: the action the update trains
    text: str  # the thought, decoded
    completion: str  # everything the policy wrote, decoded (the thought and what followed it)
    closed: bool  # the policy wrote the closing tag itself
    truncated: bool  # stopped by --max-new-tokens
    scored_with: list[int]  # everything before the target, thought included
    engine_logprobs: list[float] | None
    logp_with: float = 0.0  # log p_theta(x_t | scored_with)
    reward: float = 0.0
    advantage: float = 0.0


@dataclass
class Position:
    """One task: the context x<t, the observed next token x_t and the no-think baseline's score."""

    task: dict
    context_ids: list[int]  # scored_without: what the EMA scores x_t after
    target_id: int
    logp_without: float = 0.0  # log pbar_phi(x_t | x<t)


def thought_of(completion: Completion, prompt: list[int], close_ids: list[int], stops: set[int], tokenizer, close: str):
    """The thought in a completion (see the module docstring): (action ids, text, closed, scored_with).

    The closing tag is found in the decoded text; the shortest prefix of tokens whose text holds
    it is the action (binary search: a longer prefix holds it whenever a shorter one does)."""
    ids = list(completion.token_ids)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if close in text:
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if close in tokenizer.decode(ids[:mid], skip_special_tokens=False):
                hi = mid
            else:
                lo = mid + 1
        action = ids[:lo]
        return action, tokenizer.decode(action, skip_special_tokens=False), True, prompt + action
    scored = ids[:-1] if ids and ids[-1] in stops else ids
    return ids, tokenizer.decode(scored, skip_special_tokens=False), False, prompt + scored + close_ids


@torch.no_grad()
def next_token_logprobs(model, seqs: list[list[int]], targets: list[int], precision: Precision, max_tokens: int):
    """log p(target | seq) under `model` at temperature 1, for each sequence (no gradient),
    micro-batched by padded tokens; returns floats and the tokens the forwards ran."""
    out = [0.0] * len(seqs)
    for mb in plan_batches([len(s) for s in seqs], max_tokens=max_tokens):
        with precision.autocast():
            logits = last_positions_logits(model, [seqs[i] for i in mb], k=1)[:, -1]
        tgt = torch.tensor([targets[i] for i in mb], device=logits.device)
        logp = algos.token_logprobs(logits.unsqueeze(1), tgt.unsqueeze(1)).squeeze(1)
        for i, v in zip(mb, logp.tolist()):
            out[i] = v
    return out, sum(len(s) for s in seqs)


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    """phi <- decay * phi + (1 - decay) * theta, parameter by parameter (phi in float32).

    >>> a, b = (torch.nn.Linear(1, 1, bias=False).requires_grad_(False) for _ in range(2))
    >>> _ = a.weight.fill_(1.0), b.weight.fill_(3.0)
    >>> ema_update(a, b, 0.75); a.weight.item()
    1.5
    """
    for phi, theta in zip(ema.parameters(), model.parameters()):
        phi.mul_(decay).add_(theta.detach().to(phi.dtype), alpha=1.0 - decay)


def ema_copy(model, start_from: Path | None):
    """The EMA copy of the policy: equal to it on a fresh start, the checkpoint's EMA on resume;
    float32 (an update of (1 - decay) x the difference is below a bf16 step), no gradient."""
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)
    if start_from is not None:
        from safetensors.torch import load_model

        path = Path(start_from) / EMA_WEIGHTS
        if not path.is_file():
            raise RptError(
                f"{start_from} holds no {EMA_WEIGHTS}: it is not a checkpoint of an rlp run; resume with the "
                "objective the run was started with, or start a new run (--model that checkpoint)"
            )
        load_model(ema, str(path))
    return ema


class RLPObjective(Objective):
    """One RLP step: thoughts, information-gain rewards, the clipped update, the EMA update."""

    progress_keys = ("information_gain_mean", "positive_gain_share")

    def __init__(self, config, model, tokenizer, engine, sampler, precision, optimizer_step, ema, ref_model=None):
        self.config = config
        self.model, self.tokenizer, self.engine, self.sampler = model, tokenizer, engine, sampler
        self.precision, self.optimizer_step, self.ema, self.ref_model = precision, optimizer_step, ema, ref_model
        self.fmt = load_prompt_format(config.prompt_template)
        if self.fmt.thought is None:
            raise RptError(f"prompt format {self.fmt.name!r} writes no thought; --objective rlp needs one (rlp)")
        self.close_tag = self.fmt.thought[1]
        self.open_ids = tokenizer(self.fmt.thought[0], add_special_tokens=False)["input_ids"]
        self.close_ids = tokenizer(self.close_tag, add_special_tokens=False)["input_ids"]
        # a closing tag that is one token (Qwen3's </think>) ends generation there
        self.stops = tuple(
            sorted(set(stop_ids(tokenizer)) | ({self.close_ids[0]} if len(self.close_ids) == 1 else set()))
        )

    @classmethod
    def build(cls, config, parts: ObjectiveParts) -> RLPObjective:
        """The rollout engine, the EMA copy (the checkpoint's on resume), the reference model
        (--kl-coef > 0), then the objective."""
        engine = build_engine(config, parts.engine, parts.model, parts.tokenizer, parts.precision, parts.start_from)
        return cls(
            config,
            parts.model,
            parts.tokenizer,
            engine,
            parts.sampler,
            parts.precision,
            parts.optimizer_step,
            ema_copy(parts.model, parts.start_from),
            reference_model(config, parts.precision, parts.device),
        )

    def close(self) -> None:
        self.engine.close()

    def save_state(self, folder: Path) -> None:
        from safetensors.torch import save_model

        save_model(self.ema, str(Path(folder) / EMA_WEIGHTS))  # handles tied (shared) tensors

    # -- phases -------------------------------------------------------------------------------
    def positions(self, tasks: list[dict]) -> tuple[list[Position], list[list[int]]]:
        """Each task's context ids and target, and the prompt a thought is sampled after."""
        c = self.config
        positions, prompts = [], []
        for t in tasks:
            prompt = build_prompt_ids(self.fmt, t["context"], self.tokenizer, c.max_prompt_tokens)
            context = prompt[: len(prompt) - len(self.open_ids)]
            target = target_token(t, self.tokenizer, exact=not c.allow_tokenizer_mismatch)
            positions.append(Position(t, context, target))
            prompts.append(prompt)
        return positions, prompts

    def rollout(self, prompts: list[list[int]], step: int) -> tuple[list[list[Thought]], int]:
        c = self.config
        sampling = Sampling(
            n=c.group_size,
            temperature=c.temperature,
            top_p=c.top_p,
            max_new_tokens=c.max_new_tokens,
            seed=c.seed * 1_000_003 + step * 101,
            stop_token_ids=self.stops,
        )
        groups = self.engine.generate(prompts, sampling)
        stops = set(self.stops)
        thoughts = []
        for prompt, group in zip(prompts, groups):
            row = []
            for comp in group:
                action, text, closed, scored = thought_of(
                    comp, prompt, self.close_ids, stops, self.tokenizer, self.close_tag
                )
                logprobs = comp.logprobs[: len(action)] if comp.logprobs else None
                row.append(
                    Thought(prompt, action, text, comp.text, closed, comp.finish_reason == "length", scored, logprobs)
                )
            thoughts.append(row)
        return thoughts, self.engine.forward_tokens(prompts, groups, sampling)

    def score(self, positions: list[Position], groups: list[list[Thought]], timings: dict) -> int:
        """Rewards r = S_pred - S_ema of every thought (no gradient); returns the tokens scored.
        The EMA's forward is timed apart (`ema_score_s`): with `ema_s`, what the baseline costs."""
        c = self.config
        flat = [th for g in groups for th in g]
        targets = [p.target_id for p, g in zip(positions, groups) for _ in g]
        with_logp, ran_with = next_token_logprobs(
            self.model, [th.scored_with for th in flat], targets, self.precision, c.micro_batch_tokens
        )
        t = time.time()
        without_logp, ran_without = next_token_logprobs(
            self.ema,
            [p.context_ids for p in positions],
            [p.target_id for p in positions],
            self.precision,
            c.micro_batch_tokens,
        )
        timings["ema_score_s"] = time.time() - t
        for p, s in zip(positions, without_logp):
            p.logp_without = s
        for th, s, p in zip(flat, with_logp, (p for p, g in zip(positions, groups) for _ in g)):
            th.logp_with = s
            th.reward = s - p.logp_without
        return ran_with + ran_without

    def advantages(self, groups: list[list[Thought]]) -> None:
        set_advantages(groups, self.config.scale_rewards)

    # -- the step -----------------------------------------------------------------------------
    def step(self, step: int, batch_size: int | None = None) -> StepResult:
        c = self.config
        timings = {
            "rollout_s": 0.0,
            "score_s": 0.0,
            "ema_score_s": 0.0,
            "update_s": 0.0,
            "ema_s": 0.0,
            "weight_sync_s": 0.0,
        }
        t0 = time.time()
        positions, prompts = self.positions(self.sampler.take(batch_size or c.batch_size))
        groups, rollout_forward = self.rollout(prompts, step)
        timings["rollout_s"] = time.time() - t0
        t = time.time()
        scored = self.score(positions, groups, timings)
        self.advantages(groups)
        timings["score_s"] = time.time() - t
        t = time.time()
        upd = policy_gradient_update(
            [th for g in groups for th in g], self.model, self.ref_model, self.precision, c, self.optimizer_step
        )
        timings["update_s"] = time.time() - t
        t = time.time()
        if not upd["skipped"]:
            ema_update(self.ema, self.model, c.ema_decay)
        timings["ema_s"] = time.time() - t
        t = time.time()
        if self.engine.name != "hf" and not upd["skipped"]:
            self.engine.update_weights(self.model)
        timings["weight_sync_s"] = time.time() - t
        return self.result(positions, groups, upd, rollout_forward, scored, timings, t0)

    def result(self, positions, groups, upd, rollout_forward: int, scored: int, timings: dict, t0: float):
        """The step's metrics, token counts and the first two groups' samples."""
        flat = [th for g in groups for th in g]
        gains = np.array([th.reward for th in flat])
        lengths = [len(th.completion_ids) for th in flat]
        metrics = {
            "information_gain_mean": float(gains.mean()),
            "positive_gain_share": float((gains > 0).mean()),
            "information_gain_std": float(gains.std()),
            "logp_with_thought_mean": float(np.mean([th.logp_with for th in flat])),
            "logp_without_thought_mean": float(np.mean([p.logp_without for p in positions])),
            "thought_len_mean": float(np.mean(lengths)),
            "thought_len_max": int(max(lengths)),
            "thought_closed_share": float(np.mean([th.closed for th in flat])),
            "truncated_share": float(np.mean([th.truncated for th in flat])),
            "contexts_drawn": len(positions),
            **PolicyUpdate.metrics(upd),
            "rollout_forward_tokens": rollout_forward,
            "scoring_forward_tokens": scored,
            "update_tokens": upd["update_tokens"],
            **{k: round(v, 4) for k, v in timings.items()},
            "step_s": round(time.time() - t0, 4),
        }
        counts = {
            "update_tokens": upd["update_tokens"],
            "rollout_tokens": sum(len(th.prompt_ids) + len(th.completion_ids) for th in flat),
            "rollout_forward_tokens": rollout_forward,
            "scoring_forward_tokens": scored,
            "samples": len(flat),
        }
        samples = [
            {
                **({"band": p.task["band"]} if p.task.get("band") is not None else {}),
                "context": p.task["context"],
                "completion": th.completion,
                "thought": th.text,
                "target": p.task["continuation"],
                "reward": th.reward,
                "correct": th.reward > 0,  # for rlp: the thought raised the next token's probability
                "scored_with": th.scored_with,
                "scored_without": p.context_ids,
                "target_id": p.target_id,
                "logp_with": th.logp_with,
                "logp_without": p.logp_without,
            }
            for p, g in zip(positions[:2], groups[:2])
            for th in g
        ]
        return StepResult(metrics, counts, samples)
