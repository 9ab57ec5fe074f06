"""`rpt make-tasks`: scored positions -> RPT tasks (context, continuation, boundaries), split by document.

    run_make_tasks(MakeTasksConfig(scored_dir="out/scored", out="out/tasks")) -> manifest dict

A task is one scored position of a document: its context, continuation and boundaries are
defined in `rptdata.tasks.taskdef` (with the split rule and TASKS_SCHEMA), its band in
`rptdata.bands`; this module only applies them to whole directories. See docs/tasks.md for the
schema; the readers of a tasks directory are in `rpttrain.data`.

Output:
    OUT/train/part-NNNNN.parquet  tasks of training documents (one shard per scored shard)
    OUT/eval/part-NNNNN.parquet   tasks of held-out documents (never trained on)
    OUT/manifest.json             tokenizer + proxy (copied), options, split rule, bands, counts

Every position read is accounted for: positions_in = tasks_train + tasks_eval + sum(skipped),
with one reason per skipped position (`nan_entropy`, `below_threshold`, `mid_character`,
`empty_context`, `low_live`, `over_max_tasks`, `over_max_eval_tasks`).

Live groups (`rptdata.tasks.live`): every task carries `accept_mass` (q, the proxy's probability at
`temperature` of a one-token prediction the prefix reward accepts) and `live` (1 - q^G -
(1-q)^G for G = `group_size`), from `target_logprob` and, when the scorer saved them, the top-k
tokens (whose bytes are read with the tokenizer the manifest names). `min_live` drops training
positions below it (`low_live`), before the caps; evaluation positions are never filtered.

Documents go to `eval` when a seeded SHA-256 of their id falls below `eval_fraction`
(`rptdata.tasks.taskdef.split_of`); the rule is in the manifest, so later stages can recompute it. `--max-tasks` keeps
the tasks with the smallest seeded hash of their task id: exact and deterministic, found by a
first pass that holds only a heap of (hash, shard, row) of size N, never the tasks themselves.

Memory is one docs shard and its positions shard at a time. Resume and rerun refusal are
`rptdata.stage.StageDir`'s: a shard is done when both of its split shards have markers.

Left out on purpose: splitting the work between processes (this stage is I/O-bound and fast),
filtering by band (bands are labels; filter with `--threshold` or when loading), and balancing
bands or documents when capping (the cap is a uniform random sample of the eligible tasks).
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from rptdata.bands import OTHER_BAND, band_of
from rptdata.io import MANIFEST, shard_name
from rptdata.stage import StageDir, run_stage
from rptdata.tasks.config import SKIP_REASONS, STAGE, MakeTasksConfig, task_key
from rptdata.tasks.inputs import Inputs, Shard, load_shard, open_inputs
from rptdata.tasks.taskdef import SPLITS, TASKS_SCHEMA, _end, continuation_at, cut_context, split_rule
from rptdata.tasks.units import UNIT_SKIP_REASONS, context_before, target_boundaries, unit_name

log = logging.getLogger(__name__)


def _select_capped(inputs: Inputs, config: MakeTasksConfig) -> dict[str, dict[int, set[int]] | None]:
    """First pass for the caps: per split, shard -> positions-row indices of the kept tasks.

    Holds only a max-heap of the N smallest (task hash, shard, row) per split.
    """
    caps = {"train": config.max_tasks, "eval": config.max_eval_tasks}
    heaps: dict[str, list] = {s: [] for s in SPLITS}
    for index in inputs.shards:
        shard = load_shard(inputs, index, config)
        for i in shard.eligible():
            split = "eval" if shard.pos_eval[i] else "train"
            cap = caps[split]
            if cap is None or cap == 0:
                continue
            item = (-task_key(shard.task_id(i), config.seed), -index, -int(i))  # max-heap of the smallest keys
            heap = heaps[split]
            if len(heap) < cap:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    out: dict[str, dict[int, set[int]] | None] = {}
    for split in SPLITS:
        if caps[split] is None:
            out[split] = None
            continue
        chosen: dict[int, set[int]] = {}
        for _, neg_index, neg_row in heaps[split]:
            chosen.setdefault(-neg_index, set()).add(-neg_row)
        out[split] = chosen
    return out


def _with_documents(shard, rows: np.ndarray):
    """(row index, document row, its UTF-8 bytes, its token ends) per row; each document read once
    per run of its rows."""
    cache_row, text_bytes, ends = -1, b"", np.zeros(0, np.int64)
    for i in rows:
        r = int(shard.row[i])
        if r != cache_row:
            cache_row = r
            text_bytes, ends = shard.doc_bytes(r)
        yield i, r, text_bytes, ends


def _build_tasks(shard: Shard, rows: np.ndarray, config: MakeTasksConfig) -> pa.Table:
    if config.unit != "token":
        return _build_unit_tasks(shard, rows, config)
    cols: dict[str, list] = {f.name: [] for f in TASKS_SCHEMA}
    for i, r, text_bytes, ends in _with_documents(shard, rows):
        pos = int(shard.pos[i])
        context, n_ctx = cut_context(text_bytes, ends, pos, config.context_tokens)
        if n_ctx != pos - int(shard.start[i]):  # the vectorized filter and the helper must agree
            raise AssertionError(f"context cut disagrees at {shard.task_id(i)}: {n_ctx} != {pos - shard.start[i]}")
        continuation, boundaries = continuation_at(text_bytes, ends, pos, config.continuation_tokens)
        entropy = float(shard.entropy[i])
        cols["task_id"].append(shard.task_id(i))
        cols["doc_id"].append(shard.doc_ids[r])
        cols["pos"].append(pos)
        cols["context"].append(context)
        cols["continuation"].append(continuation)
        cols["boundaries"].append(boundaries)
        cols["entropy"].append(entropy)
        cols["band"].append(band_of(entropy, config.bands))
        cols["target_id"].append(int(shard.token_id[i]))
        cols["context_tokens"].append(n_ctx)
        cols["target_logprob"].append(None if shard.logprob is None else float(shard.logprob[i]))
        cols["target_rank"].append(None if shard.rank is None else int(shard.rank[i]))
        q, live = float(shard.accept_mass[i]), float(shard.live[i])
        cols["accept_mass"].append(None if math.isnan(q) else q)
        cols["live"].append(None if math.isnan(live) else live)
        cols["unit"].append("token")
        cols["start_byte"].append(int(_end(ends, pos - 1)))
        for c in ("context_after", "entropy_first", "entropy_mean", "scored_tokens"):
            cols[c].append(None)
    return pa.Table.from_pydict(cols, schema=TASKS_SCHEMA)


def _build_unit_tasks(shard, rows: np.ndarray, config: MakeTasksConfig) -> pa.Table:
    """Sentence and span tasks (`rptdata.tasks.units.UnitShard`): context, target and context_after
    are consecutive byte ranges of the document."""
    cols: dict[str, list] = {f.name: [] for f in TASKS_SCHEMA}
    scores = shard.shard  # the positions, for the first token's log-probability and rank
    # (document row, position) -> positions row, as a sorted key array (no dict of every position)
    width = int(scores.pos.max()) + 1 if scores.n else 1
    keys = scores.row * width + scores.pos
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    for i, r, text_bytes, ends in _with_documents(shard, rows):
        start, end, after, pos = int(shard.start[i]), int(shard.end[i]), int(shard.after[i]), int(shard.pos[i])
        cstart, n_ctx = context_before(text_bytes, ends, start, config.context_tokens)
        k = r * width + pos
        at = int(np.searchsorted(sorted_keys, k))
        found = pos < width and at < len(sorted_keys) and sorted_keys[at] == k
        j = int(order[at]) if found else None
        entropy = float(shard.entropy[i])
        cols["task_id"].append(shard.task_id(i))
        cols["doc_id"].append(shard.doc_ids[r])
        cols["pos"].append(pos)
        cols["context"].append(text_bytes[cstart:start].decode("utf-8"))
        cols["continuation"].append(text_bytes[start:end].decode("utf-8"))
        cols["boundaries"].append(target_boundaries(ends, start, end))
        cols["entropy"].append(entropy)
        cols["band"].append(band_of(entropy, config.bands))
        cols["target_id"].append(scores.token_at(r, pos))
        cols["context_tokens"].append(n_ctx)
        cols["target_logprob"].append(None if j is None or scores.logprob is None else float(scores.logprob[j]))
        cols["target_rank"].append(None if j is None or scores.rank is None else int(scores.rank[j]))
        cols["accept_mass"].append(None)
        cols["live"].append(None)
        cols["unit"].append(shard.unit)
        cols["start_byte"].append(start)
        cols["context_after"].append(text_bytes[end:after].decode("utf-8") if after >= 0 else None)
        first, mean = float(shard.entropy_first[i]), float(shard.entropy_mean[i])
        cols["entropy_first"].append(None if math.isnan(first) else first)
        cols["entropy_mean"].append(None if math.isnan(mean) else mean)
        cols["scored_tokens"].append(int(shard.n_scored[i]))
    return pa.Table.from_pydict(cols, schema=TASKS_SCHEMA)


def _write_task_shard(stage: StageDir, shard: Shard, chosen: dict, config: MakeTasksConfig) -> dict:
    """Build and write one shard's train and eval tasks; return its stats (also in the markers)."""
    skipped = Counter(shard.reasons[int(c) - 1] for c in shard.reason[shard.reason > 0])
    eligible = shard.eligible()
    stats: dict = {"positions": shard.n, "tasks": {}, "bands": {}, "documents": {}, "documents_with_tasks": {}}
    tables: dict[str, pa.Table] = {}
    for split, over in (("train", "over_max_tasks"), ("eval", "over_max_eval_tasks")):
        in_split = eligible[shard.pos_eval[eligible] == (split == "eval")]
        if chosen[split] is not None:
            keep = chosen[split].get(shard.index, set())
            mask = np.fromiter((int(i) in keep for i in in_split), dtype=bool, count=len(in_split))
            skipped[over] += int((~mask).sum())
            in_split = in_split[mask]
        table = _build_tasks(shard, in_split, config)
        tables[split] = table
        stats["tasks"][split] = table.num_rows
        stats["bands"][split] = dict(Counter(table.column("band").to_pylist()))
        docs_in_split = np.unique(shard.row[shard.pos_eval == (split == "eval")])
        stats["documents"][split] = int(len(docs_in_split))
        stats["documents_with_tasks"][split] = int(len(np.unique(shard.row[in_split])))
        live = shard.live[in_split]
        stats.setdefault("live_sum", {})[split] = float(np.nansum(live))
        stats.setdefault("live_n", {})[split] = int(np.count_nonzero(~np.isnan(live)))
    stats["skipped"] = {r: int(skipped.get(r, 0)) for r in shard.reasons}
    # train first; the eval marker, written last, carries the whole shard's stats
    stage.write_shard("train", shard.index, tables["train"], {"tasks": tables["train"].num_rows})
    stage.write_shard("eval", shard.index, tables["eval"], stats)
    return stats


