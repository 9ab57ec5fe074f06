"""EleutherAI's lm-evaluation-harness inside `rpt eval` (`--lm-eval-tasks`; pip install 'rpt[lm-eval]').

    settings = HarnessSettings(tasks=("rpt_heldout_bpb", "mmlu_pro"), include="my_tasks/", limit=100)
    scores = harness_scores(settings, out, subjects, dtype, device, tasks_manifest)   # {label: {task: {metric: value}}}

Every subject of the report (each --model, each run's base model and checkpoints) is given to the
harness as the HF folder rpt loads it from (`rptdata.models.local_model_dir`: a .gguf or the
embedded model is converted once), in the evaluation's dtype and device: lm-eval's `vllm` backend
on CUDA when vLLM is installed, else its `hf` backend. The scores are the harness's own
(`lm_eval.simple_evaluate(...)["results"]`): per task, its metric names as the harness writes them
("bits_per_byte,none", "bits_per_byte_stderr,none", ...; a stderr the harness cannot compute,
"N/A", becomes null), without the display alias.

Built-in task `rpt_heldout_bpb` (BUILTIN_BPB): bits per byte, word and byte perplexity
(`loglikelihood_rolling`) of the held-out documents behind the tasks directory: every document of
its prepared corpus (`prepared_dir` in the tasks manifest) that the tasks' split rule puts in
`eval`, so no training run of these tasks saw it (next-token baselines included). Written at eval
time to REPORT_DIR/lm_eval/tasks/ (a YAML and a JSON-lines data file, in corpus order), so it needs
no download. With `--lm-eval-limit N` the harness reads the first N documents of each task.

On disk (REPORT_DIR/lm_eval/): `tasks/` (the built-in task), `results/<subject>.json` (one per
subject, written atomically when its harness run ends: the settings, the model folder and the
scores). A killed evaluation resumed with `--resume` reuses every results file whose settings and
model folder match, and runs the harness only for the others. Subjects with the same weights (the
base model of several runs) are run once.

Offline: with local task YAMLs (`--lm-eval-include DIR`) and the built-in task nothing is
downloaded. Hub tasks (mmlu_pro, supergpqa, ...) need the network or a filled HF datasets cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from rptdata.errors import BadOption, MissingUpstream, RptError
from rptdata.io import atomic_file, list_shards, read_json, write_json_atomic, write_text_atomic
from rptdata.models import local_model_dir
from rptdata.tasks.taskdef import split_of

log = logging.getLogger(__name__)

HARNESS_DIR = "lm_eval"
BUILTIN_BPB = "rpt_heldout_bpb"
LM_EVAL_EXTRA = "pip install 'rpt[lm-eval]'  (pins lm-eval==0.4.13)"

BPB_YAML = """\
# written by `rpt eval` from the held-out (eval split) documents of {tasks_dir}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: true
doc_to_decontamination_query: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


@dataclass(frozen=True)
class HarnessSettings:
    """The `--lm-eval-*` options of `rpt eval`."""

    tasks: tuple[str, ...] = ()
    include: str | None = None
    limit: int | None = None
    fewshot: int | None = None
    batch_size: int = 16

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(t.strip() for t in self.tasks if t.strip()))
        if self.limit is not None and self.limit < 1:
            raise BadOption("--lm-eval-limit must be at least 1")
        if self.fewshot is not None and self.fewshot < 0:
            raise BadOption("--lm-eval-fewshot must be 0 or more")
        if self.batch_size < 1:
            raise BadOption("--lm-eval-batch-size must be at least 1")
        if self.include is not None and not Path(self.include).is_dir():
            raise BadOption(f"--lm-eval-include {self.include}: not a folder of task YAMLs")
        if self.include is not None and not self.tasks:
            raise BadOption("--lm-eval-include needs --lm-eval-tasks: name the tasks to run")


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise RptError(
            f"--lm-eval-tasks needs lm-evaluation-harness, which is not installed: {LM_EVAL_EXTRA}"
        ) from None
    return lm_eval


