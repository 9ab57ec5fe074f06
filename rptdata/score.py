"""`rpt score-entropy`: prepared documents -> per-position top-k entropy of a proxy model.

    run_score_entropy(ScoreConfig(prepared="out/prep", out="out/scored")) -> manifest dict

Position `pos` of a document has the context tokens[0:pos] and the target token_ids[pos]. Every
position with at least `min_context` tokens of context is scored once, with at most
`max_context - 1` tokens of context (the window: context + target). A document within the window
is one forward pass. A longer one is scored in one of two ways (`options.long_documents`):
  kv-carry  (hf scorer) consecutive chunks (`plan_chunks`): the first is the first window, each
            later one scores `max_context - overlap` new positions and carries the key/value
            cache of the `overlap` tokens before them, so each token is computed once;
  windows   (vLLM, or a model whose cache cannot be carried) `plan_windows`: each later window
            re-runs `overlap` tokens of context (default half the window), and the last one is
            shifted back so it is full; the overlap is computed again (about twice per token).
Either way every position sees at least min(pos, overlap) >= min_context tokens of context, and
the first window's positions (context = the whole prefix) get the same numbers.

Entropy over the proxy's k most likely next tokens (k = `top_k`, 16 as in the paper):
    full-softmax  H = -sum_{i<=k} p_i log p_i, p_i the full-vocabulary softmax probabilities
    renormalized  H = -sum_{i<=k} q_i log q_i, q_i = p_i / sum_{j<=k} p_j

Output (one positions shard per input docs shard, same index):
    OUT/positions/part-NNNNN.parquet  doc_id, pos, token_id, entropy, target_logprob, target_rank,
                                      top1_id [, topk_ids, topk_logprobs with save_topk]
    OUT/manifest.json                 proxy, tokenizer (copied from prepare), prepared dir and
                                      fingerprint, options, finished shards, counts
Rows kept: entropy >= threshold, or every scored position with keep_all. Counted per shard:
positions scored, kept, below the threshold, skipped for too little context.

Scale-out: `num_workers`/`worker_index` (or torchrun's WORLD_SIZE/RANK) split the input shards;
each worker writes its own shards and markers, and the worker that finds every shard done writes
the manifest (or `merge_scored(out)` afterwards). Resume and refusal rules: `rptdata.stage`.

Left out on purpose: a BOS token before the document (documents are scored exactly as prepared),
and scoring positions with no context.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from rptdata.engine_choice import ENGINE_CHOICES, choose_engine
from rptdata.errors import BadOption, ModelResolutionError, RptError
from rptdata.executors import Executor, connect, run_units
from rptdata.io import (
    MANIFEST,
    RUN_FILE,
    STAGE_PREPARE,
    STAGE_SCORE,
    check_shard,
    read_manifest,
    read_parquet,
    shard_index,
)
from rptdata.models import (
    DEFAULT_MODEL,
    check_tokenizer,
    load_tokenizer,
    local_model_dir,
    model_name,
    resolve_device,
    resolve_dtype,
    vocab_hash,
)
from rptdata.scorers import ENTROPY_MODES, MAX_CONTEXT_CAP, RUNTIME_KEYS, Scorer, load_scorer, scorer_runtime
from rptdata.scorers.positions import (
    DEFAULT_THRESHOLD,
    POSITIONS_SCHEMA,
    TOPK_FIELDS,
    ScoreWindow,
    check_context_options,
    long_document_method,
    score_docs,
)
from rptdata.stage import StageDir, run_stage, worker_from_env

log = logging.getLogger(__name__)

STAGE = STAGE_SCORE
POSITIONS_DIR = "positions"
COUNT_KEYS = (
    "documents",
    "documents_without_positions",
    "positions_scored",
    "positions_kept",
    "positions_below_threshold",
    "positions_skipped_short_context",
    "windows",
    "tokens_forwarded",
)


@dataclass(frozen=True)
class ScoreConfig:
    """Options of `rpt score-entropy`; see `rpt score-entropy --help` for each."""

    prepared: str
    out: str
    model: str = DEFAULT_MODEL
    top_k: int = 16
    threshold: float = DEFAULT_THRESHOLD
    keep_all: bool = False
    max_context: int | None = None  # None: the model's max positions, capped at 2048
    min_context: int = 1
    overlap: int | None = None  # None: max(min_context, max_context // 2)
    batch_tokens: int | None = None  # None: 8192 on CPU, 65536 on a GPU (hf scorer)
    engine: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    entropy: str = "full-softmax"
    save_topk: bool = False
    num_workers: int | None = None
    worker_index: int | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    executor: str = "local"  # local | ray (rptdata.executors)
    ray_address: str | None = None

    def __post_init__(self):
        Executor(self.executor, self.ray_address).refuse(
            **{"--num-workers": self.num_workers, "--worker-index": self.worker_index}
        )
        if self.top_k < 1:
            raise BadOption("--top-k must be at least 1")
        if self.threshold < 0:
            raise BadOption("--threshold must be >= 0 (entropies are never negative)")
        check_context_options(self.min_context, self.max_context, self.overlap)
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise BadOption("--batch-tokens must be at least 1")
        if self.engine not in ENGINE_CHOICES:
            raise BadOption(f"--engine must be one of {', '.join(ENGINE_CHOICES)}")
        if self.entropy not in ENTROPY_MODES:
            raise BadOption(f"--entropy must be one of {', '.join(ENTROPY_MODES)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise BadOption("--dtype must be auto, float32, bfloat16 or float16")


# ---------------------------------------------------------------------------------------------
# the stage


def run_score_entropy(config: ScoreConfig, scorer: Scorer | None = None) -> dict:
    """Score this worker's share of the prepared shards; returns the manifest once the stage is
    complete, else a progress summary with `"complete": False`.

    `scorer` lets a caller (benchmarks, tests) pass an scorer it already loaded; by default it is
    built from the config, and only when there is work left.
    """
    started = time.time()
    executor = Executor(config.executor, config.ray_address)
    if executor.kind == "ray":
        if scorer is not None:
            raise BadOption("a scorer passed in runs in this process; --executor ray loads one per actor")
        world = worker_from_env(None, None)[1]
        executor.refuse(**{"torchrun's WORLD_SIZE": world if world > 1 else None})
        executor.check()  # a cluster address that does not answer fails now, before anything is written
        config = _on_cluster(config, executor)
    prep_dir = Path(config.prepared).resolve()
    prep = read_manifest(prep_dir, STAGE_PREPARE)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    proxy = {"name": model_name(config.model), "spec": config.model, "vocab_hash": vocab_hash(tokenizer)}
    check_tokenizer(
        prep.get("tokenizer"),
        proxy,
        built=f"{prep_dir} was prepared",
        user="the proxy model",
        harm="its token ids would mean other tokens",
        fix=f"Prepare the corpus again with `rpt prepare ... --tokenizer {config.model}`, or score with a proxy "
        "that shares the corpus tokenizer",
    )

    engine_name = scorer.name if scorer is not None else choose_engine(config.engine, config.device)
    model_config = _model_config(config) if scorer is None else None
    window = ScoreWindow(
        config.max_context or _default_max_context(scorer, model_config), config.min_context, config.overlap
    )
    max_context = window.max_context
    identity = {
        "prepared": {"dir": str(prep_dir), "fingerprint": prep.get("fingerprint"), "input_shards": prep["shards"]},
        "proxy": proxy,
        "tokenizer": prep["tokenizer"],
        "options": {
            "engine": engine_name,
            "dtype": scorer.dtype
            if scorer is not None
            else _resolved_dtype(config, engine_name, executor.kind == "ray"),
            "top_k": config.top_k,
            "entropy": config.entropy,
            "threshold": None if config.keep_all else config.threshold,
            "keep_all": config.keep_all,
            "max_context": window.max_context,
            "min_context": window.min_context,
            "overlap": window.overlap,
            "save_topk": config.save_topk,
            "long_documents": _long_documents(engine_name, scorer, model_config),
        },
    }
    stage = StageDir(Path(config.out), STAGE, [POSITIONS_DIR])
    state = stage.begin(identity, overwrite=config.overwrite)
    if state == "done":
        log.info("%s is already complete; nothing to do", config.out)
        return read_manifest(config.out, STAGE)

    worker, workers = worker_from_env(config.num_workers, config.worker_index)
    inputs = {shard_index(s): s for s in prep["shards"]}

    def run(todo: list[int]) -> None:
        nonlocal scorer
        for i in todo:  # a damaged prepared shard stops the run before any work, naming it
            check_shard(prep_dir, inputs[i], prep)
        if scorer is None and executor.kind == "local":
            scorer = _ShardScorer.load(config, engine_name, max_context)
        if scorer is not None and (
            scorer.top_k != config.top_k or getattr(scorer, "entropy", config.entropy) != config.entropy
        ):
            raise BadOption("the scorer passed in was built with another top_k or entropy mode than the config")
        factory = partial(
            _ShardScorer, config, engine_name, max_context, stage, prep_dir, inputs, identity["options"], scorer
        )
        _score_shards(prep_dir, inputs, todo, factory, identity["options"], config, executor)

    def runtime() -> dict:  # batch_tokens and device: as the shards' markers record them, if they do
        return {
            "batch_tokens": getattr(scorer, "batch_tokens", config.batch_tokens),
            "device": getattr(scorer, "device", config.device),
            "worker": [worker, workers],
            "seconds": round(time.time() - started, 2),
        }

    return run_stage(
        stage,
        sorted(inputs),
        worker=worker,
        workers=workers,
        done=lambda: stage.done_shards(POSITIONS_DIR),
        run=run,
        finish=lambda done: _finish(stage, identity, runtime(), done),
        counts={key: key for key in COUNT_KEYS},
    )


def _score_shards(prep_dir: Path, inputs: dict, todo: list, factory, options: dict, config, executor) -> None:
    from tqdm import tqdm

    weights = {}
    for i in todo:
        n = read_parquet(prep_dir / inputs[i], columns=["n_tokens"]).column("n_tokens").to_numpy()
        weights[i] = int(np.maximum(n - options["min_context"], 0).sum())
    with tqdm(
        total=sum(weights.values()),
        desc="score-entropy",
        unit=" tok",
        unit_scale=True,
        disable=not config.progress,
        dynamic_ncols=True,
    ) as bar:
        for _ in run_units(
            todo,
            factory,
            executor,
            bar=bar,
            weights=weights,
            actors=True,
            describe=lambda i: f"shard {POSITIONS_DIR}/part-{i:05d}.parquet (input {prep_dir / inputs[i]})",
        ):
            pass


class _ShardScorer:
    """Scores shards one at a time (`run`) with one scorer: in this process, or in a Ray actor."""

    def __init__(
        self,
        config: ScoreConfig,
        engine_name: str,
        max_context: int,
        stage: StageDir,
        prep_dir: Path,
        inputs: dict,
        options: dict,
        scorer=None,
    ):
        self.stage, self.prep_dir, self.inputs, self.options = stage, prep_dir, inputs, options
        self.scorer = scorer or self.load(config, engine_name, max_context)

    @staticmethod
    def load(config: ScoreConfig, engine_name: str, max_context: int) -> Scorer:
        return load_scorer(
            engine_name,
            config.model,
            dtype=config.dtype,
            device=config.device,
            top_k=config.top_k,
            entropy=config.entropy,
            batch_tokens=config.batch_tokens,
            max_context=max_context,
            trust_remote_code=config.trust_remote_code,
        )

    def run(self, i: int, advance) -> dict:
        return _score_shard(self.stage, self.prep_dir / self.inputs[i], i, self.scorer, self.options, advance)


def _on_cluster(config: ScoreConfig, executor) -> ScoreConfig:
    """--device auto means the cluster's devices (GPUs when it has any), not the driver's."""
    if config.device != "auto":
        return config
    gpus = connect(executor.address).cluster_resources().get("GPU", 0)
    return replace(config, device="cuda" if gpus else "cpu")


def _score_shard(stage: StageDir, path: Path, index: int, scorer, options: dict, progress) -> dict:
    """Score one input shard and write its positions shard + completion marker."""
    t0 = time.time()
    table = read_parquet(path, columns=["doc_id", "token_ids"])
    token_lists = table.column("token_ids").combine_chunks()
    offsets = token_lists.offsets.to_numpy()
    flat = token_lists.values.to_numpy(zero_copy_only=False)
    tokens = [flat[offsets[j] : offsets[j + 1]] for j in range(len(offsets) - 1)]
    positions, stats = score_docs(
        scorer,
        table.column("doc_id").to_pylist(),
        tokens,
        max_context=options["max_context"],
        min_context=options["min_context"],
        overlap=options["overlap"],
        threshold=options["threshold"],
        save_topk=options["save_topk"],
        long_documents=options.get("long_documents", "windows"),
        progress=progress,
    )
    stats["input_shard"] = f"{path.parent.name}/{path.name}"
    stats["seconds"] = round(time.time() - t0, 3)
    stats["runtime"] = scorer_runtime(scorer)
    stage.write_shard(POSITIONS_DIR, index, positions, stats)
    return stats


def _recorded_runtime(markers: list[dict]) -> dict:
    """`scorer_runtime` as the shards' markers record it: per field its one value, or its values in
    shard order when shards differ (a run resumed on other hardware); absent in an older rpt's markers."""
    out = {}
    for key in RUNTIME_KEYS:
        values = [m["runtime"][key] for m in markers if (m.get("runtime") or {}).get(key) is not None]
        values = [v for i, v in enumerate(values) if v not in values[:i]]
        if values:
            out[key] = values[0] if len(values) == 1 else values
    return out


