"""Train RPT with TRL's GRPOTrainer: a reward function and the dataset rows it reads.

TRL is not imported; this file only speaks its data contract.

- ``rpt_reward(prompts, completions, continuation, boundaries, reward, format)``
  follows TRL's reward-function contract: TRL passes every extra dataset column as
  a keyword list (one entry per completion) and expects one float per completion.
  Completions may be strings (standard format) or message lists (conversational
  format, where the guess is read from the last assistant message). Its
  ``__name__`` is ``"rpt"``, so TRL logs it as ``rewards/rpt/mean``.
- ``task_to_trl_row(task, fmt)`` builds a row with the columns ``prompt`` (the raw
  context for the ``continuation`` format, chat messages otherwise), ``continuation``,
  ``boundaries``, ``reward``, ``format`` and ``task_id``.

Use: ``GRPOTrainer(model, reward_funcs=rpt_reward, train_dataset=Dataset.from_list(rows))``.

Left out on purpose: the paper's ``dense`` reward (needs log-probs, see
``rpttrain/reward.py``) and any trainer configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rpttrain.prompts import PromptFormat, build_messages, get_extract, render_prompt
from rpttrain.reward import get_reward_fn, reward_text

__all__ = ["completion_text", "rpt_reward", "task_to_trl_row"]


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a completion: the string itself, or the content of the last assistant message.

    Message content given as a list of parts (``[{"type": "text", "text": ...}]``)
    is joined. A conversation with no assistant message gives ``""``.

    >>> completion_text([{"role": "assistant", "content": "\\\\boxed{ x}"}])
    '\\\\boxed{ x}'
    """
    if isinstance(completion, str):
        return completion
    for message in reversed(completion):
        if message.get("role", "assistant") == "assistant":
            content = message.get("content") or ""
            if isinstance(content, str):
                return content
            return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")
    return ""


def _per_item(value: str | Sequence[str], n: int) -> Sequence[str]:
    return [value] * n if isinstance(value, str) else value


def rpt_reward(
    prompts: Sequence[Any],
    completions: Sequence[str | Sequence[Mapping[str, Any]]],
    continuation: Sequence[str],
    boundaries: Sequence[Sequence[int]],
    reward: str | Sequence[str] = "prefix",
    format: str | Sequence[str] = "v0",
    **kwargs: Any,
) -> list[float]:
    """RPT reward for a TRL batch: one float per completion.

    ``reward`` and ``format`` are a single name, or a per-completion list when they
    come from dataset columns. Other keyword arguments from TRL are ignored.

    >>> rpt_reward(["p", "p"], ["\\\\boxed{ para}", "\\\\boxed{ par}"],
    ...            continuation=[" paragraph"] * 2, boundaries=[[5, 10]] * 2)
    [1.0, 0.0]
    >>> rpt_reward(["p"], [[{"role": "assistant", "content": " para"}]],
    ...            continuation=[" paragraph"], boundaries=[[5, 10]], format="continuation")
    [1.0]
    """
    n = len(completions)
    if not (len(continuation) == len(boundaries) == n):
        raise ValueError(
            f"rpt_reward needs one continuation and one boundaries list per completion; got {n} "
            f"completions, {len(continuation)} continuations, {len(boundaries)} boundaries"
        )
    rewards, formats = _per_item(reward, n), _per_item(format, n)
    return [
        get_reward_fn(r)(reward_text(r, get_extract(f), completion_text(c)), cont, list(b))
        for c, cont, b, r, f in zip(completions, continuation, boundaries, rewards, formats)
    ]


rpt_reward.__name__ = "rpt"


def task_to_trl_row(
    task: Mapping[str, Any],
    fmt: PromptFormat,
    tokenizer: Any = None,
    reward: str = "prefix",
) -> dict[str, Any]:
    """One TRL dataset row for a task (keys ``task_id``, ``context``, ``continuation``, ``boundaries``).

    With a ``tokenizer``, a ``prompt_text`` column also holds the exact prompt string
    (``render_prompt``), handy for filtering by prompt length; TRL passes it to the
    reward as an ignored keyword.

    >>> from rpttrain.prompts import PROMPT_FORMATS
    >>> task = {"task_id": "d0:3", "context": "x =", "continuation": " 1", "boundaries": [2]}
    >>> task_to_trl_row(task, PROMPT_FORMATS["continuation"])["prompt"]
    'x ='
    """
    get_reward_fn(reward)  # fail at export time, not in the middle of training
    context, after = task["context"], task.get("context_after")
    row: dict[str, Any] = {
        "prompt": build_messages(fmt, context, after) if fmt.uses_chat else context,
        "continuation": task["continuation"],
        "boundaries": [int(b) for b in task["boundaries"]],
        "reward": reward,
        "format": fmt.name,
        "task_id": task["task_id"],
    }
    if tokenizer is not None:
        row["prompt_text"] = render_prompt(fmt, context, tokenizer, after)
    return row
