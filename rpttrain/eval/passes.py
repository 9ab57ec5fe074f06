"""The model passes of `rpt eval`: one subject (model or checkpoint) over the tasks it still lacks.

    evaluate_subject(ctx, subject, {"ntp": [0, 1, ...], "reasoning": [...]}, device)
        ntp        ntp_chunk: raw context -> one batched forward (left-padded, last position only) ->
                   argmax token decoded to text -> reward; plus the model's full-softmax entropy
        reasoning  reasoning_chunk: training prompt -> rollout engine -> the format's extraction -> reward
    band_entropies(config, out, tasks, manifest)   # the entropy each task's band comes from

Every `flush_every` tasks the chunk's rows go to the predictions store, so a crash loses at
most one chunk.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from rptdata.engine_choice import choose_engine
from rptdata.errors import BadOption, MissingUpstream
from rptdata.io import read_manifest, write_parquet_atomic
from rptdata.models import load_causal_lm, load_tokenizer, local_model_dir, resolve_device, vocab_hash
from rptdata.scorers import entropy_from_logits
from rpttrain.batching import last_positions_logits, plan_batches
from rpttrain.dense import GroupScorer
from rpttrain.eval.config import MODES, EvalConfig
from rpttrain.eval.store import BAND_ENTROPY_FILE, Store, empty_rows
from rpttrain.eval.subjects import Subject
from rpttrain.prompts import load_prompt_format, task_prompt_ids
from rpttrain.reward import score_group
from rpttrain.rollout import Sampling, make_engine, stop_ids

log = logging.getLogger(__name__)


@dataclass
class NextTokens:
    """Per context: the greedy next token, the full-softmax entropy, the top-k entropy (if asked),
    and the greedy token's probability (what the dense rewards give a wrong one)."""

    ids: list[int]
    entropy: list[float]
    topk_entropy: list[float] | None = None
    top1_prob: list[float] = field(default_factory=list)


def next_token_pass(
    model,
    id_lists: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    top_k: int | None = None,
    entropy_mode: str = "full-softmax",
) -> NextTokens:
    """One forward pass per batch of contexts (left-padded, only the last position through the
    LM head); returns the argmax next token and entropies of each context, in input order."""
    n = len(id_lists)
    out = NextTokens([0] * n, [0.0] * n, [0.0] * n if top_k else None, [0.0] * n)
    if batch_size < 1:
        raise BadOption("batch_size must be at least 1")
    with torch.no_grad():
        for batch in plan_batches([len(x) for x in id_lists], max_rows=batch_size):
            logits = last_positions_logits(model, [id_lists[i] for i in batch], k=1, pad_id=pad_id)[:, -1].float()
            top1 = logits.argmax(-1).tolist()
            logp = torch.log_softmax(logits, dim=-1)
            ent = torch.special.entr(logp.exp()).sum(-1).tolist()
            top1_p = logp.max(-1).values.exp().tolist()
            if top_k:
                topk = entropy_from_logits(logits, k=top_k, mode=entropy_mode).tolist()
            for row, i in enumerate(batch):
                out.ids[i] = int(top1[row])
                out.entropy[i] = float(ent[row])
                out.top1_prob[i] = float(top1_p[row])
                if top_k:
                    out.topk_entropy[i] = float(topk[row])
    return out