def check_tasks(settings: HarnessSettings) -> None:
    """Refuse task names lm-eval does not know (its own, --lm-eval-include's, the built-in one)
    before any model loads."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(Path(settings.include).resolve())] if settings.include else None)
    known = set(manager.all_tasks)
    unknown = [t for t in settings.tasks if t != BUILTIN_BPB and t not in known]
    if unknown:
        raise RptError(
            f"--lm-eval-tasks: {', '.join(unknown)} not known to lm-eval"
            + (f" or in {settings.include}" if settings.include else "")
            + f"; local task YAMLs go in --lm-eval-include DIR; built in: {BUILTIN_BPB}"
        )


def write_builtin_task(tasks_dir: Path, manifest: dict, folder: Path) -> Path:
    """REPORT_DIR/lm_eval/tasks/: the built-in held-out bits-per-byte task, streamed from the
    prepared corpus's documents of the eval split. Returns the folder (an include path)."""
    prepared = manifest.get("prepared_dir")
    rule = manifest.get("split") or {}
    if not prepared or not (Path(prepared) / "docs").is_dir():
        raise MissingUpstream(
            f"--lm-eval-tasks {BUILTIN_BPB} reads the held-out documents of the prepared corpus behind "
            f"{tasks_dir} ({prepared or 'not recorded in its manifest'}), which is not there"
        )
    if "seed" not in rule or "eval_fraction" not in rule:
        raise MissingUpstream(f"{tasks_dir}/manifest.json records no split rule (split.seed, split.eval_fraction)")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{BUILTIN_BPB}.jsonl"
    n = 0
    with atomic_file(data) as tmp:
        with tmp.open("w") as f:
            for shard in list_shards(Path(prepared) / "docs"):
                for batch in pq.ParquetFile(shard).iter_batches(batch_size=1024, columns=["doc_id", "text"]):
                    for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                        if text and split_of(doc_id, rule["seed"], rule["eval_fraction"]) == "eval":
                            f.write(json.dumps({"doc_id": doc_id, "text": text}) + "\n")
                            n += 1
        if not n:
            raise RptError(
                f"--lm-eval-tasks {BUILTIN_BPB}: the prepared corpus {prepared} holds no eval-split document"
            )
    write_text_atomic(
        folder / f"{BUILTIN_BPB}.yaml",
        BPB_YAML.format(tasks_dir=tasks_dir, name=BUILTIN_BPB, data=json.dumps(str(data.resolve()))),
    )
    log.info("%s: %d held-out documents in %s", BUILTIN_BPB, n, data)
    return folder


def harness_model(path: str, dtype: str, device: str, trust_remote_code: bool = False) -> tuple[str, dict]:
    """lm-eval's model name and model_args for an HF folder: vllm on CUDA when installed, else hf."""
    if device.startswith("cuda"):
        try:
            import vllm  # noqa: F401

            return "vllm", {"pretrained": path, "dtype": dtype, "trust_remote_code": trust_remote_code}
        except ImportError:
            pass
    return "hf", {"pretrained": path, "dtype": dtype, "device": device, "trust_remote_code": trust_remote_code}


def scores_of(results: dict) -> dict:
    """The harness's results per task, its metric names kept; "N/A" stderrs become None."""
    return {
        task: {k: (None if v == "N/A" else v) for k, v in metrics.items() if k != "alias"}
        for task, metrics in results.items()
    }


def run_harness(
    settings: HarnessSettings, path: str, dtype: str, device: str, include: list[str], trust_remote_code: bool = False
) -> dict:
    """One harness run on one HF folder: {task: {metric: value}}."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    model, model_args = harness_model(path, dtype, device, trust_remote_code)
    manager = TaskManager(include_path=include or None)
    try:
        out = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=list(settings.tasks),
            num_fewshot=settings.fewshot,
            limit=settings.limit,
            batch_size=settings.batch_size,
            task_manager=manager,
            log_samples=False,
        )
    except (KeyError, ValueError) as e:  # an unknown task name, a bad task YAML
        raise RptError(f"lm-eval could not run {','.join(settings.tasks)} on {path}: {e}") from None
    return scores_of(out["results"])


def _file_name(label: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.@-]+", "_", label)
    return f"{safe}-{hashlib.sha256(label.encode()).hexdigest()[:8]}.json"


def harness_scores(
    settings: HarnessSettings,
    out: Path,
    subjects: list,
    dtype: str,
    device: str,
    tasks_dir: Path,
    manifest: dict,
    trust_remote_code: bool = False,
) -> dict[str, dict]:
    """Run (or reuse) the harness for every subject; {label: {task: {metric: value}}}."""
    from rptdata.models import resolve_dtype

    require_lm_eval()
    root = out / HARNESS_DIR
    include = [str(Path(settings.include).resolve())] if settings.include else []
    if BUILTIN_BPB in settings.tasks:
        include.append(str(write_builtin_task(tasks_dir, manifest, root / "tasks").resolve()))
    dtype_name = str(resolve_dtype(dtype, device)).replace("torch.", "")
    wanted = {**asdict(settings), "tasks": list(settings.tasks), "dtype": dtype_name}
    scores: dict[str, dict] = {}
    by_path: dict[str, dict] = {}
    for subject in subjects:
        path = local_model_dir(subject.spec)  # a folder, or a hub id transformers resolves
        path = str(Path(path).resolve()) if Path(path).exists() else path
        if path in by_path:  # the same weights as an earlier subject (e.g. the shared base model)
            scores[subject.label] = by_path[path]
            continue
        file = root / "results" / _file_name(subject.label)
        if file.exists():
            kept = read_json(file, "rerun with --overwrite")
            if kept.get("settings") == wanted and kept.get("model_path") == path:
                log.info("lm-eval: %s already done (%s)", subject.label, file)
                scores[subject.label] = by_path[path] = kept["scores"]
                continue
        log.info("lm-eval: %s on %s", ",".join(settings.tasks), subject.label)
        result = run_harness(settings, path, dtype_name, device, include, trust_remote_code)
        write_json_atomic(file, {"label": subject.label, "model_path": path, "settings": wanted, "scores": result})
        scores[subject.label] = by_path[path] = result
    return scores
