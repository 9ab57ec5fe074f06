"""Train RPT with verl: a custom reward function and the parquet rows verl reads.

verl is not imported; this file only speaks its data contract.

- ``compute_score(data_source, solution_str, ground_truth, extra_info=None)`` is
  verl's custom reward signature. Point verl (0.9.1) at it with
  ``reward.custom_reward_function.path=<this file> reward.custom_reward_function.name=compute_score``
  (a top-level ``custom_reward_function.*`` is silently ignored by ``verl.trainer.main_ppo``).
- ``task_to_verl_row(task, fmt)`` turns one task (a row of ``TASKS/*/part-*.parquet``)
  into a verl dataset row::

      data_source   "rpt"
      prompt        chat messages [{"role": ..., "content": ...}]
      ability       "next-token-prediction"
      reward_model  {"style": "rule", "ground_truth": <JSON string>}
      extra_info    {task_id, doc_id, pos, entropy, band, format, raw_prompt[, prompt_text]}

  ``ground_truth`` is a JSON string of ``{"continuation", "boundaries", "reward",
  "format"}`` rather than a struct, so RPT rows can be concatenated with other verl
  datasets (whose ground truth is usually a string); ``compute_score`` also takes a dict.

The raw ``continuation`` format: in verl 0.9.1 the dataset does not tokenize; its agent
loops apply the tokenizer's chat template, with no per-row switch. We still emit a single
user message holding the raw context (so the column keeps verl's type) and mark the
row with ``extra_info["raw_prompt"] = True`` and ``extra_info["prompt_text"]`` = the
context. The agent loop in ``rpttrain/backends/verl_agent_loop.py`` feeds those rows
tokenized exactly as ``rpt train`` does (``rpt train --backend verl`` configures it);
with verl's stock loop the model sees the context wrapped in its chat template.

Left out on purpose: the paper's ``dense`` rewards (they need the policy's probability of the
prediction's first token, see ``rpttrain/dense.py``) and any verl config; ``rpttrain/backends/verl.py`` writes the launch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rpttrain.prompts import PromptFormat, build_messages, get_extract, render_prompt
from rpttrain.reward import ANSWER_REWARDS, get_reward_fn, reward_text

__all__ = ["DATA_SOURCE", "compute_score", "task_to_verl_row"]

DATA_SOURCE = "rpt"
ABILITY = "next-token-prediction"


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str | Mapping[str, Any],
    extra_info: Mapping[str, Any] | None = None,
) -> float:
    """Score one verl rollout with the reward and extractor named in ``ground_truth``.

    ``ground_truth`` (a dict or its JSON string) holds ``continuation`` and
    ``boundaries``, and optionally ``reward`` (default "prefix") and ``format``
    (default "v0"; "continuation" scores the completion verbatim). An answer task's
    (``reward`` "math") holds ``answer`` instead: the completion's final answer is
    checked against it with math-verify (``rpttrain.reward.math_reward``).

    >>> gt = {"continuation": " paragraph", "boundaries": [5, 10]}
    >>> compute_score("rpt", "<think>...</think> \\\\boxed{ para}", gt)
    1.0
    >>> compute_score("rpt", " para", json.dumps({**gt, "format": "continuation"}))
    1.0
    >>> compute_score("rpt", "so \\\\boxed{\\\\frac{144}{2}}", {"answer": "72", "reward": "math", "format": "answer"})
    1.0
    """
    if isinstance(ground_truth, (str, bytes)):
        ground_truth = json.loads(ground_truth)
    extract = get_extract(ground_truth.get("format", "v0"))
    reward = ground_truth.get("reward", "prefix")
    if reward in ANSWER_REWARDS:  # an answer task's ground truth holds its answer (rpt answer-tasks)
        return get_reward_fn(reward)(reward_text(reward, extract, solution_str), ground_truth["answer"], ())
    reward_fn = get_reward_fn(reward)
    return reward_fn(extract(solution_str), ground_truth["continuation"], list(ground_truth["boundaries"]))


def task_to_verl_row(
    task: Mapping[str, Any],
    fmt: PromptFormat,
    tokenizer: Any = None,
    reward: str = "prefix",
) -> dict[str, Any]:
    """One verl parquet row for a task (keys ``task_id``, ``doc_id``, ``pos``, ``context``,
    ``continuation``, ``boundaries``, ``entropy``, ``band``).

    With a ``tokenizer``, ``extra_info["prompt_text"]`` also holds the exact prompt
    string (``render_prompt``), handy for filtering by prompt length.

    >>> from rpttrain.prompts import PROMPT_FORMATS
    >>> task = {"task_id": "d0:3", "doc_id": "d0", "pos": 3, "context": "x =",
    ...         "continuation": " 1", "boundaries": [2], "entropy": 1.2, "band": "medium"}
    >>> row = task_to_verl_row(task, PROMPT_FORMATS["v0"])
    >>> row["prompt"][0]["role"], row["reward_model"]["style"], row["extra_info"]["raw_prompt"]
    ('user', 'rule', False)
    """
    get_reward_fn(reward)  # fail at export time, not in the middle of training
    context, after = task["context"], task.get("context_after")
    raw = not fmt.uses_chat
    messages = [{"role": "user", "content": context}] if raw else build_messages(fmt, context, after)
    if reward in ANSWER_REWARDS:  # an answer task (rpt answer-tasks): its reference answer is the ground truth
        ground_truth = {"answer": task["continuation"], "reward": reward, "format": fmt.name}
    else:
        ground_truth = {
            "continuation": task["continuation"],
            "boundaries": [int(b) for b in task["boundaries"]],
            "reward": reward,
            "format": fmt.name,
        }
    extra_info: dict[str, Any] = {
        "task_id": task["task_id"],
        "doc_id": task["doc_id"],
        "pos": int(task["pos"]),
        "entropy": None if task.get("entropy") is None else float(task["entropy"]),
        "band": task.get("band"),
        "format": fmt.name,
        "raw_prompt": raw,
    }
    if raw or tokenizer is not None:
        extra_info["prompt_text"] = render_prompt(fmt, context, tokenizer, after)
    return {
        "data_source": DATA_SOURCE,
        "prompt": messages,
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": json.dumps(ground_truth)},
        "extra_info": extra_info,
    }
