"""`EvalConfig`: the options of `rpt eval` with their help texts (`cli/eval.py` generates its options
from the fields), checked when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rptdata.bands import DEFAULT_BANDS, as_bands
from rptdata.engine_choice import ENGINE_CHOICES
from rptdata.errors import BadOption
from rptdata.io import STAGE_EVAL
from rptdata.models import model_help
from rptdata.tasks.taskdef import SPLITS
from rpttrain.config import check_judge_options, opt
from rpttrain.eval.harness import HarnessSettings
from rpttrain.judge import JUDGE_CACHE_HELP, JUDGE_HELP, JUDGE_MAX_NEW_TOKENS_HELP
from rpttrain.prompts import load_prompt_format
from rpttrain.reward import ANSWER_REWARDS, REWARD_NAMES

STAGE = STAGE_EVAL
MODES = ("ntp", "reasoning", "answer")
MODE_CHOICES = ("ntp", "reasoning", "both", "answer")
DEFAULT_REASONING_TOKENS = 256  # CPU-friendly; the paper allows 8,192


@dataclass(frozen=True)
class EvalConfig:
    """Options of `rpt eval`, each with its `--help` text (the command's options are generated from
    these fields, in this order).

    Beyond the help texts: `tasks_dir` is a finished make-tasks or answer-tasks directory; `models`
    and `checkpoints` may be empty one at a time (the command defaults to smollm2-135m when both
    are); `out` None writes into a temporary folder that is removed afterwards; `bands` and
    `lm_eval_tasks` take text ("0.5,1.0,1.5", "T1,T2") or tuples; `progress` is --no-progress.
    """

    tasks_dir: str
    models: tuple[str, ...] = opt(
        (),
        model_help("Model to evaluate (repeat for several)")
        + " Default: smollm2-135m when no --checkpoints are given.",
        flag="--model",
    )
    checkpoints: tuple[str, ...] = opt(
        (),
        "An `rpt train` run directory (repeat): its base model (step 0) and every saved checkpoint, with training "
        "compute, and a scaling-law fit.",
        path={"exists": True, "file_okay": False},
    )
    max_compute: float | None = opt(
        None,
        "Leave out checkpoints that spent more training FLOPs than this (e.g. 7.5e13): compares runs of different "
        "objectives at equal compute.",
    )
    mode: str = opt(
        "ntp",
        "ntp: greedy next token of the raw context; reasoning: the training prompt, generation, extraction; "
        "answer: answer tasks (rpt answer-tasks), the final answer checked with math-verify (pass@1, pass@K, maj@K).",
        choices=MODE_CHOICES,
    )
    samples: int = opt(1, "Reasoning samples per task (K); the score is their mean, and Pass@K is reported.")
    temperature: float | None = opt(
        None, "Reasoning sampling temperature. Default: greedy for --samples 1, else the run's (checkpoints) or 0.8."
    )
    max_new_tokens: int | None = opt(
        None, "Reasoning completion budget. Default: a run's own; else 256 for chat formats, 1 for continuation."
    )
    max_prompt_tokens: int = opt(4096, "Longest prompt; contexts lose their start beyond it.")
    prompt_template: str | None = opt(
        None,
        "Reasoning format: v0 v2 v6 continuation, sentence masked-sentence masked-span (make-tasks --unit) or FILE. "
        "Default: each run's own template, else v0 (the unit's format for sentence and span tasks).",
    )
    bands: tuple[tuple[str, float], ...] = opt(
        DEFAULT_BANDS,
        "Entropy thresholds of the nested bands (easy/medium/hard), or name=value pairs.",
        text="0.5,1.0,1.5",
    )
    band_model: str | None = opt(
        None, model_help("Recompute the band entropy (top-16) with this model instead of the tasks' column")
    )
    out: str | None = opt(
        None,
        "REPORT_DIR: report.md, report.json, predictions.parquet, scaling.png. Default: print only.",
        short="-o",
        path={"file_okay": False},
    )
    limit: int | None = opt(None, "Evaluate the first N tasks of the split.")
    split: str = opt("eval", "Which split's tasks (eval: held out).", choices=("eval", "train"))
    allow_overlap: bool = opt(
        False, "Evaluate even when a run trained on evaluated documents (warns loudly; not held-out accuracy)."
    )
    resume: bool = opt(False, "Continue an evaluation in --out, skipping (task, model, mode) rows already written.")
    overwrite: bool = False  # --overwrite, as every command's (cli.common)
    batch_size: int = opt(16, "Sequences per forward pass (ntp) or per generate call (reasoning).")
    flush_every: int = opt(128, "Tasks per predictions part file (the most a crash can lose).")
    reward: str = opt(
        "prefix",
        "Reward rule (prefix: the paper's Eq. 3; dense ones: App. A, P(y[0] | x<t) from the model under test, and "
        "the cells are mean reward; exact, exact-nocase: sentence and span tasks).",
        choices=REWARD_NAMES,
    )
    judge: str | None = opt(None, JUDGE_HELP)
    judge_max_new_tokens: int = opt(64, JUDGE_MAX_NEW_TOKENS_HELP)
    judge_cache: str | None = opt(None, JUDGE_CACHE_HELP)
    seed: int = opt(0, "Sampling seed.")
    lm_eval_tasks: tuple[str, ...] = opt(
        (),
        "lm-evaluation-harness tasks (T1,T2) run on every evaluated model and checkpoint; rpt_heldout_bpb: bits per "
        "byte of the tasks' held-out documents (no download). Needs pip install 'rpt[lm-eval]'.",
        text=None,
    )
    lm_eval_include: str | None = opt(
        None, "Folder of local lm-eval task YAMLs (offline).", path={"exists": True, "file_okay": False}
    )
    lm_eval_limit: int | None = opt(None, "lm-eval: the first N documents of each task.")
    lm_eval_fewshot: int | None = opt(None, "lm-eval: few-shot examples (default: each task's own).")
    lm_eval_batch_size: int = opt(16, "lm-eval: batch size.")
    engine: str = opt(
        "auto",
        "Rollout engine of the reasoning mode: hf, vllm, or auto: vllm on CUDA when it is installed, else hf.",
        choices=ENGINE_CHOICES,
    )
    # --dtype, --device, --trust-remote-code, --no-progress: as every command's (cli.common)
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        object.__setattr__(self, "bands", as_bands(self.bands))
        tasks = self.lm_eval_tasks or ()  # None: none (--lm-eval-tasks left out)
        if isinstance(tasks, str):  # "T1,T2", as --lm-eval-tasks gives them
            tasks = tasks.split(",")
        object.__setattr__(self, "lm_eval_tasks", tuple(tasks))
        _ = self.harness  # checks the --lm-eval-* options
        if not self.models and not self.checkpoints:
            raise BadOption("nothing to evaluate: give at least one --model or --checkpoints RUN_DIR")
        if self.mode not in MODE_CHOICES:
            raise BadOption(f"--mode must be one of {', '.join(MODE_CHOICES)}, not {self.mode!r}")
        if self.mode == "answer" and self.reward == "prefix":  # the default reward: answers are checked by math
            object.__setattr__(self, "reward", "math")
        if (self.mode == "answer") != (self.reward in ANSWER_REWARDS):
            raise BadOption(
                f"--mode {self.mode} with --reward {self.reward}: answer tasks are evaluated with --mode answer "
                f"(reward {', '.join(ANSWER_REWARDS)}), next-token tasks with --mode ntp|reasoning|both"
            )
        if self.split not in SPLITS:
            raise BadOption(f"--split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if self.samples < 1:
            raise BadOption("--samples must be at least 1")
        if self.temperature is not None and (not math.isfinite(self.temperature) or self.temperature < 0):
            raise BadOption(f"--temperature must be >= 0, not {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise BadOption(
                f"--samples {self.samples} at temperature 0 would repeat one greedy answer {self.samples} times; "
                "give --temperature > 0 (the paper samples at 0.8) or --samples 1"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise BadOption("--max-new-tokens must be at least 1")
        if self.max_prompt_tokens < 1:
            raise BadOption("--max-prompt-tokens must be at least 1")
        if self.batch_size < 1 or self.flush_every < 1:
            raise BadOption("--batch-size and --flush-every must be at least 1")
        if self.max_compute is not None and not (math.isfinite(self.max_compute) and self.max_compute > 0):
            raise BadOption(f"--max-compute must be a positive number of FLOPs, not {self.max_compute}")
        if self.limit is not None and self.limit < 1:
            raise BadOption("--limit must be at least 1 (leave it out to evaluate every task)")
        if self.engine not in ENGINE_CHOICES:
            raise BadOption(f"--engine must be auto, hf or vllm, not {self.engine!r}")
        if self.reward not in REWARD_NAMES:
            raise BadOption(f"--reward must be one of {', '.join(REWARD_NAMES)}, not {self.reward!r}")
        check_judge_options(self.reward, self.judge, self.judge_max_new_tokens)
        if self.judge and "ntp" in self.modes:
            raise BadOption("--reward judge reads a written prediction: evaluate with --mode reasoning")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise BadOption("--dtype must be auto, float32, bfloat16 or float16")
        if not self.bands or any(not math.isfinite(t) for _, t in self.bands):
            raise BadOption("--bands needs finite thresholds, e.g. 0.5,1.0,1.5")
        if len({name for name, _ in self.bands}) != len(self.bands) or "all" in dict(self.bands):
            raise BadOption("--bands names must be distinct and not 'all'")
        if self.resume and self.overwrite:
            raise BadOption("--resume continues an evaluation and --overwrite replaces it; give one of them")
        if self.resume and self.out is None:
            raise BadOption("--resume needs --out: the predictions to resume live there")
        if self.prompt_template is not None:
            load_prompt_format(self.prompt_template)  # an unknown name fails before any model loads

    @property
    def harness(self) -> HarnessSettings:
        return HarnessSettings(
            self.lm_eval_tasks, self.lm_eval_include, self.lm_eval_limit, self.lm_eval_fewshot, self.lm_eval_batch_size
        )

    @property
    def modes(self) -> tuple[str, ...]:
        return ("ntp", "reasoning") if self.mode == "both" else (self.mode,)

    def identity(self, tasks_fingerprint: str | None) -> dict:
        """The settings the stored predictions depend on; a resumed evaluation must match them.
        Models, modes and --limit may change between runs (new rows are added)."""
        keys = (
            "split",
            "samples",
            "temperature",
            "max_new_tokens",
            "max_prompt_tokens",
            "prompt_template",
            "band_model",
            "reward",
            "seed",
            "dtype",
        )
        d = {k: getattr(self, k) for k in keys}
        if self.judge:  # (left out otherwise, as before the judge existed)
            d.update(judge=self.judge, judge_max_new_tokens=self.judge_max_new_tokens)
        d["bands"] = [list(b) for b in self.bands]
        d["tasks"] = tasks_fingerprint
        return d