def _done(stage: StageDir) -> dict[int, dict]:
    """Shards whose train and eval outputs are both complete -> their stats (from the eval
    marker, which is written last)."""
    train = stage.done_shards("train")
    return {i: s for i, s in stage.done_shards("eval").items() if i in train and "positions" in s}


def run_make_tasks(config: MakeTasksConfig) -> dict:
    """Run the stage (see the module docstring); returns the manifest."""
    started = time.time()
    inputs = open_inputs(config)
    sm = inputs.scored_manifest
    stage = StageDir(Path(config.out), STAGE, list(SPLITS))
    state = stage.begin(
        {
            "scored": sm.get("fingerprint"),
            "prepared": inputs.prepared_manifest.get("fingerprint"),
            "options": config.identity(),
            "tokenizer": sm.get("tokenizer"),
        },
        overwrite=config.overwrite,
    )
    if state == "done":
        log.info("%s is already complete; nothing to do", config.out)
        return json.loads((Path(config.out) / MANIFEST).read_text())
    chosen: dict = {"train": None, "eval": None}
    if config.max_tasks is not None or config.max_eval_tasks is not None:
        chosen = _select_capped(inputs, config)

    def run(todo: list[int]) -> None:
        from tqdm import tqdm

        for index in tqdm(todo, desc="make-tasks", unit=" shard", disable=not config.progress, dynamic_ncols=True):
            _write_task_shard(stage, load_shard(inputs, index, config), chosen, config)

    return run_stage(
        stage,
        inputs.shards,
        done=lambda: _done(stage),
        run=run,
        finish=lambda done: _finish(stage, inputs, config, [done[i] for i in inputs.shards], started),
    )


