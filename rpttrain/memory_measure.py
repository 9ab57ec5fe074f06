"""What the memory preflight reads off the run instead of assuming: the longest sequence the tasks
will really give, the attention kernel torch really dispatches, the memory the device has free,
and, once the run is over, the peak it really reached.

    data = data_shape(config, tasks_manifest, tokenizer)   # longest context, from Parquet statistics
    kernel = attention_kernel("cpu", torch.float32, heads=9, head_dim=64)   # "flash" on torch 2.13 CPU
    meter = PeakMeter("cpu"); ...; meter.read()               # {"baseline_bytes", "peak_bytes", "rise_bytes"}
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


# -- the data -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataShape:
    """The longest sequence a run's data gives, before the --max-prompt-tokens cap."""

    longest_context_tokens: int  # longest task context (corpus tokens), or longest document for ntp-all
    prompt_overhead_tokens: int  # tokens the prompt format adds around a context
    exact: bool  # the counts are in the policy's own tokens (same vocabulary as the tasks)
    source: str  # where the counts came from

    def as_dict(self) -> dict:
        return asdict(self)


def column_max(files: list[Path], column: str) -> int:
    """The largest value of an integer column over Parquet files: from each row group's statistics
    (no data read, so any corpus size costs the same), reading the column only where a file has
    none."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    best = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        names = [meta.schema.column(j).name for j in range(meta.num_columns)]
        if column not in names:
            raise ValueError(f"{f}: no column {column!r}")
        j = names.index(column)
        stats = [meta.row_group(i).column(j).statistics for i in range(meta.num_row_groups)]
        if all(s is not None and s.has_min_max for s in stats):
            best = max([best] + [int(s.max) for s in stats])
        else:
            values = pq.read_table(f, columns=[column]).column(0)
            if len(values):
                best = max(best, int(pc.max(values).as_py()))
    return best


def longest_tokenized(files: list[Path], column: str, tokenizer, batch_rows: int = 4096) -> int:
    """The most tokens any text of a string column has under `tokenizer`, read batch by batch."""
    import pyarrow.parquet as pq

    best = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=[column]):
            texts = [t or "" for t in batch.column(0).to_pylist()]
            if texts:
                best = max(best, max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]))
    return best


def data_shape(config, tasks_manifest: dict, tokenizer) -> DataShape:
    """The longest context the run will train on, and what its prompt format adds: from the task
    shards' `context_tokens` (or, for `--ntp-positions all`, the documents' `n_tokens`)."""
    from rptdata.io import list_shards
    from rpttrain.prompts import build_prompt_ids, load_prompt_format

    c = config
    exact = not c.allow_tokenizer_mismatch
    if c.on_documents:
        prepared = Path(tasks_manifest.get("prepared_dir") or "")
        files = list_shards(prepared / "docs")
        return DataShape(column_max(files, "n_tokens"), 0, exact, f"{prepared}/docs n_tokens")
    files = list_shards(Path(c.tasks_dir) / "train")
    if tasks_manifest.get("task_kind") == "answer":  # answer tasks are tokenizer-free: count with the policy's
        longest = longest_tokenized(files, "context", tokenizer)
        fmt = load_prompt_format(c.prompt_template)
        overhead = len(build_prompt_ids(fmt, "", tokenizer, 10**9))
        return DataShape(longest, overhead, True, f"{c.tasks_dir}/train questions, tokenized")
    longest = column_max(files, "context_tokens")
    fmt = load_prompt_format(c.prompt_template if c.samples_rollouts else "continuation")
    overhead = len(build_prompt_ids(fmt, "", tokenizer, 10**9))
    return DataShape(longest, overhead, exact, f"{c.tasks_dir}/train context_tokens")


# -- the attention kernel -------------------------------------------------------------------------
def attention_kernel(device: str, dtype, heads: int, head_dim: int, implementation: str = "sdpa") -> str:
    """The kernel torch dispatches for the model's attention on this device and dtype, asked of
    torch itself for a small masked, trainable batch: "flash" or "efficient" or "cudnn" (memory
    linear in the sequence) or "math" (keeps every score matrix), "eager" (transformers' own
    softmax attention, which keeps them too), or "unknown"."""
    if implementation == "eager":
        return "eager"
    if implementation not in ("sdpa", None):
        return "flash" if "flash" in str(implementation) else "unknown"
    import torch

    try:
        kw = dict(device=device, dtype=dtype, requires_grad=True)
        q, k, v = (torch.zeros(1, heads, 16, head_dim, **kw) for _ in range(3))
        mask = torch.ones(1, 1, 16, 16, dtype=torch.bool, device=device).tril()
        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False)
    except Exception as e:  # a torch without the query, or a device it cannot run: say so, assume nothing
        log.debug("attention kernel probe failed: %s", e)
        return "unknown"
    from torch.nn.attention import SDPBackend

    names = {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.MATH: "math"}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        names[SDPBackend.CUDNN_ATTENTION] = "cudnn"
    return next((name for b, name in names.items() if int(b) == int(choice)), "unknown")


# -- the device -----------------------------------------------------------------------------------
def available_bytes(device: str) -> tuple[int, int]:
    """(free, total) bytes of the device: CUDA's free memory, or the host's available RAM on CPU."""
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(free), int(total)
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
    except OSError:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages
    return info.get("MemAvailable", info.get("MemFree", 0)), info.get("MemTotal", 0)


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMeter:
    """The memory a run really adds: on CUDA the allocator's peak over what it held at the start;
    on CPU the process's peak resident set over its size at the start (the kernel's high-water
    mark, reset here through /proc/self/clear_refs; without it, the lifetime peak)."""

    def __init__(self, device: str):
        self.device = device
        if device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = int(torch.cuda.memory_reserved(device))
            self.kind = "cuda max_memory_reserved"
            return
        self.baseline = _proc_status("VmRSS") or 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            self.kind = "VmHWM"
        except OSError:
            self.kind = "ru_maxrss (lifetime peak)"

    def read(self) -> dict:
        if self.device.startswith("cuda"):
            import torch

            peak = int(torch.cuda.max_memory_reserved(self.device))
        elif self.kind == "VmHWM":
            peak = _proc_status("VmHWM") or 0
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "what": self.kind,
            "baseline_bytes": self.baseline,
            "peak_bytes": peak,
            "rise_bytes": max(0, peak - self.baseline),
        }
