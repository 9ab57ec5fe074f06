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
from rpttrain.judge import JUDGE_CACHE_HELP, JUDGE_HELP, JUDGE_MAX_NEW_TOKENS_HELP
from rpttrain.report_to import parse_report_to
from rpttrain.reward import REWARD_NAMES

OBJECTIVES = ("rpt", "rmt", "rlp", "ntp", "shaped-ntp")  # each one's step: rpttrain/objectives/
# objectives that never sample (no rollout engine, no GRPO options): the next-token baselines
NEXT_TOKEN_OBJECTIVES = ("ntp", "shaped-ntp")
# the objectives RMT's options apply to (rmt: rpt with them on at the paper's values, rpttrain.objectives.rmt)
RMT_OBJECTIVES = ("rpt", "rmt")
# knobs of the next-token baselines only: they do not change an RPT or RLP run's identity
NTP_ONLY = ("ntp_positions", "beta", "topk", "lambda_top", "lambda_tail")
# knobs of RPT's reward and step that RLP has no use for (its reward is the information gain, its
# rewards are continuous, its thoughts many tokens): they do not change an RLP run's identity
RPT_ONLY = (
    "reward",
    "dynamic_sampling_from",
    "dynamic_sampling_rounds",
    "fused_one_token",
    "judge",
    "judge_max_new_tokens",
)
# knobs of RLP only: they do not change the identity of a run of another objective
RLP_ONLY = ("ema_decay",)
# RMT's options off (every objective but rmt), and as --objective rmt sets them where not given
# (paper: lambda = 0.1; w is our choice, docs/family.md)
RMT_OFF = {"ntp_weight": 0.0, "length_weight": 0.0, "curriculum": "none"}
RMT_PRESET = {"ntp_weight": 0.1, "length_weight": 0.2, "curriculum": "easy-to-hard"}
# options whose default depends on the objective (None: the objective's own, resolved on build)
OBJECTIVE_DEFAULTS = {
    "rpt": {"prompt_template": "v0", "scale_rewards": "group", "loss_agg": "token-mean", **RMT_OFF},
    "rmt": {"prompt_template": "v0", "scale_rewards": "group", "loss_agg": "token-mean", **RMT_PRESET},
    # the paper's: a thought in <think>...</think>, A = G/(G-1)(r - mean r), the loss of each
    # thought normalized by its length (arXiv 2510.01265 Eq. 7-8)
    "rlp": {"prompt_template": "rlp", "scale_rewards": "rloo", "loss_agg": "seq-mean", **RMT_OFF},
}
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
    "judge_cache",
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
        "rpt: GRPO with the prefix reward | rmt: rpt with RMT's options on (arXiv 2509.24375): --ntp-weight "
        "0.1, --curriculum easy-to-hard and the length budget at the paper's values, --length-weight 0.2 "
        "(ours: docs/family.md); each can be set | "
        "rlp: RLP (arXiv 2510.01265): a thought in <think>...</think> "
        "before the next token, rewarded by log p(x_t | context, thought) - log p_EMA(x_t | context), the "
        "information gain over an EMA copy of the policy that does not think (--reward and dynamic sampling "
        "do not apply) | ntp: cross-entropy (continual next-token training) | shaped-ntp: the "
        "reward-shaped next-token loss (arXiv 2512.22955). Compare them at equal --compute-budget.",
    )
    steps: int = opt(1000, "Optimizer steps to run in total (a resumed run continues up to this).")
    batch_size: int = opt(256, "Contexts per step, B (paper: 256).")
    group_size: int = opt(8, "Rollouts per context, G (paper: 8).")
    temperature: float = opt(0.8, "Sampling temperature of rollouts; log-probs use the same (paper: 0.8).")
    top_p: float = opt(1.0, "Nucleus sampling of rollouts (1.0 = off).")
    max_new_tokens: int = opt(8192, "Longest completion (paper: 8192; the continuation format needs 1-8).")
    max_prompt_tokens: int = opt(4096, "Longest prompt; longer contexts lose their start (paper: 4096).")
    prompt_template: str | None = opt(
        None,
        "v0 | v2 | v6 (reasoning, boxed answer) | continuation (raw text, for base/small models) | rlp (raw "
        "text, then a thought in <think>...</think>, then the next token) | sentence | masked-sentence | "
        "masked-span (the tasks of make-tasks --unit) | FILE. Default: v0 for rpt, rlp for rlp.",
    )
    reward: str = opt(
        "prefix",
        "prefix (paper Eq. 3) | first-token | dense | conditional-dense (App. A; 1 when the prediction's "
        "first token is right, else the policy's probability of it, P(y[0] | x<t); conditional: only in "
        "groups with a right one, else 0). The dense two need --backend rpt. Sentence and span tasks: exact | "
        "exact-nocase (equal after NFC and whitespace folding; case folded too), prefix for next-sentence tasks, "
        "or judge: --judge MODEL decides whether the prediction is a semantic prefix of the target (RLPT; "
        "rpttrain/judge.py).",
    )
    judge: str | None = opt(None, JUDGE_HELP)
    judge_max_new_tokens: int = opt(64, JUDGE_MAX_NEW_TOKENS_HELP)
    judge_cache: str | None = opt(None, JUDGE_CACHE_HELP)
    scale_rewards: str | None = opt(
        None,
        "group: (r-mean)/std per group (GRPO) | none: r-mean (Dr. GRPO) | rloo: G/(G-1)(r-mean), rlp only "
        "(RLP Eq. 7). Default: group for rpt, rloo for rlp.",
    )
    loss_agg: str | None = opt(
        None,
        "token-mean | seq-mean (each sequence's mean, then the mean: RLP's normalization by thought length) | "
        "dr-grpo (sum / (sequences x max_new_tokens)). Default: token-mean for rpt, seq-mean for rlp.",
    )
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
        "Stop, with a checkpoint, at this many training FLOPs (6·N per trained token, 2·N per token the rollout "
        "engine runs, a judge's at its own N; docs/compare.md): the step that reaches it draws only the tasks the "
        "rest buys at the run's mean cost a task, so the run ends within about a task's cost of it. "
        "summary.json records flops_of_budget.",
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
    # RLP (--objective rlp)
    ema_decay: float = opt(
        0.999,
        "rlp: decay tau of the no-think baseline, an EMA copy of the policy updated after every optimizer "
        "step, phi <- tau phi + (1 - tau) theta (paper: 0.999). It costs one float32 copy of the weights.",
    )
    # RMT (arXiv 2509.24375; rpttrain.objectives.rmt, rpttrain.curriculum): options of the GRPO objectives
    ntp_weight: float | None = opt(
        None,
        "lambda: add lambda x the next-token cross-entropy over the context tokens of the step's batch "
        "(token mean; the RL target is never a context token) to the GRPO loss; its forward and backward "
        "count in the FLOPs (paper: 0.1).",
    )
    length_weight: float | None = opt(
        None,
        "w: reward = (1-w) x reward + w x r_len(completion tokens; B_t), r_len triangular (1 at the budget "
        "B_t, 0 at 2 B_t); the budget is stated in the prompt (a chat format); 0: off (rmt's 0.2 is our "
        "choice, docs/family.md).",
    )
    length_budget: int = opt(800, "B_0: the token budget at step 0 (paper: 800).")
    length_budget_min: int = opt(1, "B_min: the budget never falls below this (paper: 1).")
    length_budget_decay: float = opt(
        0.2, "gamma: B_t = max(B_min, floor(B_0 x gamma^(t/T))), T = --steps (paper: 0.2)."
    )
    curriculum: str | None = opt(
        None,
        "none | easy-to-hard: draw each step's tasks from the easiest entropy band until --curriculum-start "
        "of --steps, moving band by band to the hardest by --curriculum-end (the bands the tasks carry).",
    )
    curriculum_start: float = opt(
        0.3, "easy-to-hard: the share of --steps where the move off the easiest band begins (paper: 0.3)."
    )
    curriculum_end: float = opt(
        0.7, "easy-to-hard: the share of --steps by which every task comes from the hardest band (paper: 0.7)."
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
        for name, value in OBJECTIVE_DEFAULTS.get(self.objective, OBJECTIVE_DEFAULTS["rpt"]).items():
            if getattr(self, name) is None:  # frozen: the resolved default is set once, here
                object.__setattr__(self, name, value)
        self._check_rmt_applies()
        check_judge_options(self.reward, self.judge, self.judge_max_new_tokens)
        if self.batch_size < 1 or self.steps < 1 or self.save_every < 1:
            raise BadOption("batch_size, steps and save_every must be at least 1")
        if self.micro_batch_tokens < 1:
            raise BadOption("micro_batch_tokens must be at least 1")
        if self.objective in NEXT_TOKEN_OBJECTIVES:
            self._check_next_token()
        else:
            self._check_grpo()
        if self.objective == "rlp":
            self._check_rlp()
        if self.objective in RMT_OBJECTIVES:
            self._check_rmt()

    def _check_rmt_applies(self) -> None:
        """RMT's options are for rpt and rmt only: refused by name when set for another objective."""
        if self.objective not in RMT_OBJECTIVES:
            set_ = [n for n in RMT_OFF if getattr(self, n) != RMT_OFF[n]]
            if set_:
                raise BadOption(
                    f"--objective {self.objective} does not take "
                    + ", ".join(f"--{n.replace('_', '-')}" for n in set_)
                    + ": they are options of --objective rpt or rmt"
                )

    def _check_grpo(self) -> None:
        from rpttrain.objectives import algos

        if self.group_size < 2:
            raise BadOption("group_size must be >= 2 (GRPO compares samples within a group)")
        if self.temperature <= 0:
            raise BadOption("temperature must be > 0: GRPO needs different samples within a group")
        if self.loss_agg not in algos.LOSS_AGGS:
            raise BadOption(f"loss_agg must be one of {', '.join(algos.LOSS_AGGS)}")
        if self.scale_rewards not in algos.SCALES:
            raise BadOption(f"scale_rewards must be one of {', '.join(algos.SCALES)}")
        if self.scale_rewards == "rloo" and self.objective != "rlp":
            raise BadOption("scale_rewards rloo is RLP's advantage (--objective rlp); use group or none")
        if self.reward not in REWARD_NAMES:
            raise BadOption(f"reward must be one of {', '.join(REWARD_NAMES)}")
        if self.max_new_tokens < 1:
            raise BadOption("max_new_tokens must be at least 1")
        if self.micro_batch_tokens < self.max_new_tokens + 1:
            raise BadOption(
                f"micro_batch_tokens ({self.micro_batch_tokens}) must hold at least one whole sequence "
                f"(max_new_tokens + prompt); raise it or lower max_new_tokens"
            )

    def _check_rlp(self) -> None:
        from rpttrain.prompts import load_prompt_format

        if not 0.0 <= self.ema_decay < 1.0:
            raise BadOption(f"ema_decay must be in [0, 1) (got {self.ema_decay}); the paper's is 0.999")
        if self.reward != "prefix":
            raise BadOption(
                f"--reward {self.reward} does not apply to --objective rlp: its reward is the information gain "
                "log p(x_t | context, thought) - log p_EMA(x_t | context); leave --reward out"
            )
        if load_prompt_format(self.prompt_template).thought is None:
            raise BadOption(
                f"--prompt-template {self.prompt_template} writes no thought; --objective rlp samples one in "
                "<think>...</think> before the next token: use --prompt-template rlp (the default for rlp)"
            )

    def _check_rmt(self) -> None:
        from rpttrain.curriculum import CURRICULA
        from rpttrain.prompts import load_prompt_format

        if self.ntp_weight < 0:
            raise BadOption(f"ntp_weight must be 0 or more (got {self.ntp_weight})")
        if not 0 <= self.length_weight <= 1:
            raise BadOption(f"length_weight must be within [0, 1] (got {self.length_weight})")
        if self.length_budget_min < 1 or self.length_budget < self.length_budget_min:
            raise BadOption(
                f"need 1 <= length_budget_min <= length_budget (got {self.length_budget_min}, {self.length_budget})"
            )
        if not 0 < self.length_budget_decay <= 1:
            raise BadOption(f"length_budget_decay must be within (0, 1] (got {self.length_budget_decay})")
        if self.curriculum not in CURRICULA:
            raise BadOption(f"curriculum must be one of {', '.join(CURRICULA)} (got {self.curriculum!r})")
        if not 0 <= self.curriculum_start < self.curriculum_end <= 1:
            raise BadOption(
                f"need 0 <= curriculum_start < curriculum_end <= 1 (got {self.curriculum_start}, {self.curriculum_end})"
            )
        if self.length_weight > 0 and not load_prompt_format(self.prompt_template).uses_chat:
            raise BadOption(
                f"--length-weight {self.length_weight} states the length budget in the prompt, and --prompt-template "
                f"{self.prompt_template} is raw text with no instructions; use a chat format (v0, v2, v6, answer or "
                "a template file), or --length-weight 0"
            )

    def _check_next_token(self) -> None:
        if self.ntp_positions not in ("all", "tasks"):
            raise BadOption("ntp_positions must be 'all' or 'tasks'")
        if self.topk < 1:
            raise BadOption("topk must be at least 1")

    @property
    def samples_rollouts(self) -> bool:
        """The objective samples rollouts (a rollout engine, the GRPO options); the next-token
        baselines do not."""
        return self.objective not in NEXT_TOKEN_OBJECTIVES

    @property
    def on_documents(self) -> bool:
        """The run trains on windows of the training documents (`rpttrain.data.DocWindows`), not on
        task rows: the next-token baselines with --ntp-positions all."""
        return self.objective in NEXT_TOKEN_OBJECTIVES and self.ntp_positions == "all"

    def identity(self) -> dict:
        """The settings that define the run (a resumed run must match them)."""
        d = asdict(self)
        dropped = NOT_IDENTITY + (NTP_ONLY if self.samples_rollouts else ())
        dropped += RPT_ONLY if self.objective == "rlp" else RLP_ONLY
        for k in dropped:
            if k == "steps" and self.scheduled():
                continue  # T of the budget's decay and the curriculum: another --steps, another run
            d.pop(k)
        if self.judge is None:  # as before the judge existed: runs made then still resume
            d.pop("judge", None), d.pop("judge_max_new_tokens", None)
        return d

    def scheduled(self) -> bool:
        """Whether a schedule over --steps shapes the run (the length budget, the curriculum)."""
        return self.length_weight > 0 or self.curriculum != "none"


def check_judge_options(reward: str, judge: str | None, judge_max_new_tokens: int) -> None:
    """--reward judge and --judge MODEL come together (train, probe, eval).

    >>> check_judge_options("exact", None, 64)
    >>> check_judge_options("judge", None, 64)
    Traceback (most recent call last):
    rptdata.errors.BadOption: --reward judge needs --judge MODEL: the model that decides whether a prediction is a semantic prefix of the target
    """
    if reward == "judge" and not judge:
        raise BadOption(
            "--reward judge needs --judge MODEL: the model that decides whether a prediction is a semantic prefix "
            "of the target"
        )
    if judge and reward != "judge":
        raise BadOption(
            f"--judge {judge} is read by --reward judge only (this run's reward is {reward}); add --reward judge"
        )
    if judge_max_new_tokens < 1:
        raise BadOption(f"--judge-max-new-tokens must be at least 1 (got {judge_max_new_tokens})")


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
