"""Every `rpt ...` command line in README.md and docs/*.md runs, on tiny data, as written.

The commands are collected from the fenced code blocks (a backslash continues a line; `NAME="..."`
lines of a block define the `$NAME` its commands use). Each runs through the `rpt` CLI, in the
documents' order, in one sandbox folder whose `out/`, `data/` and `champ/` the earlier commands
fill, the way a user following the README would. Two declared tables adapt them to a 2-core CPU
and a few seconds each:
  SUBSTITUTIONS  regex -> replacement, applied to every command (smaller sizes and steps, local
                 paths for ../shared and configs/, the shell variables of Slurm and loops);
  NOT_RUN        the commands that cannot run here, each with its reason (GPU, network, nodes).
A command that is in the docs, is not in NOT_RUN and fails, fails this test; so does an entry of
NOT_RUN that no longer matches a command in the docs (the list stays honest both ways).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# the order a user follows: the README, then the guides that build on its out/ folders (eval needs
# README's run; compare builds its own champ/; score-entropy and tasks replace out/prep..out/tasks)
ORDER = ["README.md", "eval.md", "compare.md", "ablations.md", "ray.md", "score-entropy.md", "tasks.md"]

# the GPU recipe, a 14B or 1.5B hub model, several nodes or GPUs: not here (no GPU, no network)
NOT_RUN = {
    "rpt score-entropy out/prep --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --out out/scored": "network: the paper's proxy from the hub (and a GPU)",
    "torchrun --nnodes 4 --nproc-per-node 16 $(which rpt) prepare 'data/*.jsonl' --out out/prep": "4 nodes x 16 processes",
    "torchrun --nproc-per-node 8 $(which rpt) score-entropy out/prep --out out/scored --engine hf --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "8 GPUs and the hub model",
    "torchrun --nproc-per-node 8 $(which rpt) score-entropy out/prep --out out/scored --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --engine hf": "8 GPUs and the hub model",
    "CUDA_VISIBLE_DEVICES=$i rpt score-entropy out/prep --out out/scored --engine vllm --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --num-workers 4 --worker-index $i &": "vLLM on 4 GPUs, the hub model",
    "rpt train out/tasks --out out/run --config configs/paper.yaml": "the paper's recipe: vLLM rollouts of 4096-token prompts on a GPU",
    "rpt train out/tasks --out out/run-trl --backend trl --config configs/paper.yaml --gpus-per-node 8 --launch": "accelerate over 8 GPUs",
    "rpt train out/tasks --out out/run-trl --backend trl --config configs/paper.yaml --gpus-per-node 8 --sharding fsdp --launch": "FSDP2 over 8 GPUs",
    "rpt eval out/tasks --model M --band-model deepseek-ai/DeepSeek-R1-Distill-Qwen-14B --out out/eval-14b-bands": "network: the 14B band model from the hub",
    "rpt export-tasks out/tasks --format verl --out out/verl --split train --prompt-template v2 --reward first-token --tokenizer deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": "network: the 14B tokenizer from the hub",
    "rpt eval out/tasks --checkpoints out/run --lm-eval-tasks mmlu_pro,supergpqa --lm-eval-fewshot 0 --lm-eval-batch-size 64 --out out/eval-table3": "network: MMLU-Pro and SuperGPQA from the hub (and a GPU)",
    "rpt eval out/tasks --model smollm2-135m --lm-eval-tasks rpt_heldout_bpb,my_task --lm-eval-include my_tasks/ --lm-eval-limit 50 --out out/eval-local": "the user's own task folder (tests/test_lm_eval.py runs a local task through --lm-eval-include)",
    "rpt prepare '/shared/corpus/*.jsonl' --out /shared/prep --tokenizer deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --executor ray": "a Ray cluster's shared file system and the hub tokenizer",
    "rpt score-entropy /shared/prep --out /shared/scored --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --executor ray": "a Ray cluster with GPUs and the hub model",
    'rpt score-entropy /shared/prep --out /shared/scored --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --executor ray --ray-address "$head:6379"': "a Ray cluster's head node, GPUs and the hub model",
    "rpt train out/answers --config configs/rlvr-gpu.yaml --model out/rpt/checkpoints/step-001000 --out out/rpt-rlvr": "the GPU RLVR recipe: a 14B checkpoint, vLLM rollouts of 8,192 tokens",
}

# applied in order to every command that runs; sizes for 2 CPU cores, local stand-ins for paths
TINY_TRAIN = "--steps 1 --batch-size 2 --group-size 2 --max-prompt-tokens 64 --save-every 1"
SUBSTITUTIONS = [
    (r"\.\./shared/corpora/omnimath-rule\.jsonl", "data/omni/omni.jsonl"),
    (r"\.\./shared/corpora/gsm8k-train\.jsonl", "data/gsm8k/gsm8k.jsonl"),
    # RLVR (docs/table2.md): short answers, from the README's one-step run
    (r"--max-new-tokens 96", "--max-new-tokens 8"),
    (r"--batch-size 4 --group-size 4", "--batch-size 2 --group-size 2"),
    (r"--samples 4 --temperature 0\.8", "--samples 2 --temperature 0.8"),
    (r"out/run/checkpoints/step-000006", "out/run/checkpoints/step-000001"),
    (r"--eval-fraction 0\.1\b", "--eval-fraction 0.3"),
    (r"configs/paper\.yaml", str(ROOT / "configs" / "paper.yaml")),
    (r"\$SLURM_ARRAY_TASK_ID", "0"),
    (r"\s*&$", ""),
    (r"path/to/other-model", "SMOLLM_DIR"),
    (r"--model M\b", "--model smollm2-135m"),
    (r"--compare out/scored-renorm", "--compare out/scored"),
    (r"--samples 8 --limit 32", "--samples 2 --max-new-tokens 8"),
    # prepare: a few documents of CHAMP
    (r"^(rpt prepare builtin:champ .*)$", r"\1 --max-docs 4"),
    # score-entropy: short windows
    (r"^(rpt score-entropy (?!.*--merge)(?!.*--max-context).*)$", r"\1 --max-context 128"),
    (r"--max-context 512", "--max-context 128"),
    (r"--threshold 1\.0 ", "--threshold 0 "),
    (r"--threshold 1\.5 ", "--threshold 0 "),  # docs/family.md's hard positions: none in a few documents
    (r"--context-tokens 1024", "--context-tokens 64"),
    (r"--max-tasks 20000 --max-eval-tasks 1000", "--max-tasks 40 --max-eval-tasks 20"),
    (r"--min-live 0\.[57]", "--min-live 0.1"),
    (r"--tasks 16", "--tasks 2 --samples 2 --max-new-tokens 8"),
    # train: one step of two groups of two, short prompts
    (r"--steps \d+", "--steps 1"),
    (r"--sample-every \d+", "--sample-every 1"),
    (r"^(rpt samples .*)--step 10\b", r"\1--step 1"),
    (r"--batch-size 16", "--batch-size 2"),
    (r"--group-size 8", "--group-size 2"),
    (r"--max-prompt-tokens 128", "--max-prompt-tokens 64"),
    (r"--compute-budget 5\.92e13", "--compute-budget 1"),
    (
        r"^(rpt train out/tasks --out out/run-trl --backend trl .*)\.\.\.$",
        r"\1 " + TINY_TRAIN + " --dynamic-sampling-from -1",
    ),
    (
        r"^(rpt train out/tasks --out out/run-verl --backend verl .*)$",
        r"\1 --model smollm2-135m --max-prompt-tokens 64",
    ),
    (
        r"^rpt train out/tasks --out out/run --resume.*$",
        "rpt train out/tasks --out out/run --prompt-template continuation --max-new-tokens 1 --max-prompt-tokens 64 "
        "--batch-size 2 --group-size 2 --lr 1e-5 --grad-clip 1.0 --steps 1 --dynamic-sampling-from -1 --sample-every 1 --resume",
    ),
    # eval: a handful of held-out tasks, short generations
    (r"^(rpt eval .*?)( --resume)?$", r"\1 --limit 6\2"),
    (r"--samples 8 --temperature 0\.8 --max-new-tokens 512", "--samples 2 --temperature 0.8 --max-new-tokens 8"),
    (r"--max-compute 7\.5e13", "--max-compute 1e30"),
    # the span tasks of docs/tasks.md: short answers, short prompts
    (r"^(rpt train out/spans .*)$", r"\1 --max-new-tokens 8 --max-prompt-tokens 256 --dynamic-sampling-from -1"),
    (r"^(rpt eval out/spans .*)$", r"\1 --max-new-tokens 8 --max-prompt-tokens 256"),
    # the judge of docs/tasks.md: short guesses, a one-line verdict
    (r"^(rpt train out/sentences .*)$", r"\1 --max-new-tokens 8 --max-prompt-tokens 256 --dynamic-sampling-from -1"),
    (r"^(rpt (train|eval) out/sentences .*--judge .*)$", r"\1 --judge-max-new-tokens 4"),
    (r"^(rpt eval out/sentences .*)$", r"\1 --max-new-tokens 8 --max-prompt-tokens 256"),
]


def collect() -> list[tuple[str, int, str]]:
    """(file, line, command) for every command line in a fenced block that runs `rpt`; a command
    inside `for x in a b c; do ... done` comes once per value (a NOT_RUN entry names it with `$x`)."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        inside, pending, variables, loop = False, None, {}, None
        for number, line in enumerate(lines, 1):
            if line.strip().startswith("```"):
                inside, pending, variables, loop = not inside, None, {}, None
                continue
            if not inside:
                continue
            text = line.strip()
            if pending is not None:
                text = text.split(" #")[0].strip() if not pending[2] else text
                pending[1] += " " + text.rstrip("\\").strip()
                if pending[2] and text.endswith('"'):  # the end of a NAME="..." over several lines
                    name, value = pending[1].split("=", 1)
                    variables[name] = value.strip('"')
                    pending = None
                elif not pending[2] and not text.endswith("\\"):
                    out += _emit(path.name, pending[0], _expand(pending[1], variables), loop)
                    pending = None
                continue
            header = re.match(r"^for (\w+) in ([^;]+); do$", text)
            if header:
                loop = (header.group(1), header.group(2).split())
                continue
            if text.startswith("done"):
                loop = None
                continue
            assignment = re.match(r'^([A-Z]+)="(.*)$', text)
            if assignment:
                if text.endswith('"') and len(text) > len(assignment.group(1)) + 2:
                    variables[assignment.group(1)] = assignment.group(2).rstrip('"')
                else:
                    pending = [number, text, True]
                continue
            command = text.split(" #")[0].strip() if not text.startswith("#") else ""
            if not re.match(r"^([A-Z_]+=\S+ )*(rpt [a-z]|torchrun .*\$\(which rpt\))", command):
                continue
            if command.endswith("\\"):
                pending = [number, command.rstrip("\\").strip(), False]
            else:
                out += _emit(path.name, number, _expand(command, variables), loop)
    return out


