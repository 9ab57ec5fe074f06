"""The memory preflight of a training run, in one place for every backend that trains in this
process (`--backend rpt`, rpt's own trainer, and `--backend trl`): estimate the run's peak memory
before any weight is loaded (`rpttrain.memory`, sized from the run's own data and device by
`rpttrain.memory_measure`), refuse or warn, write RUN/preflight.json, and add the measured peak
at the end of the run.

    memory = RunPreflight.plan(config, device, precision, tasks_manifest, tokenizer, backend="rpt")
    memory.start(run_dir)      # RUN/preflight.json; the peak meter starts
    ...                        # the run
    memory.finish()            # the measured peak, beside the estimate
    print(format_plan(dry_run(config)))    # `rpt train --dry-run`: loads no weight, writes nothing

`--backend rpt` enforces the verdict (--memory-check, the default): a run that cannot fit stops
before its model loads. `--backend trl` is estimated as rpt's trainer would run it and only warned
about: the estimate is calibrated on rpt's trainer, not on TRL's (which holds, e.g., logits for
every completion token). verl's workers size themselves.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from rptdata.errors import BackendOptionError
from rptdata.io import write_json_atomic
from rpttrain.memory import (
    GIB,
    InsufficientMemory,
    TrainSizing,
    check_fits,
    describe,
    estimate_train_memory,
    refusal,
    shape_from_config,
    way_out,
)
from rpttrain.memory_measure import PeakMeter, attention_kernel, available_bytes, data_shape

log = logging.getLogger(__name__)

PREFLIGHT = "preflight.json"  # the estimate, what it was sized from, and the measured peak
IN_PROCESS = ("rpt", "trl")  # the backends that train in this process, on this device
TRL_NOTE = "--backend trl: estimated as for rpt's trainer, not checked"


def plan(
    config, device: str, precision, engine: str = "hf", tasks_manifest: dict | None = None, tokenizer=None
) -> dict:
    """The preflight record of a run (what RUN/preflight.json holds): the estimate by part, what
    the device has free, what the estimate was sized from, the verdict ("fits", "may-not-fit",
    "does-not-fit"), its warnings, and for a run that does not fit the `refusal` message."""
    cfg = load_model_config_for(config)
    shape = shape_from_config(cfg)
    free, total = available_bytes(device)
    if config.memory_budget_gib is not None:
        free = total = int(config.memory_budget_gib * GIB)
    warnings = []
    data = None
    if tasks_manifest is not None and tokenizer is not None:
        try:
            data = data_shape(config, tasks_manifest, tokenizer)
        except (OSError, ValueError) as e:
            warnings.append(f"sized from the limits, not the data ({e})")
        if data is not None and not data.exact:
            warnings.append("--allow-tokenizer-mismatch: context lengths are in the corpus tokenizer's tokens")
    implementation = getattr(cfg, "_attn_implementation", None) or "sdpa"
    kernel = attention_kernel(device, precision.compute, shape.heads, shape.hidden // shape.heads, implementation)
    if kernel == "unknown":
        warnings.append(f"attention kernel unknown ({implementation}): score matrices counted as kept")
    if config.trust_remote_code:
        warnings.append("remote modeling code: its activations may differ from a standard decoder's")
    if device.startswith("cuda") and engine == "vllm":
        warnings.append("vLLM's share is its --vllm-gpu-memory-utilization of the device, not measured")

    def sizing_of(c):
        return TrainSizing.of(c, precision, device, engine, data=data, attention=kernel)

    sizing = sizing_of(config)
    parts = estimate_train_memory(shape, sizing, total)
    record = {
        "device": device,
        "model": config.model,
        "n_params": shape.n_params,
        "precision": precision.describe(),
        "estimate_bytes": parts,
        "available_bytes": free,
        "sized_from": {
            **{k: v for k, v in asdict(sizing).items() if k not in ("device",)},
            "micro_batch_tokens": sizing.micro_batch_tokens,
            "data": data.as_dict() if data else None,
        },
        "warnings": warnings,
    }
    log.info(
        "memory estimate for %s (%.2fB parameters, %s, attention %s, sequences of %d tokens, %d a micro-batch): "
        "%s; free: %.1f GiB",
        config.model,
        shape.n_params / 1e9,
        precision.describe(),
        kernel,
        sizing.sequence_tokens,
        sizing.micro_batch_rows,
        describe(parts),
        free / GIB,
    )
    way = way_out(shape, config, sizing_of, free) if parts["peak"] > free else None
    record["verdict"] = check_fits(parts, free)
    if record["verdict"] == "does-not-fit":
        record["refusal"] = refusal(parts, free, device, way)
    if record["verdict"] == "may-not-fit":
        record["warnings"].append(
            f"the estimate ({describe(parts)}) is more than the {free / GIB:.1f} GiB free, though within its "
            f"error; if it runs out of memory, use {way or 'a multi-GPU backend'}"
        )
    return record


def preflight(
    config,
    device: str,
    precision,
    engine: str = "hf",
    tasks_manifest: dict | None = None,
    tokenizer=None,
    enforce: bool = True,
) -> dict:
    """`plan`, with its warnings logged; raises InsufficientMemory for a run that does not fit
    when `enforce` (--memory-check, the default). Without it, a failure to estimate is recorded,
    not raised: the user asked to run unchecked."""
    try:
        record = plan(config, device, precision, engine, tasks_manifest, tokenizer)
    except Exception as e:
        if enforce:
            raise
        log.warning("memory preflight: no estimate (%s)", e)
        return {"device": device, "model": config.model, "error": str(e), "verdict": "unchecked"}
    for w in record["warnings"]:
        log.warning("memory preflight: %s", w)
    if record["verdict"] == "does-not-fit":
        if enforce:
            raise InsufficientMemory(record["refusal"] + " Stopped before loading the model.")
        if not config.memory_check:  # a dry run prints it itself
            log.warning("memory preflight (not enforced, --no-memory-check): %s", record["refusal"])
    return record


def load_model_config_for(config):
    from rptdata.models import load_model_config

    return load_model_config(config.model, trust_remote_code=config.trust_remote_code)


def format_plan(record: dict) -> str:
    """The preflight record as `rpt train --dry-run` prints it."""
    parts = record["estimate_bytes"]
    lines = [f"memory preflight: {record['model']} on {record['device']} ({record['precision']})"]
    for k, v in parts.items():
        if k != "peak":
            lines.append(f"  {k:<13} {v / GIB:8.2f} GiB")
    lines.append(
        f"  {'peak':<13} {parts['peak'] / GIB:8.2f} GiB   (available: {record['available_bytes'] / GIB:.1f} GiB)"
    )
    s = record["sized_from"]
    lines.append(
        f"sized from: sequences of {s['sequence_tokens']} tokens, {s['micro_batch_rows']} a micro-batch "
        f"({s['micro_batch_tokens']} tokens), {s['logit_positions']} positions through the LM head, "
        f"attention kernel {s['attention']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
    )
    if s.get("data"):
        d = s["data"]
        lines.append(
            f"  longest context {d['longest_context_tokens']} tokens + prompt format {d['prompt_overhead_tokens']} "
            f"(from {d['source']})"
        )
    for w in record["warnings"]:
        lines.append(f"warning: {w}")
    lines.append(f"verdict: {record['verdict']}")
    return "\n".join(lines)


def rollout_engine(config, device: str, backend: str = "rpt") -> str:
    """The rollout engine the estimate counts: rpt's --engine choice (`choose_engine`) for its GRPO
    runs, none ("hf", no generation) for the next-token objectives; TRL generates with vLLM only
    for --engine vllm (auto and hf: transformers)."""
    from rptdata.engine_choice import choose_engine

    if not config.samples_rollouts:
        return "hf"
    if backend == "trl":
        return "vllm" if config.engine == "vllm" else "hf"
    return choose_engine(config.engine, device)


class RunPreflight:
    """A run's preflight, from the estimate to the measured peak; the one writer of
    RUN/preflight.json (`_write`)."""

    def __init__(self, record: dict, device: str):
        self.record = record
        self.device = device
        self.path: Path | None = None
        self.meter: PeakMeter | None = None

    @classmethod
    def plan(
        cls, config, device: str, precision, tasks_manifest: dict, tokenizer, backend: str = "rpt", enforce=None
    ) -> RunPreflight:
        """Estimate `backend`'s run (`IN_PROCESS`) before any weight loads. Raises InsufficientMemory
        for a run that cannot fit when enforced: by default --memory-check for rpt, never for trl."""
        if enforce is None:
            enforce = backend == "rpt" and config.memory_check
        engine = rollout_engine(config, device, backend)
        record = preflight(config, device, precision, engine, tasks_manifest, tokenizer, enforce=enforce)
        if backend == "trl":
            record.setdefault("warnings", []).append(TRL_NOTE)
        return cls(record, device)

    def start(self, run_dir: str | Path) -> None:
        """Write RUN/preflight.json, then measure what the run adds from here on."""
        self.path = Path(run_dir) / PREFLIGHT
        self._write()
        self.meter = PeakMeter(self.device)

    def finish(self) -> None:
        """Add the measured peak rise (and estimate / measured) to RUN/preflight.json."""
        measured = self.meter.read()
        peak = (self.record.get("estimate_bytes") or {}).get("peak")
        if peak and measured["rise_bytes"]:
            measured["estimate_over_measured"] = round(peak / measured["rise_bytes"], 3)
        self.record["measured"] = measured
        self._write()
        log.info(
            "memory: measured peak rise %.2f GiB (%s)%s",
            measured["rise_bytes"] / GIB,
            measured["what"],
            f", estimate / measured {measured['estimate_over_measured']}"
            if "estimate_over_measured" in measured
            else "",
        )

    def _write(self) -> None:
        write_json_atomic(self.path, self.record)


def dry_run(config, backend: str = "rpt", processes: int = 1) -> dict:
    """`rpt train --dry-run`: the preflight record of the run as `backend` would start it (its
    tasks and tokenizer checked as the run checks them), without loading a weight or writing a file."""
    from rptdata.models import resolve_device
    from rpttrain.data import open_tasks, policy_tokenizer
    from rpttrain.precision import resolve_precision

    if backend not in IN_PROCESS or processes > 1:
        raise BackendOptionError(
            "--dry-run sizes one process on one device (--backend rpt, or trl with one "
            "process); verl and multi-process trl shard the run across their workers"
        )
    device = resolve_device(config.device)
    precision = resolve_precision(config.compute_dtype, config.master_dtype, device)
    tasks_manifest = open_tasks(config)
    tokenizer = policy_tokenizer(config, tasks_manifest)
    return RunPreflight.plan(config, device, precision, tasks_manifest, tokenizer, backend, enforce=False).record