def context_ids(tokenizer, contexts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Raw contexts as token ids (no special tokens), keeping the last `max_tokens`; an empty
    context becomes the BOS (or EOS) token so the model has something to read."""
    enc = tokenizer(list(contexts), add_special_tokens=False)["input_ids"]
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = []
    for ids in enc:
        ids = list(ids[len(ids) - max_tokens :]) if len(ids) > max_tokens else list(ids)
        out.append(ids or [int(fallback or 0)])
    return out


def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def max_positions(model, wanted: int) -> int:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(wanted, int(limit)) if limit else wanted


@dataclass
class Context:
    """What every chunk needs (built once per evaluation)."""

    config: EvalConfig
    tasks: list[dict]
    entropy: list[float]
    bands: list[str]
    store: Store
    reward_fn: object  # the string reward; None for the dense ones, which score through rpttrain.dense
    timings: dict = field(default_factory=dict)  # (label, mode) -> [seconds, tasks]
    judge: object = None  # --reward judge: the rpttrain.judge.Judge every subject's predictions go to


def add_prediction(
    rows: dict[str, list],
    ctx: Context,
    i: int,
    label: str,
    mode: str,
    sample: int,
    prediction: str | None,
    model_entropy: float | None,
    new_tokens: int,
    reward: float,
    completion: str | None = None,
    status: str | None = None,
) -> None:
    """Append one PREDICTIONS_SCHEMA row for task i: the prediction, its reward and the task's band."""
    task = ctx.tasks[i]
    rows["task_id"].append(task["task_id"])
    rows["model"].append(label)
    rows["mode"].append(mode)
    rows["sample"].append(sample)
    rows["prediction"].append(prediction)
    rows["reward"].append(float(reward))
    rows["band"].append(ctx.bands[i])
    rows["entropy"].append(ctx.entropy[i])
    rows["model_entropy"].append(model_entropy)
    rows["new_tokens"].append(new_tokens)
    rows["completion"].append(completion)
    rows["status"].append(status)


def ntp_chunk(ctx: Context, subject: Subject, model, tok, idx: list[int]) -> dict[str, list]:
    c = ctx.config
    ids = context_ids(tok, [ctx.tasks[i]["context"] for i in idx], max_positions(model, c.max_prompt_tokens))
    res = next_token_pass(model, ids, c.batch_size, pad_id(tok))
    rows = empty_rows()
    for j, i in enumerate(idx):
        task, pred = ctx.tasks[i], tok.decode([res.ids[j]])
        # dense rewards: y[0] is the greedy token and P(y[0] | x<t) comes from this same forward
        (r,), _ = score_group(
            c.reward,
            [pred],
            task["continuation"],
            task["boundaries"],
            [res.ids[j]],
            task.get("target_id"),
            [res.top1_prob[j]],
        )
        add_prediction(rows, ctx, i, subject.label, "ntp", 0, pred, res.entropy[j], 1, r)
    return rows


def reasoning_chunk(
    ctx: Context, subject: Subject, engine, tok, fmt, idx: list[int], model=None, mode: str = "reasoning"
) -> dict[str, list]:
    """Generate with the prompt format and score with the reward; `mode` "answer": answer tasks,
    the math reward (each row keeps math-verify's reading of the final answer and the check's status)."""
    c = ctx.config
    prompts = [task_prompt_ids(fmt, ctx.tasks[i], tok, c.max_prompt_tokens) for i in idx]
    sampling = Sampling(
        n=c.samples,
        temperature=subject.temperature,
        max_new_tokens=subject.max_new_tokens,
        seed=c.seed + idx[0],
        stop_token_ids=stop_ids(tok),
    )
    groups = engine.generate(prompts, sampling)
    scorer = GroupScorer(c.reward, fmt, tok, model, c.max_prompt_tokens, judge=ctx.judge)
    scored = scorer.score([ctx.tasks[i] for i in idx], groups)
    rows = empty_rows()
    for i, group, sg in zip(idx, groups, scored):
        for s, comp in enumerate(group):
            status = None if sg.statuses is None else sg.statuses[s]
            add_prediction(
                rows,
                ctx,
                i,
                subject.label,
                mode,
                s,
                sg.predictions[s],
                None,
                len(comp.token_ids),
                sg.rewards[s],
                comp.text,
                status,
            )
    return rows


def _vllm_path(spec: str) -> str:
    return spec if Path(spec).is_dir() else local_model_dir(spec)


def evaluate_subject(ctx: Context, subject: Subject, todo: dict[str, list[int]], device: str) -> dict:
    """Run the missing (task, mode) rows of one subject; returns facts about it for the report."""
    c = ctx.config
    tok = load_tokenizer(subject.spec, trust_remote_code=c.trust_remote_code)
    info = {"vocab_hash": vocab_hash(tok)}
    if not any(todo.values()):
        return info
    model = load_causal_lm(subject.spec, dtype=c.dtype, device=device, trust_remote_code=c.trust_remote_code)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    engine = None
    try:
        for mode in MODES:
            idx = todo.get(mode) or []
            if not idx:
                continue
            fmt = None
            if mode != "ntp":
                fmt = load_prompt_format(subject.prompt_template)
                name = choose_engine(c.engine, device)
                kwargs = (
                    {"max_batch_sequences": c.batch_size}
                    if name == "hf"
                    else {"model_path": _vllm_path(subject.spec), "seed": c.seed, "dtype": c.dtype}
                )
                engine = make_engine(name, model, tok, **kwargs)  # vLLM itself is imported only when picked
            started = time.perf_counter()
            bar = tqdm(
                total=len(idx),
                desc=f"eval {subject.label} {mode}",
                unit=" task",
                disable=not c.progress,
                dynamic_ncols=True,
            )
            for start in range(0, len(idx), c.flush_every):
                chunk = idx[start : start + c.flush_every]
                if mode == "ntp":
                    rows = ntp_chunk(ctx, subject, model, tok, chunk)
                else:
                    rows = reasoning_chunk(ctx, subject, engine, tok, fmt, chunk, model, mode)
                ctx.store.write(rows)
                bar.update(len(chunk))
            bar.close()
            ctx.timings[(subject.label, mode)] = [time.perf_counter() - started, len(idx)]
    finally:
        if engine is not None:
            engine.close()
        del model
        gc.collect()
    return info


def band_entropies(config: EvalConfig, out: Path, tasks: list[dict], manifest: dict) -> tuple[list[float], dict]:
    """The entropy each task's band comes from, and a description of its source."""
    if config.band_model is None:
        proxy = manifest.get("proxy") or {}
        return [float("nan") if t["entropy"] is None else float(t["entropy"]) for t in tasks], {
            "source": "tasks",
            "proxy": proxy.get("name") or proxy.get("spec"),
        }
    top_k, mode = 16, "full-softmax"
    try:  # use the definition of the scorer that built these tasks
        options = read_manifest(Path(manifest["scored_dir"])).get("options") or {}
        top_k, mode = int(options.get("top_k", top_k)), str(options.get("entropy", mode))
    except (KeyError, TypeError, ValueError, MissingUpstream):
        pass
    cache_path = out / BAND_ENTROPY_FILE
    cached: dict[str, float] = {}
    if cache_path.exists():
        t = pq.read_table(cache_path)
        cached = dict(zip(t.column("task_id").to_pylist(), t.column("entropy").to_pylist()))
    missing = [i for i, t in enumerate(tasks) if t["task_id"] not in cached]
    if missing:
        device = resolve_device(config.device)
        tok = load_tokenizer(config.band_model, trust_remote_code=config.trust_remote_code)
        model = load_causal_lm(
            config.band_model, dtype=config.dtype, device=device, trust_remote_code=config.trust_remote_code
        )
        ids = context_ids(tok, [tasks[i]["context"] for i in missing], max_positions(model, config.max_prompt_tokens))
        log.info("band entropy: %d contexts through %s", len(ids), config.band_model)
        res = next_token_pass(model, ids, config.batch_size, pad_id(tok), top_k=top_k, entropy_mode=mode)
        for i, h in zip(missing, res.topk_entropy):
            cached[tasks[i]["task_id"]] = h
        write_parquet_atomic(
            pa.table({"task_id": list(cached), "entropy": pa.array(list(cached.values()), pa.float32())}), cache_path
        )
        del model
        gc.collect()
    return [float(cached[t["task_id"]]) for t in tasks], {
        "source": "band_model",
        "model": config.band_model,
        "top_k": top_k,
        "mode": mode,
    }