def _finish(stage: StageDir, inputs: Inputs, config: MakeTasksConfig, per_shard: list[dict], started: float) -> dict:
    """The manifest, from every shard's stats (its eval marker)."""
    sm = inputs.scored_manifest
    counts = _sum_counts(per_shard, config)
    unit = unit_name(config.unit, config.masked)
    accounted = sum(counts["tasks"].values()) + sum(counts["skipped"].values())
    read = counts.get("positions_in", counts.get("candidates_in"))
    if accounted != read:  # an internal invariant, not user input
        raise AssertionError(f"accounting broke: read {read} != accounted {accounted}")
    return stage.finish(
        {
            "scored_dir": str(inputs.scored),
            "prepared_dir": str(inputs.prepared),
            "tokenizer": sm.get("tokenizer"),
            "proxy": sm.get("proxy"),
            "options": config.identity(),
            # what a task predicts (rptdata.tasks.units); rpttrain.data.task_unit reads it, "token" when absent
            "unit": unit,
            "bands": {name: t for name, t in config.bands},
            "split": split_rule(config.seed, config.eval_fraction),
            "shards": {split: [f"{split}/{shard_name(i)}" for i in inputs.shards] for split in SPLITS},
            "schema": {f.name: str(f.type) for f in TASKS_SCHEMA},
            "counts": counts,
            "live_estimate": None
            if unit != "token"
            else {
                "group_size": config.group_size,
                "temperature": config.temperature,
                "min_live": config.min_live,
                "topk": inputs.vocab is not None,
                "exact_when": "the policy is the proxy and the prompt format is `continuation` (one sampled token)",
                "function": "rptdata.tasks.live.position_accept_mass",
            },
            "seconds": round(time.time() - started, 2),
        }
    )


