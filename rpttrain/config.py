"""`TrainConfig`: every option of `rpt train`, with its help text on the field (the CLI and
`--config` YAML are generated from these fields, so both set the same options).

    config = TrainConfig(tasks_dir="out/tasks", out="out/run", model="smollm2-135m", lr=1e-5)
    config = config_from_dict(yaml.safe_load(open("configs/paper.yaml")) | {"tasks_dir": ..., "out": ...})

Checks that hold for every objective run first; then the GRPO ones (`objective: rpt`) or the
next-token ones (`ntp`, `shaped-ntp`), each explaining the broken invariant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from rptdata.errors import BadOption
from rpttrain.report_to import parse_report_to
from rpttrain.reward import REWARD_NAMES

OBJECTIVES = ("rpt", "ntp", "shaped-ntp")
# knobs of the next-token baselines only: they do not change an RPT run's identity
NTP_ONLY = ("ntp_positions", "beta", "topk", "lambda_top", "lambda_tail")
# settings that do not change what a run computes (a resumed run may change them)
NOT_IDENTITY = (
    "out",
    "steps",
    "progress",
    "save_every",
    "keep_checkpoints",
    "sample_every",
    "compute_budget",
    "memory_check",
    "memory_budget_gib",
    "report_to",
)


def opt(default, help: str, **cli):
    """A config field with a default and its `--help` text; the command's option is generated from
    it (`cli.common.config_options`). `cli` says what the field's type does not: `flag` (the option's
    name, when not --field-name), `short` ("-o"), `choices`, `path` (click.Path's checks, e.g.
    {"exists": True}), `text` (the option takes one text that the config parses, with this default)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class TrainConfig:
    """Options of `rpt train`. Defaults are the paper's (Table 5) unless marked CPU."""

    tasks_dir: str
    out: str
    model: str = opt("smollm2-135m", "Policy: hub id, local folder, .gguf, or smollm2-135m.")
    objective: str = opt(
        "rpt",
        "rpt: GRPO with the prefix reward | ntp: cross-entropy (continual next-token training) | "
        "shaped-ntp: the reward-shaped next-token loss (arXiv 2512.22955). Compare them at equal "
        "--compute-budget.",
    )
    steps: int = opt(1000, "Optimizer steps to run in total (a resumed run continues up to this).")
    batch_size: int = opt(256, "Contexts per step, B (paper: 256).")
    group_size: int = opt(8, "Rollouts per context, G (paper: 8).")
    temperature: float = opt(0.8, "Sampling temperature of rollouts; log-probs use the same (paper: 0.8).")
    top_p: float = opt(1.0, "Nucleus sampling of rollouts (1.0 = off).")
    max_new_tokens: int = opt(8192, "Longest completion (paper: 8192; the continuation format needs 1-8).")
    max_prompt_tokens: int = opt(4096, "Longest prompt; longer contexts lose their start (paper: 4096).")
    prompt_template: str = opt(
        "v0",
        "v0 | v2 | v6 (reasoning, boxed answer) | continuation (raw text, for base/small models) | sentence | "
        "masked-sentence | masked-span (the tasks of make-tasks --unit) | FILE.",
    )
    reward: str = opt(
        "prefix",
        "prefix (paper Eq. 3) | first-token | dense | conditional-dense (App. A; 1 when the prediction's "
        "first token is right, else the policy's probability of it, P(y[0] | x<t); conditional: only in "
        "groups with a right one, else 0). The dense two need --backend rpt. Sentence and span tasks: exact | "
        "exact-nocase (equal after NFC and whitespace folding; case folded too), or prefix for next-sentence tasks.",
    )
    scale_rewards: str = opt("group", "group: (r-mean)/std per group (GRPO) | none: r-mean (Dr. GRPO).")
    loss_agg: str = opt("token-mean", "token-mean | seq-mean | dr-grpo (sum / (sequences x max_new_tokens)).")
    clip_eps: float = opt(0.2, "PPO clip epsilon (low side; also the high side unless --clip-eps-high).")
    clip_eps_high: float | None = opt(None, "Upper clip epsilon (DAPO clip-higher); default = --clip-eps.")
    kl_coef: float = opt(0.0, "KL(pi||ref) coefficient, k3 estimator; 0 loads no reference model (paper: 0).")
    lr: float = opt(1e-6, "AdamW learning rate (paper: 1e-6).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    weight_decay: float = opt(0.01, "AdamW weight decay (paper: 0.01).")
    grad_clip: float = opt(0.2, "Gradient norm clip (paper's actor clip: 0.2).")
    warmup_steps: int = opt(0, "Linear learning-rate warm-up steps.")
    dynamic_sampling_from: int = opt(
        500, "Step from which zero-variance groups are dropped and refilled (DAPO; paper: 500; -1 = never)."
    )
    dynamic_sampling_rounds: int = opt(3, "Most extra generation rounds per step to refill the batch.")
    fused_one_token: bool = opt(
        True,
        "One-token rollouts with the transformers engine sample from the update's own forward pass "
        "(one forward + backward a step instead of two forwards + backward; the same samples). Off: "
        "a separate rollout forward first, as with several new tokens.",
    )
    micro_batch_tokens: int = opt(16384, "Padded tokens per forward/backward micro-batch (bounds memory).")
    engine: str = opt("auto", "Rollout engine: auto (vllm on CUDA when installed, else hf) | hf | vllm.")
    compute_dtype: str = opt(
        "auto",
        "What forward/backward and rollouts compute in: auto (bfloat16 on CUDA, float32 on CPU) | "
        "float32 | bfloat16. Checkpoints' HF folders are saved in it.",
    )
    master_dtype: str = opt(
        "float32",
        "What the optimizer updates (parameters, gradients, AdamW state): float32 (default; with "
        "bfloat16 compute this is standard mixed precision, torch.autocast over float32 weights) | "
        "bfloat16 (pure bf16, only with --compute-dtype bfloat16: updates below half a bf16 step, "
        "e.g. lr 1e-6, are rounded away; a warning says so).",
    )
    device: str = opt("auto", "auto | cpu | cuda.")
    gradient_checkpointing: bool = opt(False, "Trade compute for activation memory.")
    seed: int = opt(0, "Seed of data order, sampling and init (runs are reproducible on CPU).")
    save_every: int = opt(50, "Checkpoint every N steps (and at the end, on SIGINT/SIGTERM, at the budget).")
    keep_checkpoints: int = opt(2, "Keep only the newest N checkpoints.")
    sample_every: int = opt(10, "Write completions of two groups to samples.jsonl every N steps (0 = never).")
    max_bad_steps: int = opt(5, "Stop after this many consecutive non-finite updates (each is skipped).")
    compute_budget: float | None = opt(
        None,
        "Stop, with a checkpoint, once this many training FLOPs are spent (6·N per trained token, 2·N "
        "per token the rollout engine runs; docs/compare.md).",
    )
    allow_tokenizer_mismatch: bool = opt(False, "Train although the tasks were built with another tokenizer.")
    trust_remote_code: bool = opt(False, "Allow the model repository's custom code.")
    vllm_gpu_memory_utilization: float = opt(0.3, "GPU memory share for the colocated vLLM engine.")
    memory_check: bool = opt(
        True,
        "Before loading weights, estimate the run's peak memory (weights, gradients, master copy, "
        "AdamW, activations, vLLM's share) and stop with the numbers and the ways out when it exceeds "
        "the device's free memory.",
    )
    memory_budget_gib: float | None = opt(
        None, "Plan for this much memory (GiB) instead of the device's free memory (e.g. on a shared GPU)."
    )
    # next-token baselines (--objective ntp | shaped-ntp)
    ntp_positions: str = opt(
        "all", "Baselines: train on every token of the training documents (all) or only on the task positions (tasks)."
    )
    beta: float = opt(
        -0.25,
        "shaped-ntp: weight w = stop_grad((1 - p_x) ** beta) on -log p_x; < 0 sharpens, > 0 flattens "
        "(paper's best: -0.25).",
    )
    topk: int = opt(100, "shaped-ntp: K, the top tokens (chosen without gradient) that lambda_top applies to.")
    lambda_top: float = opt(
        0.0, "shaped-ntp: loss -= lambda_top * (probability of the top-K tokens other than the target)."
    )
    lambda_tail: float = opt(
        -0.1, "shaped-ntp: loss -= lambda_tail * (probability outside top-K, target excluded); -0.1 penalizes the tail."
    )
    progress: bool = opt(True, "Show a progress bar.")
    report_to: str = opt(
        "tensorboard",
        "Where metrics go besides metrics.jsonl: tensorboard | wandb | none, or a list (tensorboard,wandb). "
        "wandb: pip install 'rpt[wandb]'; honours WANDB_MODE=offline and WANDB_PROJECT (rpttrain/report_to.py).",
    )

    def __post_init__(self):
        from rpttrain.precision import check_dtypes  # torch: loaded when a config is built, not on import (--help)

        check_dtypes(self.compute_dtype, self.master_dtype)
        parse_report_to(self.report_to)
        if self.objective not in OBJECTIVES:
            raise BadOption(f"objective must be one of {', '.join(OBJECTIVES)} (got {self.objective!r})")
        if self.batch_size < 1 or self.steps < 1 or self.save_every < 1:
            raise BadOption("batch_size, steps and save_every must be at least 1")
        if self.micro_batch_tokens < 1:
            raise BadOption("micro_batch_tokens must be at least 1")
        if self.objective == "rpt":
            self._check_grpo()
        else:
            self._check_next_token()

    def _check_grpo(self) -> None:
        from rpttrain import algos

        if self.group_size < 2:
            raise BadOption("group_size must be >= 2 (GRPO compares samples within a group)")
        if self.temperature <= 0:
            raise BadOption("temperature must be > 0: GRPO needs different samples within a group")
        if self.loss_agg not in algos.LOSS_AGGS:
            raise BadOption(f"loss_agg must be one of {', '.join(algos.LOSS_AGGS)}")
        if self.scale_rewards not in ("group", "none"):
            raise BadOption("scale_rewards must be 'group' or 'none'")
        if self.reward not in REWARD_NAMES:
            raise BadOption(f"reward must be one of {', '.join(REWARD_NAMES)}")
        if self.max_new_tokens < 1:
            raise BadOption("max_new_tokens must be at least 1")
        if self.micro_batch_tokens < self.max_new_tokens + 1:
            raise BadOption(
                f"micro_batch_tokens ({self.micro_batch_tokens}) must hold at least one whole sequence "
                f"(max_new_tokens + prompt); raise it or lower max_new_tokens"
            )

    def _check_next_token(self) -> None:
        if self.ntp_positions not in ("all", "tasks"):
            raise BadOption("ntp_positions must be 'all' or 'tasks'")
        if self.topk < 1:
            raise BadOption("topk must be at least 1")

    def identity(self) -> dict:
        """The settings that define the run (a resumed run must match them)."""
        d = asdict(self)
        for k in NOT_IDENTITY + (NTP_ONLY if self.objective == "rpt" else ()):
            d.pop(k)
        return d


def config_from_dict(data: dict) -> TrainConfig:
    """Build a TrainConfig from YAML/dict, rejecting unknown keys by name."""
    known = {f.name for f in fields(TrainConfig)}
    if "dtype" in data:
        raise BadOption(
            "option 'dtype' was replaced by compute_dtype (what forward/backward and rollouts run in) and "
            "master_dtype (what the optimizer updates; float32 by default): see rpt train --help"
        )
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadOption(f"unknown training option(s): {', '.join(unknown)}")
    return TrainConfig(**data)
