"""`rpt train --backend verl` against verl 0.9.1 itself, on a CPU: the generated launch script's
overrides compose with verl's ppo_trainer config and pass its validate_config; verl's RLHFDataset
keeps every exported row; verl's reward loop scores exactly like rpttrain.reward.prefix_reward
(v0 and continuation formats, mixed rewards); the raw-prompt agent loop feeds the token ids
`rpt train` would. verl's main_ppo itself cannot run here (GPUs, NCCL and vLLM only).

Run: make test-verl   (builds .venv-verl; skipped in `make test`, where verl is not installed)
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

verl = pytest.importorskip("verl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from rptdata.models import load_tokenizer  # noqa: E402
from rpttrain.backends import run_backend  # noqa: E402
from rpttrain.config import TrainConfig  # noqa: E402
from rpttrain.prompts import build_prompt_ids, load_prompt_format  # noqa: E402
from rpttrain.reward import prefix_reward  # noqa: E402

# verl's wheel ships a top-level `tests` package that shadows ours: load the fixture file by path
_spec = importlib.util.spec_from_file_location("rpt_fixtures", Path(__file__).parents[1] / "rpt_fixtures.py")
rpt_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rpt_fixtures)

PAIRS = [
    ("1, 2, 3, 4, 5,", " 6"),
    ("The capital of France is", " Paris"),
    ("Monday, Tuesday,", " Wednesday"),
    ("She opened the", " door"),
    ("x" * 400 + " and then", " the"),
]  # the last one is cut to fit
CONFIG_DIR = str(Path(verl.__file__).parent / "trainer" / "config")


def run_dir(tmp_path: Path, template: str, **over) -> tuple[TrainConfig, dict]:
    tasks = rpt_fixtures.write_tasks_dir(tmp_path / "tasks", "smollm2-135m", PAIRS, eval_pairs=PAIRS[:2])
    options = dict(
        model="smollm2-135m",
        steps=10,
        batch_size=4,
        group_size=4,
        max_new_tokens=1 if template == "continuation" else 64,
        max_prompt_tokens=48 if template == "continuation" else 512,
        prompt_template=template,
        micro_batch_tokens=4096,
        progress=False,
    )
    config = TrainConfig(str(tasks), str(tmp_path / "run"), **{**options, **over})
    return config, run_backend(config, "verl", gpus_per_node=8, nodes=2)


def script_phases(script: Path) -> list[list[str]]:
    """The override lists of each `python -m verl.trainer.main_ppo` in the launch script."""
    phases, current = [], None
    for word in shlex.split(script.read_text(), comments=True):
        if word == "verl.trainer.main_ppo":
            current = []
            phases.append(current)
        elif current is not None and "=" in word and not word.startswith("VERL_FILE_LOGGER_PATH="):
            current.append(word)
    return phases


def compose_verl(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


@pytest.mark.parametrize("template", ["continuation", "v0"])
def test_launch_composes_and_validates(tmp_path, template):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    config, summary = run_dir(tmp_path, template, dynamic_sampling_from=5)
    phases = script_phases(Path(summary["script"]))
    assert len(phases) == 2 and summary["phases"] == [(5, False), (10, True)]
    for i, overrides in enumerate(phases):
        assert overrides == summary["overrides"][i]
        cfg = compose_verl(overrides)
        validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
        assert cfg.reward.custom_reward_function.path.endswith("rpttrain/integrations/verl.py")
        assert cfg.reward.custom_reward_function.name == "compute_score"
        assert cfg.algorithm.filter_groups.enable is (i == 1) and cfg.trainer.total_training_steps == (5, 10)[i]
        assert cfg.actor_rollout_ref.actor.optim.clip_grad == 0.2 and cfg.actor_rollout_ref.rollout.n == 4
        assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node, cfg.trainer.resume_mode) == (2, 8, "auto")
        assert not need_reference_policy(cfg)  # kl_coef 0: no reference model
        raw = template == "continuation"
        assert (cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "rpt_raw_prompt") is raw
    # the top-level key docs used to give is not where verl 0.9.1 looks
    stale = compose_verl(
        [
            o.replace("reward.custom_reward_function", "+custom_reward_function")
            if o.startswith("reward.custom_reward_function")
            else o
            for o in phases[0]
        ]
    )
    assert stale.reward.custom_reward_function.path is None


def test_dataset_keeps_every_row(tmp_path):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    for template in ("continuation", "v0"):
        config, summary = run_dir(tmp_path / template, template)
        cfg = compose_verl(summary["overrides"][0])
        tok = load_tokenizer("smollm2-135m")
        ds = RLHFDataset(cfg.data.train_files, tok, cfg.data)
        assert len(ds) == len(PAIRS)
        for i, (context, _) in enumerate(PAIRS):
            row = ds[i]
            assert context in row["raw_prompt"][-1]["content"]
            assert row["extra_info"]["raw_prompt"] is (template == "continuation")


def _reward_batch(rows: list[dict], responses: list[str], tok) -> verl.DataProto:
    from verl import DataProto

    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    width = max(len(x) for x in ids)
    resp = torch.full((len(ids), width), tok.pad_token_id or 0)
    attn = torch.zeros((len(ids), 3 + width), dtype=torch.long)
    for i, x in enumerate(ids):
        resp[i, : len(x)] = torch.tensor(x)
        attn[i, :3] = 1
        attn[i, 3 : 3 + len(x)] = 1
    non_tensors = {
        k: np.array([r[k] for r in rows], dtype=object) for k in ("data_source", "reward_model", "extra_info")
    }
    non_tensors["raw_prompt"] = np.array([r["prompt"] for r in rows], dtype=object)
    return DataProto.from_dict(tensors={"responses": resp, "attention_mask": attn}, non_tensors=non_tensors)


@pytest.mark.parametrize("template", ["continuation", "v0"])
def test_reward_loop_scores_like_prefix_reward(tmp_path, template):
    import pyarrow.parquet as pq
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    config, summary = run_dir(tmp_path, template)
    cfg = compose_verl(summary["overrides"][0])
    rows = pq.read_table(Path(config.out) / "verl" / "data" / "train.parquet").to_pylist()
    tok = load_tokenizer("smollm2-135m")
    fmt = load_prompt_format(template)
    batch, responses, want = [], [], []
    for row, (_, cont) in zip(rows, PAIRS):
        bounds = rpt_fixtures.boundaries_of(tok, cont)
        for guess in (cont, cont[:-1], " zz", cont + " more"):  # right, too short, wrong, longer than the continuation
            text = guess if template == "continuation" else f"<think>hmm \\boxed{{no}}</think> so \\boxed{{{guess}}}"
            batch.append(row)
            responses.append(text)
            want.append(prefix_reward(fmt.extract(text), cont, bounds))
    worker = RewardLoopWorker(cfg)  # what verl's reward workers run, with the custom function from the overrides
    outs = worker.loop.run_until_complete(worker.compute_score_batch(_reward_batch(batch, responses, tok)))
    got = [out["reward_score"] for out in outs]
    assert got == want
    assert 0 < sum(want) < len(want)  # mixed rewards


def test_reward_loop_scores_answer_tasks_like_math_reward(tmp_path):
    """RLVR rows (rpt answer-tasks, --reward math): verl's reward loop gives math_reward's verdicts."""
    import pyarrow.parquet as pq
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    from rptdata.answer_tasks import AnswerTasksConfig, run_answer_tasks
    from rpttrain.reward import math_reward

    corpus = tmp_path / "problems.jsonl"
    problems = [{"problem": f"What is {a} times 12?", "answer": str(12 * a)} for a in range(1, 6)]
    corpus.write_text("".join(json.dumps(p) + "\n" for p in problems))
    tasks = tmp_path / "answers"
    run_answer_tasks(AnswerTasksConfig(inputs=(str(corpus),), out=str(tasks), eval_fraction=0.0, progress=False))
    config = TrainConfig(
        str(tasks), str(tmp_path / "run"), model="smollm2-135m", steps=2, batch_size=4, group_size=4,
        max_new_tokens=64, max_prompt_tokens=256, prompt_template="answer", reward="math", progress=False,
    )  # fmt: skip
    summary = run_backend(config, "verl", gpus_per_node=8)
    cfg = compose_verl(summary["overrides"][0])
    rows = pq.read_table(Path(config.out) / "verl" / "data" / "train.parquet").to_pylist()
    assert json.loads(rows[0]["reward_model"]["ground_truth"]).keys() == {"answer", "reward", "format"}
    tok = load_tokenizer("smollm2-135m")
    batch, responses, want = [], [], []
    for row in rows:
        answer = json.loads(row["reward_model"]["ground_truth"])["answer"]
        for text in (f"so \\boxed{{{answer}}}", f"\\boxed{{{answer}.0}}", "\\boxed{-1}", "no answer", "\\boxed{}"):
            batch.append(row)
            responses.append(text)
            want.append(math_reward(text, answer))
    worker = RewardLoopWorker(cfg)
    outs = worker.loop.run_until_complete(worker.compute_score_batch(_reward_batch(batch, responses, tok)))
    assert [out["reward_score"] for out in outs] == want
    assert want.count(1.0) == 2 * len(rows)


def test_agent_loop_feeds_rpt_prompt_ids(tmp_path):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.workers.rollout.replica import TokenOutput

    from rpttrain.backends.verl_agent_loop import RawPromptAgentLoop

    config, summary = run_dir(tmp_path, "continuation")
    cfg = compose_verl(summary["overrides"][0])
    tok = load_tokenizer("smollm2-135m")
    ds = RLHFDataset(cfg.data.train_files, tok, cfg.data)
    seen = []

    class Server:  # stands in for the vLLM server: records the prompt, answers one token
        async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
            seen.append(list(prompt_ids))
            return TokenOutput(token_ids=[tok.eos_token_id], log_probs=[-0.5])

    loop = RawPromptAgentLoop(
        trainer_config=DictConfigWrap(cfg),
        server_manager=Server(),
        tokenizer=tok,
        processor=None,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(cfg.data),
    )
    fmt = load_prompt_format("continuation")
    for i, (context, _) in enumerate(PAIRS):
        row = ds[i]
        out = loop.loop.run_until_complete(
            loop.run({"temperature": 0.8}, raw_prompt=row["raw_prompt"], extra_info=row["extra_info"])
        )
        want = build_prompt_ids(fmt, context, tok, config.max_prompt_tokens)
        assert seen[-1] == out.prompt_ids == want
        assert out.response_ids == [tok.eos_token_id] and out.response_mask == [1]
    assert len(seen[-1]) == config.max_prompt_tokens  # the long context lost its start, as in rpt train
    chat_wrapped = tok.apply_chat_template(ds[0]["raw_prompt"], add_generation_prompt=True, tokenize=True)
    if isinstance(chat_wrapped, dict):
        chat_wrapped = chat_wrapped["input_ids"]
    assert list(chat_wrapped) != seen[0]  # what verl's stock loop would have fed


def test_refusals(tmp_path):
    from rpttrain.backends import BackendOptionError

    with pytest.raises(BackendOptionError, match="compute_budget"):
        run_dir(tmp_path, "continuation", compute_budget=1e12)
    with pytest.raises(BackendOptionError, match="--engine hf"):
        run_dir(tmp_path / "b", "continuation", engine="hf")
    assert json.loads((tmp_path / "b" / "tasks" / "manifest.json").read_text())["stage"] == "make-tasks"