def _sum_counts(per_shard: list[dict], config: MakeTasksConfig) -> dict:
    band_names = [n for n, _ in config.bands] + [OTHER_BAND]
    reasons = SKIP_REASONS if config.unit == "token" else UNIT_SKIP_REASONS
    counts: dict = {
        "positions_in": sum(s["positions"] for s in per_shard),
        "tasks": {split: sum(s["tasks"][split] for s in per_shard) for split in SPLITS},
        "tasks_by_band": {
            split: {b: sum(s["bands"][split].get(b, 0) for s in per_shard) for b in band_names} for split in SPLITS
        },
        "documents": {split: sum(s["documents"][split] for s in per_shard) for split in SPLITS},
        "documents_with_tasks": {split: sum(s["documents_with_tasks"][split] for s in per_shard) for split in SPLITS},
        "skipped": {r: sum(s["skipped"][r] for s in per_shard) for r in reasons},
    }
    if config.unit != "token":  # what was counted: sentences, or span slots (spans_per_paragraph per paragraph)
        counts["candidates_in"] = counts.pop("positions_in")
        counts["candidates"] = "sentences" if config.unit == "sentence" else "span slots"
    # the mean of `live` over the written tasks: the share of groups predicted to carry signal
    counts["predicted_live"] = {}
    for split in SPLITS:
        n = sum(s.get("live_n", {}).get(split, 0) for s in per_shard)
        total = sum(s.get("live_sum", {}).get(split, 0.0) for s in per_shard)
        counts["predicted_live"][split] = round(total / n, 6) if n else None
    return counts