def merge_scored(out: str | Path) -> dict:
    """Write OUT/manifest.json once every worker's shards are done (`rpt score-entropy OUT --merge`)."""
    run_file = Path(out) / RUN_FILE
    if (Path(out) / MANIFEST).exists():
        return read_manifest(out, STAGE)
    if not run_file.exists():
        raise RptError(f"{out}: not an `rpt score-entropy` output directory (no {RUN_FILE})")
    run = json.loads(run_file.read_text())
    if run.get("stage") != STAGE:
        raise RptError(f"{out}: holds a `rpt {run.get('stage')}` run, not score-entropy")
    stage = StageDir(Path(out), STAGE, [POSITIONS_DIR])
    inputs = sorted(shard_index(s) for s in run["config"]["prepared"]["input_shards"])
    done = stage.done_shards(POSITIONS_DIR)
    missing = [i for i in inputs if i not in done]
    if missing:
        raise RptError(
            f"{out}: {len(missing)} of {len(inputs)} shard(s) are not finished yet "
            f"(e.g. {', '.join(f'part-{i:05d}' for i in missing[:5])}); run the missing workers first"
        )
    return _finish(stage, run["config"], {"merged": True}, done)


# -- helpers --------------------------------------------------------------------------------------


def _resolved_dtype(config: ScoreConfig, engine_name: str, on_cluster: bool = False) -> str:
    if on_cluster:  # the device is the cluster's (`_on_cluster`), which this machine may lack
        device = config.device
    elif engine_name == "vllm":
        import torch

        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = resolve_device(config.device)
    return str(resolve_dtype(config.dtype, device)).removeprefix("torch.")


