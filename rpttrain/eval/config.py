"""`EvalConfig`: the options of `rpt eval`, checked when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rptdata.bands import DEFAULT_BANDS, as_bands
from rptdata.errors import BadOption
from rptdata.io import STAGE_EVAL
from rptdata.tasks.taskdef import SPLITS
from rpttrain.eval.harness import HarnessSettings
from rpttrain.prompts import load_prompt_format
from rpttrain.reward import ANSWER_REWARDS, REWARD_NAMES

STAGE = STAGE_EVAL
MODES = ("ntp", "reasoning", "answer")
MODE_CHOICES = ("ntp", "reasoning", "both", "answer")
DEFAULT_REASONING_TOKENS = 256  # CPU-friendly; the paper allows 8,192


@dataclass(frozen=True)
class EvalConfig:
    """Options of `rpt eval`.

    Fields:
        tasks_dir: a finished `rpt make-tasks` directory.
        models: model specs to evaluate (hub id, folder, .gguf, alias).
        checkpoints: `rpt train` run directories; each gives its base model (step 0) and every
            complete checkpoint.
        max_compute: leave out checkpoints that spent more training FLOPs than this, so runs
            of different objectives are compared at (at most) equal compute.
        mode: ntp | reasoning | both (next-token tasks) | answer (answer tasks, `rpt answer-tasks`:
            the final answer checked with math-verify; pass@1, pass@K, maj@K per subject).
        samples: K samples per task in reasoning mode (1 = greedy).
        temperature: reasoning sampling temperature; None: 0 (greedy) when samples == 1, else
            the run's training temperature for checkpoints and 0.8 (the paper's) for models.
        max_new_tokens: reasoning completion budget; None: a run's own for its checkpoints, else
            1 for raw formats (continuation) and 256 for chat formats.
        max_prompt_tokens: the longest prompt (ntp: the last tokens of the context).
        prompt_template: reasoning format for every subject; None: v0, or a run's own.
        bands: (name, threshold) pairs, or "0.5,1.0,1.5".
        band_model: recompute the band entropy with this model (None: the tasks' column).
        out: REPORT_DIR; None writes into a temporary folder that is removed afterwards.
        engine: reasoning rollout engine: auto | hf | vllm.
        limit: evaluate the first N tasks of the split (None: all).
        split: eval (held out, default) or train.
        allow_overlap: evaluate even when a run trained on evaluated documents (warns).
        resume: continue an evaluation in `out`, skipping (task, model, mode) rows already done.
        overwrite: replace an evaluation in `out`.
        batch_size: sequences per forward pass (ntp) or per generate call (reasoning).
        flush_every: tasks per predictions part (the most a crash can lose).
        reward: reward rule from `rpttrain.reward.REWARD_NAMES` (prefix: the paper's Eq. 3; the dense
            ones take P(y[0] | x<t) from the model under test, `rpttrain.dense`).
        seed: sampling seed (reasoning with temperature > 0).
        device, dtype, trust_remote_code, progress: as in the other stages.
        lm_eval_tasks, lm_eval_include, lm_eval_limit, lm_eval_fewshot, lm_eval_batch_size:
            lm-evaluation-harness tasks run on every subject (`rpttrain.eval.harness`).
    """

    tasks_dir: str
    models: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()
    max_compute: float | None = None
    mode: str = "ntp"
    samples: int = 1
    temperature: float | None = None
    max_new_tokens: int | None = None
    max_prompt_tokens: int = 4096
    prompt_template: str | None = None
    bands: tuple[tuple[str, float], ...] = DEFAULT_BANDS
    band_model: str | None = None
    out: str | None = None
    engine: str = "auto"
    limit: int | None = None
    split: str = "eval"
    allow_overlap: bool = False
    resume: bool = False
    overwrite: bool = False
    batch_size: int = 16
    flush_every: int = 128
    reward: str = "prefix"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: str | None = None
    lm_eval_limit: int | None = None
    lm_eval_fewshot: int | None = None
    lm_eval_batch_size: int = 16

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        object.__setattr__(self, "bands", as_bands(self.bands))
        object.__setattr__(self, "lm_eval_tasks", tuple(self.lm_eval_tasks))
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
        if self.engine not in ("auto", "hf", "vllm"):
            raise BadOption(f"--engine must be auto, hf or vllm, not {self.engine!r}")
        if self.reward not in REWARD_NAMES:
            raise BadOption(f"--reward must be one of {', '.join(REWARD_NAMES)}, not {self.reward!r}")
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
        d["bands"] = [list(b) for b in self.bands]
        d["tasks"] = tasks_fingerprint
        return d