def _emit(name: str, line: int, command: str, loop) -> list[tuple[str, int, str]]:
    if loop is None or command in NOT_RUN or f"${loop[0]}" not in command:
        return [(name, line, command)]
    return [(name, line, re.sub(rf"\${loop[0]}\b", value, command)) for value in loop[1]]


def _expand(command: str, variables: dict) -> str:
    for name, value in variables.items():
        command = command.replace(f"${name}", " ".join(value.split()))
    return " ".join(command.split())


def adapt(command: str, smollm_dir: str) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        command = re.sub(pattern, replacement, command)
    return command.replace("SMOLLM_DIR", smollm_dir)


def test_not_run_entries_are_in_the_docs():
    documented = {c for _, _, c in collect()}
    stale = [c for c in NOT_RUN if c not in documented]
    assert not stale, f"NOT_RUN lists commands no document has any more: {stale}"


def _world(sandbox: Path) -> None:
    """The inputs the docs name that no earlier command makes: small corpora under data/."""
    data = sandbox / "data"
    (data / "shard").mkdir(parents=True)
    (data / "omni").mkdir()
    facts = [
        "The quick brown fox jumps over the lazy dog.",
        "Let x be a real number such that x^2 = 4.",
        "A triangle has three sides and three angles that sum to 180 degrees.",
        "Water boils at 100 degrees.",
        "The sum of the first n odd numbers is n squared.",
        "Paris is the capital of France.",
        "A prime number has exactly two divisors.",
        "The derivative of x^3 is 3x^2.",
        "Every square is a rectangle, but not every rectangle is a square.",
        "Light travels faster than sound.",
    ]
    texts = [" ".join(facts[(i + k) % len(facts)] for k in range(6)) for i in range(len(facts))]
    (data / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with gzip.open(data / "shard" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"content": t * 2}) + "\n" for t in texts)
    (data / "omni" / "omni.jsonl").write_text(
        "".join(json.dumps({"problem": t, "solution": t[::-1], "answer": str(len(t))}) + "\n" for t in texts)
    )
    (data / "gsm8k").mkdir()  # not in data/*.jsonl, which the README prepares as text
    (data / "gsm8k" / "gsm8k.jsonl").write_text(  # GSM8K's shape: the final answer after "#### "
        "".join(
            json.dumps(
                {"question": f"What is {i} plus {i + 2}?", "answer": f"{i}+{i + 2}={2 * i + 2}\n#### {2 * i + 2}"}
            )
            + "\n"
            for i in range(12)
        )
    )