def _model_config(config: ScoreConfig):
    """The proxy's transformers config (no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local_model_dir(config.model), trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelResolutionError(f"{config.model}: cannot read the model config: {e}") from e


def _default_max_context(scorer, model_config) -> int:
    """The model's max positions capped at MAX_CONTEXT_CAP."""
    source = scorer if scorer is not None else model_config
    max_positions = getattr(source, "max_positions" if scorer is not None else "max_position_embeddings", None)
    return min(max_positions or MAX_CONTEXT_CAP, MAX_CONTEXT_CAP)


def _long_documents(engine_name: str, scorer, model_config) -> str:
    """long_document_method for a loaded scorer, or predicted from the config before loading."""
    if scorer is not None:
        return long_document_method(scorer.name, getattr(scorer, "carries_kv", False))
    if engine_name != "hf":
        return "windows"
    from rptdata.scorers.hf import kv_carry_supported

    return long_document_method(engine_name, kv_carry_supported(model_config))


def _finish(stage: StageDir, identity: dict, runtime: dict, done: dict[int, dict]) -> dict:
    """The manifest, from every shard's marker; `runtime`'s batch_tokens and device as the scorers
    that wrote the shards resolved them (the same fields and values on every executor)."""
    inputs = {shard_index(s): s for s in identity["prepared"]["input_shards"]}
    counts = {key: sum(int(done[i].get(key, 0)) for i in inputs) for key in COUNT_KEYS}
    runtime = {**runtime, **_recorded_runtime([done[i] for i in sorted(inputs)])}
    schema = POSITIONS_SCHEMA
    if identity["options"]["save_topk"]:
        schema = pa.schema(list(POSITIONS_SCHEMA) + [pa.field(n, t) for n, t in TOPK_FIELDS])
    return stage.finish(
        {
            "proxy": identity["proxy"],
            "tokenizer": identity["tokenizer"],
            "prepared": {k: identity["prepared"][k] for k in ("dir", "fingerprint")},
            "options": identity["options"],
            "runtime": runtime,
            "input_shards": [inputs[i] for i in sorted(inputs)],
            "shards": [f"{POSITIONS_DIR}/part-{i:05d}.parquet" for i in sorted(inputs)],
            "schema": {f.name: str(f.type) for f in schema},
            "counts": counts,
            "seconds": round(sum(float(done[i].get("seconds", 0)) for i in inputs), 2),
        }
    )
