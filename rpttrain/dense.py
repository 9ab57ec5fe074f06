"""Scoring groups of rollouts under any reward, with the model probability App. A's dense rewards need.

    scorer = GroupScorer("dense", fmt, tokenizer, model, max_prompt_tokens=1024)
    scored = scorer.score(tasks, groups)          # groups: per task, its completions (.text, .token_ids)
    scored[0].rewards, scored[0].correct, scored[0].predictions
    scorer.forward_tokens                         # tokens the probability forward ran (0 when reused)

`rpt train`, `rpt probe` and `rpt eval` score through this class, so the four rewards
(`rpttrain.reward.REWARD_NAMES`) mean the same thing everywhere.

Which model gives P(y[0] | x<t; theta): the policy, as in the paper (theta is the policy's
parameters), at rollout time, before the update: one forward of the raw context x<t (the
`continuation` format's prompt: the context's last `max_prompt_tokens` tokens, no template) per
group, shared by its G rollouts, at temperature 1 (the model's own distribution, not the sampling
temperature). When the rollout's prompt already is that raw context (the `continuation` format),
the caller passes the logits it has (`last_logits`) and nothing runs again: the fused one-token
step of `rpt train` does so. In `rpt probe` and `rpt eval` the policy is the model under test.
Not the proxy's saved top-k: the proxy is another model, and a token outside its top k has no
saved probability.

y[0], the prediction's first token: for the raw `continuation` format the prediction is the
completion, so y[0] is the first sampled token id; for boxed formats it is the first token of the
extracted text, tokenized with the policy's tokenizer (no special tokens). An empty or missing
prediction has no y[0] and scores 0.

Left out on purpose: the dense rewards in TRL and verl. Their reward functions see text only;
`rpttrain.backends.check_backend` refuses them by name there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rptdata.errors import BadOption
from rptdata.math_answers import DEFAULT_TIMEOUT_S, check_answer
from rpttrain.batching import last_positions_logits, plan_batches
from rpttrain.prompts import PromptFormat, build_prompt_ids, load_prompt_format
from rpttrain.reward import DENSE_REWARDS, JUDGE_REWARDS, score_group

RAW = load_prompt_format("continuation")


@dataclass
class ScoredGroup:
    """One task's G predictions, their rewards, correct flags and (dense rewards) y[0] and P(y[0])."""

    predictions: list[str | None]
    rewards: list[float]
    correct: list[bool]
    first_ids: list[int | None] | None = None
    first_probs: list[float | None] | None = None
    # the math reward: each check's status (ok | no_answer | timeout | error); the judge: its verdict's
    # (yes | no | unparseable | exact | no_prediction, rpttrain.judge.Verdict)
    statuses: list[str] | None = None


class GroupScorer:
    """Scores groups of completions with one reward; dense rewards get P(y[0] | x<t) from `model`."""

    def __init__(
        self,
        reward: str,
        fmt: PromptFormat,
        tokenizer,
        model=None,
        max_prompt_tokens: int = 4096,
        micro_batch_tokens: int = 16384,
        pad_id: int = 0,
        judge=None,
    ):
        self.reward, self.fmt, self.tokenizer, self.model, self.judge = reward, fmt, tokenizer, model, judge
        if reward in JUDGE_REWARDS and judge is None:
            raise BadOption(f"reward {reward!r} needs a judge model (--judge MODEL)")
        self.max_prompt_tokens, self.micro_batch_tokens, self.pad_id = max_prompt_tokens, micro_batch_tokens, pad_id
        self.dense = reward in DENSE_REWARDS
        if self.dense and model is None:
            raise BadOption(f"reward {reward!r} needs the policy model for P(y[0] | x<t)")
        self.forward_tokens = 0  # tokens run through the model for the probabilities, summed over calls

    def reuses_prompt_logits(self) -> bool:
        """True when the rollout prompt is the raw context, so its last logits are P(. | x<t)."""
        return not self.fmt.uses_chat and self.fmt.user_template is None

    def first_ids(self, predictions: Sequence[str | None], completions) -> list[int | None]:
        out = []
        for pred, comp in zip(predictions, completions):
            if not pred:
                out.append(None)
            elif self.reuses_prompt_logits() and comp.token_ids:
                out.append(int(comp.token_ids[0]))
            else:
                ids = self.tokenizer(pred, add_special_tokens=False)["input_ids"]
                out.append(int(ids[0]) if ids else None)
        return out

    def context_probs(self, contexts: Sequence[str]) -> torch.Tensor:
        """P(. | x<t) [N, V] of each raw context, from no-grad forwards of at most micro_batch_tokens."""
        ids = [build_prompt_ids(RAW, c, self.tokenizer, self.max_prompt_tokens) for c in contexts]
        rows: list[torch.Tensor | None] = [None] * len(ids)
        with torch.no_grad():
            for mb in plan_batches([len(x) for x in ids], max_tokens=self.micro_batch_tokens):
                logits = last_positions_logits(self.model, [ids[i] for i in mb], k=1, pad_id=self.pad_id)[:, -1]
                probs = torch.softmax(logits.float(), dim=-1).cpu()
                for j, i in enumerate(mb):
                    rows[i] = probs[j]
        self.forward_tokens += sum(len(x) for x in ids)
        return torch.stack(rows) if rows else torch.zeros(0)

    def score(
        self, tasks: Sequence[dict], groups: Sequence[Sequence], last_logits: torch.Tensor | None = None
    ) -> list[ScoredGroup]:
        """Score each task's completions. `last_logits` [N, V]: the rollout prompts' last-position
        logits, used for the probabilities when the prompt is the raw context (no forward then)."""
        preds = [[self.fmt.extract(c.text) for c in g] for g in groups]
        if self.reward == "math":  # the prediction read back is math-verify's extraction of the final answer
            out = []
            for task, g in zip(tasks, groups):  # the check reads the whole completion (reward_text)
                verdicts = [check_answer(c.text, task["continuation"], DEFAULT_TIMEOUT_S) for c in g]
                out.append(
                    ScoredGroup(
                        [v.extracted for v in verdicts],
                        [v.reward for v in verdicts],
                        [v.reward == 1.0 for v in verdicts],
                        statuses=[v.status for v in verdicts],
                    )
                )
            return out
        if self.reward in JUDGE_REWARDS:  # one batch of the judge for the whole call (rpttrain.judge)
            verdicts = iter(self.judge.judge([(t, p) for t, ps in zip(tasks, preds) for p in ps]))
            out = []
            for p in preds:
                vs = [next(verdicts) for _ in p]
                rewards = [v.reward for v in vs]
                out.append(ScoredGroup(p, rewards, [r == 1.0 for r in rewards], statuses=[v.status for v in vs]))
            return out
        if not self.dense:
            out = []
            for task, p in zip(tasks, preds):
                rewards, correct = score_group(self.reward, p, task["continuation"], task["boundaries"])
                out.append(ScoredGroup(p, rewards, correct))
            return out
        first = [self.first_ids(p, g) for p, g in zip(preds, groups)]
        if last_logits is not None and self.reuses_prompt_logits():
            probs = torch.softmax(last_logits.detach().float(), dim=-1).cpu()
        else:
            probs = self.context_probs([t["context"] for t in tasks])
        out = []
        for k, (task, p, ids) in enumerate(zip(tasks, preds, first)):
            fp = [None if i is None else float(probs[k, i]) for i in ids]
            rewards, correct = score_group(
                self.reward, p, task["continuation"], task["boundaries"], ids, int(task["target_id"]), fp
            )
            out.append(ScoredGroup(p, rewards, correct, ids, fp))
        return out
