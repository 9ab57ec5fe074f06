"""Memory preflight for `rpt train`: estimate what a run needs before any weight is loaded, and
refuse a run that cannot fit, with the numbers and the ways out.

    shape = model_shape("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B")     # config.json only, meta tensors
    est = estimate_train_memory(shape, TrainSizing.of(config, precision, device))
    check_fits(est, available_bytes("cuda"), "cuda")                      # raises InsufficientMemory

What is counted (bytes; N parameters, layers L, hidden h, MLP width i, vocabulary V):
    weights      N x master bytes (float32: 4)
    gradients    N x master bytes (they accumulate in the parameters' dtype)
    adamw        2 N x master bytes (exp_avg, exp_avg_sq in the parameters' dtype)
    compute copy N x compute bytes when mixed: autocast keeps the cast weights for the backward
    reference    N x compute bytes when --kl-coef > 0
    vllm         --vllm-gpu-memory-utilization x device total (vLLM reserves it up front), on CUDA
    activations  per micro-batch: T tokens x L x (14 h + 4 i) x compute bytes without gradient
                 checkpointing (the tensors one decoder layer keeps for its backward); with it,
                 T x L x h (each layer's input) plus one layer's full set; plus the attention
                 score matrices on CPU (math attention keeps them; flash/SDPA on GPU does not)
    logits       positions that reach the LM head x V x (compute + 4 + 4) (the logits, their
                 float32 upcast for log-softmax, and its gradient)
    rollout      the transformers engine's KV cache for 64 sequences of prompt + completion
                 (overlaps the update in time, so the peak takes the larger of the two)
Left out: allocator fragmentation and the CUDA context (about 1 GiB, added as `runtime`), and
buffers of custom kernels. Checked against a measured peak on CPU for the embedded model
(tests/test_precision.py); on a GPU `make gpu-check` records the measured peak beside it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from rptdata.errors import RptError

log = logging.getLogger(__name__)

GIB = 2**30
ROLLOUT_SEQUENCES = 64  # rpttrain.rollout.hf.HFEngine's max_batch_sequences


class InsufficientMemory(RptError):
    """The run's estimated peak memory exceeds what the device has free."""


@dataclass(frozen=True)
class ModelShape:
    n_params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_dim: int  # key/value width per token and layer (kv heads x head dim)


