"""Fault injection for the crash tests (tests/test_faults.py): the stages call `hit(point)` at the
moments a crash is most likely to leave something half done, and the environment decides whether
that call kills the process.

    RPT_FAULT=shard-tmp:3 rpt prepare ...         # SIGKILL itself the 3rd time a shard's temp file is written
    RPT_FAULT=shard-tmp:1:enospc rpt prepare ...  # raise OSError(ENOSPC) there instead (a full disk)
    RPT_FAULT_COUNT=hits.json rpt prepare ...     # count every point reached; written at exit
    RPT_FAULT=unit:1:hang RPT_FAULT_NOTE=f ...     # hang (until killed) at the 1st unit, after writing its name to f
    RPT_FAULT=unit:1:wait RPT_FAULT_NOTE=f ...     # wait at the 1st unit until f exists (another process hangs)

Points: begin (the output directory is claimed, nothing written yet), shard-tmp (a shard's
temporary file is complete, not yet renamed), marker (the shard is in place, its marker is not),
json-tmp (a JSON file's temporary copy is written: markers, manifests, reports), manifest (every
shard is done, the manifest is not written), export-batch (mid-way through an export file),
train-step (a step is logged, its checkpoint is not written), checkpoint-weights,
checkpoint-rename, checkpoint-prune (inside a checkpoint write), eval-chunk (a chunk of
predictions is computed, not yet stored), unit (a Ray task or actor starts a shard: a node that
hangs there can be removed mid-run, tests/test_executors.py).

When neither variable is set, `hit` is one global lookup and a return: nothing to measure.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import signal
import time
from collections import Counter

ENV, COUNT_ENV = "RPT_FAULT", "RPT_FAULT_COUNT"


def _parse(spec: str) -> dict[str, tuple[int, str]]:
    """{point: (n, action)} from "point:n[:action],...".

    >>> _parse("shard-tmp:3,marker:1:enospc")
    {'shard-tmp': (3, 'kill'), 'marker': (1, 'enospc')}
    """
    plan = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, n, *action = item.split(":")
        plan[point] = (int(n), action[0] if action else "kill")
    return plan


_plan = _parse(os.environ[ENV]) if os.environ.get(ENV) else None
_counts: Counter | None = Counter() if os.environ.get(COUNT_ENV) else None
if _counts is not None:
    atexit.register(lambda: open(os.environ[COUNT_ENV], "w").write(json.dumps(dict(_counts))))
_seen: Counter = Counter()


def hit(point: str, path: str | os.PathLike | None = None) -> None:
    """Reached `point` (writing `path`): count it, and kill or fail here if the plan says so."""
    if _plan is None and _counts is None:
        return
    if _counts is not None:
        _counts[point] += 1
    if _plan is None or point not in _plan:
        return
    _seen[point] += 1
    n, action = _plan[point]
    if _seen[point] != n:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path) if path else None)
    note = os.environ.get("RPT_FAULT_NOTE")
    if action == "hang":
        if note:
            with open(note, "a") as f:
                f.write(f"{path}\n")
        while True:
            time.sleep(1)
    if action == "wait":
        deadline = time.time() + 600
        while note and not os.path.exists(note) and time.time() < deadline:
            time.sleep(0.1)
        return
    os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str | None) -> None:
    """Set the plan in this process (in-process tests); None disarms it."""
    global _plan
    _plan = _parse(spec) if spec else None
    _seen.clear()
