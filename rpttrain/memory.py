"""The memory model of `rpt train`'s preflight: estimate what a run will hold before any weight is
loaded, sized from the run's own data, and decide whether it fits: refuse only a run that cannot
fit even if the estimate is as pessimistic as its measured error allows; warn where it may not fit
or cannot know. The preflight itself (the record, RUN/preflight.json, the measured peak) is
`rpttrain.preflight`; what it measures on the run is `rpttrain.memory_measure`.

    shape = model_shape("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B")     # config.json only, meta tensors
    sizing = TrainSizing.of(config, precision, "cuda", data=data_shape(...), attention="flash")
    parts = estimate_train_memory(shape, sizing)                          # bytes by part, and "peak"
    verdict = check_fits(parts, free)                                     # fits | may-not-fit | does-not-fit

What is counted (bytes; N parameters, layers L, hidden h, MLP width i, vocabulary V):
    weights      N x master bytes (float32: 4)
    gradients    N x master bytes (they accumulate in the parameters' dtype)
    adamw        2 N x master bytes (exp_avg, exp_avg_sq in the parameters' dtype)
    compute copy N x compute bytes when mixed: autocast keeps the cast weights for the backward
    reference    N x compute bytes when --kl-coef > 0
    ema          N x 4 with --objective rlp: its no-think baseline, an EMA copy of the policy in
                 float32 (measured on the embedded model: `docs/family.md`)
    vllm         --vllm-gpu-memory-utilization x device total (vLLM reserves it up front), on CUDA
    activations  per micro-batch of T tokens (rows x the longest sequence the tasks give, after
                 the prompt format and the --max-prompt-tokens cap): T x L x (14 h + 4 i) x compute
                 bytes without gradient checkpointing (the tensors one decoder layer keeps for its
                 backward), plus 28 h bytes a token and layer under autocast (norms and the
                 residual stream stay float32); with checkpointing, T x L x h master bytes (each
                 layer's input) plus what the recomputed layer's backward holds, measured at
                 about 8 layers' full set (CHECKPOINTED_BACKWARD_LAYERS)
    attention    the score matrices (2 x rows x heads x T^2 per layer) only when the kernel torch
                 dispatches keeps them ("math", or transformers' eager attention); flash, efficient
                 and cudnn SDPA keep O(T) (`rpttrain.memory_measure.attention_kernel` asks torch);
                 plus the boolean padding mask, rows x T^2 bytes, once
    logits       positions that reach the LM head x V x (compute + 12) (the logits, the float32
                 copies for log-softmax and the selected rows, and their gradient)
    rollout      the transformers engine's KV cache for the sequences it generates at once
                 (overlaps the update in time, so the peak takes the larger of the two)
    runtime      1 GiB: the CUDA context, or on CPU the allocator's and kernels' working memory
                 (measured: about 1 GiB for the embedded model's forward and backward)
The activation terms were fitted to measured peaks of the embedded model on CPU (float32 and bf16
autocast, 1k-16k tokens; `make bench-memory` prints the grid, estimate against measured); every
run writes its estimate and its measured peak to RUN/preflight.json, and `make gpu-check` records
the CUDA peak beside the estimate.

The estimate's error on that grid stays inside ESTIMATE_ERROR (estimate / measured): a run is
refused only when it cannot fit even if the sized parts (activations, logits, rollout) are over-
estimated by that much; when the estimate alone does not fit, or a term cannot be known here, the
run goes on with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from rptdata.errors import RptError

GIB = 2**30
ROLLOUT_SEQUENCES = 64  # rpttrain.rollout.hf.HFEngine's max_batch_sequences
# estimate / measured peak over `make bench-memory`'s grid stays inside this range
ESTIMATE_ERROR = (0.5, 2.0)
SIZED_PARTS = ("activations", "attention", "logits", "rollout")
# with gradient checkpointing, a layer's recomputation and backward held as much as this many
# layers' saved activations (fitted on the embedded model: 0.47 MiB a token against 0.12 for one)
CHECKPOINTED_BACKWARD_LAYERS = 8


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
        n_params=n,
        layers=int(text.num_hidden_layers),
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        vocab=int(text.vocab_size),
        heads=heads,
        kv_dim=kv_heads * head_dim,
    )


def model_shape(spec: str, trust_remote_code: bool = False) -> ModelShape:
    from rptdata.models import load_model_config

    return shape_from_config(load_model_config(spec, trust_remote_code=trust_remote_code))


@dataclass(frozen=True)
class TrainSizing:
    """What a run's settings and data say about its memory (everything but the model's shape)."""

    device: str
    compute_bytes: int
    master_bytes: int
    micro_batch_rows: int  # sequences in the largest micro-batch
    sequence_tokens: int  # longest sequence through the update (prompt + completion)
    logit_positions: int  # positions that reach the LM head in one micro-batch
    gradient_checkpointing: bool
    reference_model: bool
    rollout_sequences: int  # sequences the transformers engine generates at once (0: no generate)
    vllm_fraction: float  # share of the device vLLM reserves (0 without vLLM on CUDA)
    attention: str = "flash"  # the kernel: flash | efficient | cudnn | math | eager | unknown
    ema_model: bool = False  # --objective rlp keeps a float32 EMA copy of the policy

    @property
    def micro_batch_tokens(self) -> int:
        return self.micro_batch_rows * self.sequence_tokens

    @classmethod
    def of(cls, config, precision, device: str, engine: str = "hf", data=None, attention: str = "flash") -> TrainSizing:
        """From the config and, when given, the data's longest context (`memory_measure.DataShape`);
        without it, from the limits (--max-prompt-tokens), as a bound."""
        c = config
        rpt = c.samples_rollouts
        all_positions = c.on_documents
        if all_positions:  # windows of at most max_prompt_tokens + 1 tokens of a document
            cap = c.max_prompt_tokens + 1
            seq = min(cap, data.longest_context_tokens) if data else cap
        elif rpt:
            prompt = (
                min(c.max_prompt_tokens, data.longest_context_tokens + data.prompt_overhead_tokens)
                if data
                else c.max_prompt_tokens
            )
            seq = prompt + c.max_new_tokens
        else:  # the raw context, cut to max_prompt_tokens - 1, and the target token
            seq = (min(c.max_prompt_tokens - 1, data.longest_context_tokens) if data else c.max_prompt_tokens - 1) + 1
        seq = max(seq, 2)
        # a micro-batch holds at most one step's sequences: B distinct prompts on the one-token
        # path and for the baselines, B x G completions otherwise (dynamic sampling keeps B groups)
        step_rows = c.batch_size * (c.group_size if rpt and c.max_new_tokens > 1 else 1)
        rows = max(1, min(step_rows, c.micro_batch_tokens // seq))
        if not rpt:
            logits = rows * (seq - 1) if all_positions else rows
        elif c.max_new_tokens == 1:
            logits = rows  # one-token fast path: the last position of each distinct prompt
        else:
            logits = rows * (c.max_new_tokens + 1)
        if rpt and c.ntp_weight > 0:  # RMT's next-token term: raw contexts, every position through the LM head
            ctx = max(2, min(c.max_prompt_tokens, data.longest_context_tokens) if data else c.max_prompt_tokens)
            logits = max(logits, min(c.batch_size, max(1, c.micro_batch_tokens // ctx)) * (ctx - 1))
        generating = rpt and engine == "hf" and c.max_new_tokens > 1
        per_chunk = max(1, ROLLOUT_SEQUENCES // c.group_size)  # HFEngine: prompts per generate() call
        return cls(
            device=device,
            compute_bytes=precision.compute.itemsize,
            master_bytes=precision.master.itemsize,
            micro_batch_rows=rows,
            sequence_tokens=seq,
            logit_positions=logits,
            gradient_checkpointing=c.gradient_checkpointing,
            reference_model=rpt and c.kl_coef > 0,
            rollout_sequences=min(c.batch_size, per_chunk) * c.group_size if generating else 0,
            vllm_fraction=c.vllm_gpu_memory_utilization
            if (rpt and engine == "vllm" and device.startswith("cuda"))
            else 0.0,
            attention=attention,
            ema_model=c.objective == "rlp",
        )


def estimate_train_memory(shape: ModelShape, s: TrainSizing, device_total: int | None = None) -> dict[str, int]:
    """Bytes by part (see the module docstring) and `peak`, their total at the busiest moment.

    >>> qwen14b = ModelShape(14_770_033_664, 48, 5120, 13824, 152064, 40, 1024)
    >>> s = TrainSizing("cuda", 2, 4, 2, 12288, 4, True, False, 0, 0.0)
    >>> round(estimate_train_memory(qwen14b, s)["peak"] / 2**30)   # weights + grads + AdamW + bf16 copy alone: 248 GiB
    344
    """
    n, L, h = shape.n_params, shape.layers, shape.hidden
    mixed = s.compute_bytes != s.master_bytes
    per_layer_token = (14 * h + 4 * shape.intermediate) * s.compute_bytes + (28 * h if mixed else 0)
    tokens, rows, seq = s.micro_batch_tokens, s.micro_batch_rows, s.sequence_tokens
    if s.gradient_checkpointing:  # each layer's input, and the recomputed layer's backward (measured: 8 layers' worth)
        activations = tokens * L * h * s.master_bytes + tokens * per_layer_token * min(L, CHECKPOINTED_BACKWARD_LAYERS)
    else:
        activations = tokens * L * per_layer_token
    attention = rows * seq * seq  # the boolean padding mask, built once per forward
    if s.attention in ("math", "eager", "unknown"):  # scores and probabilities, per layer kept for backward
        attention += 2 * rows * shape.heads * seq * seq * s.compute_bytes * (1 if s.gradient_checkpointing else L)
    parts = {
        "weights": n * s.master_bytes,
        "gradients": n * s.master_bytes,
        "adamw": 2 * n * s.master_bytes,
        "compute_copy": n * s.compute_bytes if mixed else 0,
        "reference": n * s.compute_bytes if s.reference_model else 0,
        "ema": n * 4 if s.ema_model else 0,
        "vllm": int(s.vllm_fraction * device_total) if (s.vllm_fraction and device_total) else 0,
        "runtime": GIB,
        "activations": activations,
        "attention": attention,
        "logits": s.logit_positions * shape.vocab * (s.compute_bytes + 12),
        "rollout": s.rollout_sequences * seq * L * 2 * shape.kv_dim * s.compute_bytes,
    }
    static = sum(v for k, v in parts.items() if k not in SIZED_PARTS)
    parts["peak"] = static + max(parts["activations"] + parts["attention"] + parts["logits"], parts["rollout"])
    return parts


def lower_bound(parts: dict[str, int]) -> int:
    """The least the run can need if the sized parts are overestimated by the most the grid saw:
    the exact parts (weights, gradients, AdamW, copies) plus the sized ones over ESTIMATE_ERROR[1]."""
    sized = parts["peak"] - sum(v for k, v in parts.items() if k not in SIZED_PARTS and k != "peak")
    return parts["peak"] - sized + int(sized / ESTIMATE_ERROR[1])


def deciding_part(parts: dict[str, int], free: int) -> str:
    """The largest of the exact parts when they alone exceed `free` (only sharding helps), else
    the largest sized part."""
    exact = [k for k in parts if k not in SIZED_PARTS and k != "peak"]
    pool = exact if sum(parts[k] for k in exact) > free else [k for k in SIZED_PARTS if k in parts]
    return max(pool, key=lambda k: parts[k])


def describe(parts: dict[str, int]) -> str:
    shown = [f"{k} {v / GIB:.1f}" for k, v in parts.items() if k != "peak" and v >= 0.05 * GIB]
    return f"{parts['peak'] / GIB:.1f} GiB ({', '.join(shown)})"


def way_out(shape: ModelShape, config, sizing_of, free: int) -> str | None:
    """The one option (with its value) under which the estimate fits `free`, trying the cheapest
    first; None when no single option does. `sizing_of(config)` sizes a changed config."""
    from dataclasses import replace

    def fits(**change) -> bool:
        return estimate_train_memory(shape, sizing_of(replace(config, **change)))["peak"] <= free

    seq = sizing_of(config).sequence_tokens
    mbt = config.micro_batch_tokens
    while mbt // 2 >= seq:
        mbt //= 2
        if fits(micro_batch_tokens=mbt):
            return f"--micro-batch-tokens {mbt}"
    if not config.gradient_checkpointing and fits(gradient_checkpointing=True):
        return "--gradient-checkpointing"
    new = config.max_new_tokens
    while config.samples_rollouts and new // 2 >= 1:
        new //= 2
        if fits(max_new_tokens=new):
            return f"--max-new-tokens {new}"
    tokens = config.max_prompt_tokens
    while tokens // 2 >= 16:
        tokens //= 2
        if fits(
            max_prompt_tokens=tokens, micro_batch_tokens=max(config.micro_batch_tokens, tokens + config.max_new_tokens)
        ):
            return f"--max-prompt-tokens {tokens}"
    return None


def check_fits(parts: dict[str, int], free: int) -> str:
    """ "fits"; "may-not-fit" when the estimate exceeds `free` but its lower bound does not (a
    warning: the run goes on); "does-not-fit" when even the lower bound exceeds it."""
    if parts["peak"] <= free:
        return "fits"
    return "may-not-fit" if lower_bound(parts) <= free else "does-not-fit"


def refusal(parts: dict[str, int], free: int, device: str, way: str | None) -> str:
    """Why a run that does not fit is refused: the numbers, the part that decides it, the way out."""
    part = deciding_part(parts, free)
    if way is None:
        way = (
            "a multi-GPU backend that shards weights, gradients and AdamW state (--backend verl, or --backend "
            "trl --sharding fsdp|zero3; README 'Past one GPU')"
        )
    return (
        f"this run needs about {describe(parts)} on {device}, but only {free / GIB:.1f} GiB are free (even "
        f"{lower_bound(parts) / GIB:.1f} GiB if the estimate is {ESTIMATE_ERROR[1]:g}x too high). What decides it: "
        f"{part} ({parts[part] / GIB:.1f} GiB). It fits with {way}. "
        "(--memory-budget-gib plans for another amount; --no-memory-check skips this check.)"
    )