def shape_from_config(config) -> ModelShape:
    """The sizes that matter for memory, from a transformers config (counting the parameters on
    the meta device: exact, tied embeddings once, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    return ModelShape(
        n_params=n, layers=int(text.num_hidden_layers), hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden), vocab=int(text.vocab_size),
        heads=heads, kv_dim=kv_heads * head_dim,
    )


def model_shape(spec: str, trust_remote_code: bool = False) -> ModelShape:
    from rptdata.models import load_model_config

    return shape_from_config(load_model_config(spec, trust_remote_code=trust_remote_code))


@dataclass(frozen=True)
class TrainSizing:
    """What a run's settings say about its memory (everything but the model's shape)."""

    device: str
    compute_bytes: int
    master_bytes: int
    micro_batch_tokens: int  # tokens in the largest micro-batch (the budget, or one step's worth if less)
    sequence_tokens: int  # longest sequence through the update (prompt + completion)
    logit_positions: int  # positions that reach the LM head in one micro-batch
    gradient_checkpointing: bool
    reference_model: bool
    rollout_kv_tokens: int  # tokens of KV cache the transformers engine holds while generating
    vllm_fraction: float  # share of the device vLLM reserves (0 without vLLM on CUDA)

    @classmethod
    def of(cls, config, precision, device: str, engine: str = "hf") -> "TrainSizing":
        c = config
        rpt = c.objective == "rpt"
        seq = c.max_prompt_tokens + (c.max_new_tokens if rpt else 1)
        # a micro-batch holds at most one step's sequences: B distinct prompts on the one-token
        # path and for the baselines, B x G completions otherwise (dynamic sampling keeps B groups)
        step_rows = c.batch_size * (c.group_size if rpt and c.max_new_tokens > 1 else 1)
        tokens = min(c.micro_batch_tokens, step_rows * seq)
        rows = max(1, min(step_rows, c.micro_batch_tokens // max(seq, 1)))
        if not rpt:
            logits = tokens if c.ntp_positions == "all" else rows
        elif c.max_new_tokens == 1:
            logits = rows  # one-token fast path: the last position of each distinct prompt
        else:
            logits = rows * (c.max_new_tokens + 1)
        generating = rpt and engine == "hf" and c.max_new_tokens > 1
        return cls(
            device=device, compute_bytes=precision.compute.itemsize, master_bytes=precision.master.itemsize,
            micro_batch_tokens=tokens, sequence_tokens=seq, logit_positions=logits,
            gradient_checkpointing=c.gradient_checkpointing, reference_model=rpt and c.kl_coef > 0,
            rollout_kv_tokens=ROLLOUT_SEQUENCES * seq if generating else 0,
            vllm_fraction=c.vllm_gpu_memory_utilization if (rpt and engine == "vllm" and device.startswith("cuda")) else 0.0,
        )


def estimate_train_memory(shape: ModelShape, s: TrainSizing, device_total: int | None = None) -> dict[str, int]:
    """Bytes by part (see the module docstring) and `peak`, their total at the busiest moment.

    >>> qwen14b = ModelShape(14_770_033_664, 48, 5120, 13824, 152064, 40, 1024)
    >>> s = TrainSizing("cuda", 2, 4, 32768, 12288, 4, True, False, 0, 0.0)
    >>> round(estimate_train_memory(qwen14b, s)["peak"] / 2**30)   # weights + grads + AdamW + bf16 copy alone: 248 GiB
    271
    """
    n, L, h = shape.n_params, shape.layers, shape.hidden
    per_layer_token = (14 * h + 4 * shape.intermediate) * s.compute_bytes
    tokens = s.micro_batch_tokens
    if s.gradient_checkpointing:
        activations = tokens * L * h * s.compute_bytes + tokens * per_layer_token
    else:
        activations = tokens * L * per_layer_token
    if not s.device.startswith("cuda"):  # math attention keeps scores and probabilities per layer
        rows = max(1, tokens // max(s.sequence_tokens, 1))
        scores = 2 * rows * shape.heads * s.sequence_tokens**2 * s.compute_bytes
        activations += scores * (1 if s.gradient_checkpointing else L)
    mixed = s.compute_bytes != s.master_bytes
    parts = {
        "weights": n * s.master_bytes,
        "gradients": n * s.master_bytes,
        "adamw": 2 * n * s.master_bytes,
        "compute_copy": n * s.compute_bytes if mixed else 0,
        "reference": n * s.compute_bytes if s.reference_model else 0,
        "vllm": int(s.vllm_fraction * device_total) if (s.vllm_fraction and device_total) else 0,
        "activations": activations,
        "logits": s.logit_positions * shape.vocab * (s.compute_bytes + 8),
        "rollout": s.rollout_kv_tokens * L * 2 * shape.kv_dim * s.compute_bytes,
        "runtime": GIB if s.device.startswith("cuda") else 0,
    }
    static = sum(v for k, v in parts.items() if k not in ("activations", "logits", "rollout"))
    parts["peak"] = static + max(parts["activations"] + parts["logits"], parts["rollout"])
    return parts


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


def describe(parts: dict[str, int]) -> str:
    shown = [f"{k} {v / GIB:.1f}" for k, v in parts.items() if k != "peak" and v >= 0.05 * GIB]
    return f"{parts['peak'] / GIB:.1f} GiB ({', '.join(shown)})"


def check_fits(parts: dict[str, int], free: int, device: str, gradient_checkpointing: bool) -> None:
    """Raise InsufficientMemory, naming the needed and free GiB and the ways out, when the peak
    estimate does not fit in `free` bytes."""
    if parts["peak"] <= free:
        return
    ways = []
    if not gradient_checkpointing:
        ways.append("--gradient-checkpointing (keeps one layer's activations instead of all)")
    ways.append("a smaller --micro-batch-tokens (activations and logits scale with it)")
    ways.append("a multi-GPU backend that shards weights, gradients and AdamW state (--backend verl, or trl "
                "with FSDP / DeepSpeed ZeRO-3; README 'Past one GPU')")
    ways.append("--memory-budget-gib to plan for another amount, or --no-memory-check to skip this check")
    raise InsufficientMemory(
        f"this run needs about {describe(parts)} on {device}, but only {free / GIB:.1f} GiB are free; "
        "stopped before loading the model. Ways out: " + "; ".join(ways) + "."
    )


def preflight(config, device: str, precision, engine: str = "hf") -> dict[str, int]:
    """Estimate the run's memory from the model's config (no weights loaded) and refuse it when it
    cannot fit the device's free memory (or `config.memory_budget_gib`)."""
    shape = model_shape(config.model, trust_remote_code=config.trust_remote_code)
    free, total = available_bytes(device)
    if config.memory_budget_gib is not None:
        free = total = int(config.memory_budget_gib * GIB)
    parts = estimate_train_memory(shape, TrainSizing.of(config, precision, device, engine), total)
    log.info("memory estimate for %s (%.2fB parameters, %s): %s; free: %.1f GiB", config.model,
             shape.n_params / 1e9, precision.describe(), describe(parts), free / GIB)
    check_fits(parts, free, device, config.gradient_checkpointing)
    return parts