# runs the docs' later commands read that no documented command makes (before the named document)
SETUP = {
    "eval.md": ["rpt train out/tasks --out out/run-ntp --objective ntp --ntp-positions tasks " + TINY_TRAIN],
}
SUBSTITUTIONS += [
    (r"--checkpoints out/rpt\b", "--checkpoints out/run"),
    (r"--checkpoints out/ntp\b", "--checkpoints out/run-ntp"),
]


def _out_of(args: list[str]) -> str | None:
    for flag in ("--out", "-o"):
        if flag in args and args.index(flag) + 1 < len(args):
            return args[args.index(flag) + 1]
    return None


def _without(args: list[str], *flags: str) -> list[str]:
    """args without the given flags (and a value after --worker-index / --num-workers)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = a in ("--worker-index", "--num-workers")
        else:
            out.append(a)
    return out


class Sandbox:
    """Runs commands in one folder, as a user following the docs would. Output rules: a command
    whose --out an earlier command wrote starts from a fresh folder (the docs show alternatives,
    not a sequence that reuses one folder), except the workers of one split, which share theirs,
    and a --resume command, which continues the same command (run first when it has not)."""

    def __init__(self, folder: Path, smollm: str):
        self.folder, self.smollm = folder, smollm
        self.bin = Path(sys.executable).parent
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "TOKENIZERS_PARALLELISM": "false",
        }
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            self.env.pop(k, None)
        self.writer: dict[str, list[str]] = {}

    def run(self, command: str) -> subprocess.CompletedProcess:
        args = shlex.split(command)
        env = {}
        while args and re.match(r"^[A-Z_]+=", args[0]):  # VAR=value rpt ...
            key, value = args.pop(0).split("=", 1)
            env[key] = value
        if args[0] == "torchrun":  # one process of the documented launch, through torchrun
            args = [
                str(self.bin / "torchrun"),
                "--nproc-per-node",
                "1",
                str(self.bin / "rpt"),
                *args[args.index("$(which") + 2 :],
            ]
        out = _out_of(args)
        if out is not None and "--merge" not in args and "--dry-run" not in args:  # those write no --out
            same = _without(args, "--resume", "--worker-index", "--num-workers", "--limit")
            continues = "--resume" in args or "--worker-index" in args  # a resume, or another worker's share
            if not (continues and self.writer.get(out) == same):
                shutil.rmtree(self.folder / out, ignore_errors=True)
                if "--resume" in args:  # the run it resumes
                    first = self._exec(_without(args, "--resume"), env)
                    if first.returncode:
                        return first
            self.writer[out] = same
        return self._exec(args, env)

    def _exec(self, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
        env = env or {}
        if args[0] != "rpt":
            return subprocess.run(
                args, cwd=self.folder, env={**self.env, **env}, capture_output=True, text=True, timeout=900
            )
        # `rpt ...` runs the CLI's own entry point with the same argv, in this process (the
        # `rpt` script would only add seconds of imports per command; tests/test_train_cli.py
        # runs the script itself)
        from click.testing import CliRunner

        from cli.main import cli

        cwd = os.getcwd()
        os.chdir(self.folder)
        try:
            result = CliRunner().invoke(cli, args[1:], env={"TOKENIZERS_PARALLELISM": "false", **env})
        finally:
            os.chdir(cwd)
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback

            stderr += "".join(traceback.format_exception(result.exception))
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path):
    from rptdata.models import local_model_dir

    commands = collect()
    assert len(commands) > 40, "the collector lost the docs' commands"
    folder = tmp_path / "sandbox"
    folder.mkdir()
    _world(folder)
    smollm = str(local_model_dir("smollm2-135m"))
    box = Sandbox(folder, smollm)
    rank = {name: i for i, name in enumerate(ORDER)}
    commands.sort(key=lambda c: (rank.get(c[0], len(ORDER)), c[0], c[1]))
    failures, ran, setup_done = [], 0, set()
    for name, line, documented in commands:
        for command in SETUP.get(name, []) if name not in setup_done else []:
            done = box.run(command)
            assert done.returncode == 0, f"{failures}\nsetup for {name}: {command}\n{done.stderr[-2000:]}"
        setup_done.add(name)
        if documented in NOT_RUN:
            continue
        command = adapt(documented, smollm)
        done = box.run(command)
        ran += 1
        print(f"{'ok ' if done.returncode == 0 else 'FAIL'} {name}:{line}: {command}", flush=True)
        if done.returncode != 0:
            failures.append(
                f"{name}:{line}: {documented}\n  ran: {command}\n  exit {done.returncode}: "
                f"{(done.stderr or done.stdout)[-1500:]}"
            )
    assert not failures, f"{len(failures)} of {ran} documented commands failed:\n\n" + "\n\n".join(failures)
