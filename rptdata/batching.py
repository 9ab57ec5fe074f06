"""One micro-batch planner for every stage that runs a model over many sequences: the scorer's
windows, the trainer's rollouts and documents, eval's contexts.

    plan_batches([3, 10, 4, 9], max_tokens=20)               # padded-token budget
    plan_batches(lengths, max_rows=32)                        # a row budget (eval's --batch-size)
    plan_batches(widths, max_tokens=4096, row_keys=prompts)  # items sharing a key are one row

Longest first (the first batch shows at once whether the longest sequence fits), ties in input
order, so a plan is deterministic. A batch is padded to its longest member; a sequence longer than
the token budget goes alone rather than being refused.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from rptdata.errors import BadOption


def plan_batches(
    lengths: Sequence[int],
    max_tokens: int | None = None,
    max_rows: int | None = None,
    row_keys: Sequence[Hashable] | None = None,
) -> list[list[int]]:
    """Lists of indices into `lengths`, each batch within `max_tokens` padded tokens (rows x its
    longest length) and `max_rows` rows. With `row_keys`, items with equal keys are ordered together
    and count as one row (the samples of one prompt that a one-token update runs once).

    >>> plan_batches([3, 10, 4, 9], max_tokens=20)
    [[1, 3], [2, 0]]
    >>> plan_batches([3, 10, 4, 9, 1], max_rows=2)
    [[1, 3], [2, 0], [4]]
    >>> plan_batches([5, 5, 5, 5], max_tokens=10, row_keys=["a", "b", "a", "b"])
    [[0, 2, 1, 3]]
    """
    if max_tokens is not None and max_tokens < 1 or max_rows is not None and max_rows < 1:
        raise BadOption("max_tokens and max_rows must be at least 1")
    keys = list(row_keys) if row_keys is not None else list(range(len(lengths)))
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], first[keys[i]], i))
    batches: list[list[int]] = []
    rows, longest, seen = 0, 0, set()
    for i in order:
        new_row = keys[i] not in seen
        fits = bool(batches) and (
            not new_row
            or (
                (max_tokens is None or (rows + 1) * longest <= max_tokens)
                and (max_rows is None or rows + 1 <= max_rows)
            )
        )
        if not fits:
            batches.append([])
            rows, longest, seen = 0, lengths[i], set()
            new_row = True
        batches[-1].append(i)
        if new_row:
            rows += 1
            seen.add(keys[i])
    return batches
