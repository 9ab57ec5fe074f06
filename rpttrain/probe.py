"""`rpt probe`: does this model get any RPT signal, per prompt format? (paper Table 8 measures)

    run_probe(ProbeConfig(tasks_dir="out/tasks", model="smollm2-135m", templates=("v0", "continuation")))

For a sample of tasks and each prompt format it samples G completions per task (the same rollout
engine, prompts and reward as `rpt train`) and reports:
    random@1      share of samples that are right under the reward (the paper's Random@1)
    pass@G        share of tasks with at least one right sample (Pass@8 for G = 8)
    reward_mean   mean reward (differs from random@1 only for the dense rewards, `rpttrain.dense`)
    boxed         share of completions the format could extract a prediction from
    length        mean completion length in tokens; truncated: share that hit max_new_tokens
    signal        share of groups whose rewards are not all equal: the groups GRPO learns from
    predicted     the share make-tasks predicted for the same tasks (`rptdata.tasks.live`: mean of
                  1 - q^G - (1-q)^G, G = samples), when the tasks carry `accept_mass`; exact
                  only for the proxy itself in the `continuation` format (one token)
A format with signal 0 gives GRPO nothing to learn from; run this before spending GPU days.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rptdata.engine_choice import choose_engine
from rptdata.errors import BadOption
from rptdata.io import TASK_STAGES, read_manifest, write_text_atomic
from rptdata.models import load_causal_lm, load_tokenizer
from rptdata.tasks.live import live_probability
from rpttrain.config import check_judge_options
from rpttrain.data import check_task_fit, load_tasks
from rpttrain.dense import GroupScorer
from rpttrain.judge import judge_from_options
from rpttrain.prompts import load_prompt_format, task_prompt_ids
from rpttrain.reward import REWARD_NAMES
from rpttrain.rollout import Sampling, make_engine, stop_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    tasks_dir: str
    model: str = "smollm2-135m"
    templates: tuple[str, ...] = ("v0", "v2", "v6", "continuation")
    samples: int = 8
    tasks: int = 16
    split: str = "train"
    temperature: float = 0.8
    max_new_tokens: int = 256
    continuation_new_tokens: int = 1
    max_prompt_tokens: int = 1024
    reward: str = "prefix"
    judge: str | None = None  # --reward judge: the judge model (rpttrain.judge)
    judge_max_new_tokens: int = 64
    judge_cache: str | None = None
    engine: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.samples < 1 or self.tasks < 1:
            raise BadOption("--samples and --tasks must be at least 1")
        if not self.templates:
            raise BadOption("give at least one --prompt-template")
        if self.reward not in REWARD_NAMES:
            raise BadOption(f"--reward must be one of {', '.join(REWARD_NAMES)}, not {self.reward!r}")
        check_judge_options(self.reward, self.judge, self.judge_max_new_tokens)
        for t in self.templates:
            load_prompt_format(t)  # unknown names fail here, before any model loads


def predicted_signal(tasks: list[dict], group_size: int) -> float | None:
    """Mean predicted live-group probability of these tasks for groups of `group_size`, from
    their `accept_mass`; None when no task carries one.

    >>> predicted_signal([{"accept_mass": 0.5}, {"accept_mass": 0.0}, {"context": "old"}], 2)
    0.25
    """
    lives = [live_probability(float(t["accept_mass"]), group_size) for t in tasks if t.get("accept_mass") is not None]
    return sum(lives) / len(lives) if lives else None


def run_probe(config: ProbeConfig) -> list[dict]:
    from rptdata.models import resolve_device

    device = resolve_device(config.device)
    manifest = read_manifest(Path(config.tasks_dir), TASK_STAGES)
    for t in config.templates:
        check_task_fit(manifest, config.reward, t)
    tasks = load_tasks(config.tasks_dir, config.split, limit=config.tasks)
    predicted = predicted_signal(tasks, config.samples)
    estimate = manifest.get("live_estimate") or {}
    if predicted is not None and estimate.get("temperature") not in (None, config.temperature):
        log.warning(
            "the tasks' live estimate is for temperature %s, this probe samples at %s",
            estimate["temperature"],
            config.temperature,
        )
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    model = load_causal_lm(config.model, dtype=config.dtype, device=device, trust_remote_code=config.trust_remote_code)
    engine = make_engine(choose_engine(config.engine, device), model, tokenizer)
    judge = judge_from_options(config, device, choose_engine(config.engine, device), config.dtype)
    rows = []
    try:
        for name in config.templates:
            fmt = load_prompt_format(name)
            new_tokens = config.max_new_tokens if fmt.uses_chat else config.continuation_new_tokens
            prompts = [task_prompt_ids(fmt, t, tokenizer, config.max_prompt_tokens) for t in tasks]
            t0 = time.time()
            groups = engine.generate(
                prompts,
                Sampling(
                    n=config.samples,
                    temperature=config.temperature,
                    max_new_tokens=new_tokens,
                    seed=config.seed,
                    stop_token_ids=stop_ids(tokenizer),
                ),
            )
            seconds = time.time() - t0
            scorer = GroupScorer(config.reward, fmt, tokenizer, model, config.max_prompt_tokens, judge=judge)
            scored = scorer.score(tasks, groups)
            rewards, correct, boxed, lengths, truncated, examples = [], [], [], [], [], []
            for task, group, sg in zip(tasks, groups, scored):
                preds, rs = sg.predictions, sg.rewards
                rewards.append(rs)
                correct.append(sg.correct)
                boxed += [p is not None for p in preds]
                lengths += [len(c.token_ids) for c in group]
                truncated += [c.finish_reason == "length" for c in group]
                if len(examples) < 2:
                    examples.append(
                        {
                            "continuation": task["continuation"],
                            "completion": group[0].text,
                            "prediction": preds[0],
                            "reward": rs[0],
                        }
                    )
            r, ok = np.array(rewards), np.array(correct)
            rows.append(
                {
                    "template": name,
                    "tasks": len(tasks),
                    "samples": config.samples,
                    "max_new_tokens": new_tokens,
                    "random_at_1": float(ok.mean()),
                    f"pass_at_{config.samples}": float(ok.any(axis=1).mean()),
                    "reward_mean": float(r.mean()),
                    "boxed": float(np.mean(boxed)),
                    "length_mean": float(np.mean(lengths)),
                    "truncated": float(np.mean(truncated)),
                    "signal": float((r.max(axis=1) != r.min(axis=1)).mean()),
                    "predicted_signal": predicted,
                    "tokens_per_s": float(sum(lengths) / max(seconds, 1e-9)),
                    "examples": examples,
                    **({"judge": judge.take_counts()} if judge is not None else {}),
                }
            )
    finally:
        engine.close()
        if judge is not None:
            judge.close()
    if config.out:
        write_text_atomic(Path(config.out), json.dumps(rows, indent=2))
    return rows


def format_table(rows: list[dict]) -> str:
    k = rows[0]["samples"] if rows else 8
    head = (
        f"| template | tasks | new tokens | Random@1 | Pass@{k} | boxed | mean length | truncated | groups with signal "
        "| predicted (proxy, continuation) |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['template']} | {r['tasks']} | {r['max_new_tokens']} | {100 * r['random_at_1']:.1f}% | {100 * r[f'pass_at_{k}']:.1f}% | "
            f"{100 * r['boxed']:.0f}% | {r['length_mean']:.1f} | {100 * r['truncated']:.0f}% | {100 * r['signal']:.0f}% | "
            + ("—" if r.get("predicted_signal") is None else f"{100 * r['predicted_signal']:.0f}%")
            + " |"
        )
    return "\n".join(lines)
