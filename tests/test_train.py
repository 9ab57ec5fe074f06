"""`rpt train`: GRPO math on hand-computed values, learning on a tiny model, exact resume.

Run: .venv/bin/python -m pytest -q tests/test_train.py
"""

from __future__ import annotations

import json

import pytest
import torch

from rpttrain.checkpoint import list_checkpoints
from rpttrain.config import TrainConfig
from rpttrain.objectives import algos
from rpttrain.train import Trainer, run_train
from tests.rpt_fixtures import rewrite_shard, tiny_llama, tiny_train_config, write_tasks_dir

# ---------------------------------------------------------------------------------------------
# where the rules live


def test_trainer_knows_nothing_of_the_backends_and_one_function_writes_the_preflight():
    """The in-house trainer imports nothing from the dispatcher above it (rpttrain.backends), at
    module or function level; RUN/preflight.json is written by `RunPreflight._write` alone."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tree = ast.parse((root / "rpttrain" / "train.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("rpttrain.backends")], imported
    paths = [  # where a path to preflight.json is built
        p.relative_to(root).as_posix()
        for p in sorted((root / "rpttrain").rglob("*.py"))
        if "/ PREFLIGHT" in p.read_text() or '/ "preflight.json"' in p.read_text()
    ]
    assert paths == ["rpttrain/preflight.py"], paths
    source = (root / "rpttrain" / "preflight.py").read_text()
    assert source.count("write_json_atomic(") == 1 and "def _write(self)" in source


def test_one_policy_loss_serves_every_grpo_path_and_no_import_circle():
    """The micro-batch policy loss (clip, KL term, aggregation) is computed in one module that every
    GRPO-style step calls; the fused step and the step record import nothing of the GRPO objective,
    and the step record nothing of any objective (the trainer writes it); every objective name is
    built through the one registry."""
    import ast
    from pathlib import Path

    from rpttrain.config import OBJECTIVES
    from rpttrain.objectives import OBJECTIVE_CLASSES

    root = Path(__file__).resolve().parents[1]
    callers = sorted(
        p.relative_to(root).as_posix()
        for p in (root / "rpttrain").rglob("*.py")
        if any(f"algos.{f}(" in p.read_text() for f in ("policy_loss", "aggregate_loss", "kl_k3"))
    )
    assert callers == ["rpttrain/objectives/policy_update.py"], callers

    def imports(path: Path) -> list[str]:
        tree = ast.parse(path.read_text())
        return [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]

    assert not [m for m in imports(root / "rpttrain/objectives/fused_step.py") if m.endswith("grpo")]
    assert not [m for m in imports(root / "rpttrain/step_record.py") if m.startswith("rpttrain.objectives")]
    assert sorted(OBJECTIVE_CLASSES) == sorted(OBJECTIVES)


# ---------------------------------------------------------------------------------------------
# pure functions


def test_group_advantages_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = algos.group_advantages(r)
    # mean 0.25; unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    assert adv[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert algos.group_advantages(r, scale="none")[0].tolist() == [0.75, -0.25, -0.25, -0.25]
    assert algos.zero_variance_groups(r).tolist() == [False, True]
    with pytest.raises(ValueError):
        algos.group_advantages(r, scale="bogus")


def test_policy_loss_clips_like_ppo():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    loss, clipped = algos.policy_loss(logp, old, torch.tensor([1.0]), clip_low=0.2)
    assert loss[0].tolist() == pytest.approx([-1.2, -0.5, -1.1], abs=1e-6)  # positive A: ratio capped at 1.2
    assert clipped.tolist() == [[True, False, False]]
    loss, clipped = algos.policy_loss(logp, old, torch.tensor([-1.0]), clip_low=0.2)
    assert loss[0].tolist() == pytest.approx([1.5, 0.8, 1.1], abs=1e-6)  # negative A: ratio floored at 0.8
    assert clipped.tolist() == [[False, True, False]]
    loss, _ = algos.policy_loss(logp, old, torch.tensor([1.0]), clip_low=0.2, clip_high=0.28)
    assert loss[0, 0].item() == pytest.approx(-1.28)


def test_loss_aggregations_and_microbatch_additivity():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    for agg, want in (("token-mean", 10 / 4), ("seq-mean", (2.0 + 4.0) / 2), ("dr-grpo", 10 / (2 * 8))):
        denom = algos.loss_denominator(mask, agg, max_len=8)
        full = algos.aggregate_loss(loss, mask, agg, denom)
        assert full.item() == pytest.approx(want)
        parts = sum(algos.aggregate_loss(loss[i : i + 1], mask[i : i + 1], agg, denom) for i in range(2))
        assert parts.item() == pytest.approx(want)  # micro-batches add up to the full batch


def test_token_logprobs_and_kl():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    lp = algos.token_logprobs(logits, torch.tensor([[0]]), temperature=0.5)
    assert lp.item() == pytest.approx(torch.log_softmax(logits / 0.5, -1)[0, 0, 0].item(), abs=1e-6)
    assert algos.kl_k3(torch.tensor([-1.0]), torch.tensor([-2.0])).item() == pytest.approx(
        torch.exp(torch.tensor(-1.0)).item() + 1 - 1
    )


# ---------------------------------------------------------------------------------------------
# a tiny real model

PAIRS = [
    ("The quick brown", " fox"),
    ("jumps over the", " lazy"),
    ("The lazy", " dog"),
    ("12345", "6"),
    ("héllo", " wörld"),
    ("naïve", " café"),
    ("quick brown fox", " jumps"),
    ("over the lazy", " dog"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_bpe_dir):
    root = tmp_path_factory.mktemp("tiny_rl")
    model = tiny_llama(root / "model", tiny_bpe_dir)
    tasks = write_tasks_dir(root / "tasks", str(tiny_bpe_dir), PAIRS, eval_pairs=PAIRS[:2])
    return model, tasks


def tiny_config(tiny, out, **over):
    model, tasks = tiny
    return tiny_train_config(tasks, model, out, **{"sample_every": 1, **over})


def greedy_accuracy(model_dir, tasks_pairs, tokenizer_dir):
    from rptdata.models import load_causal_lm, load_tokenizer
    from rpttrain.reward import prefix_reward
    from tests.rpt_fixtures import boundaries_of

    tok = load_tokenizer(str(tokenizer_dir))
    model = load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    hits = 0
    for ctx, cont in tasks_pairs:
        ids = tok(ctx, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        hits += prefix_reward(tok.decode([nxt]), cont, boundaries_of(tok, cont))
    return hits / len(tasks_pairs)


# two answers, each decided by the context: learnable from a random init, where 8 distinct
# answers mostly end in entropy collapse onto the first ones found (all-zero groups carry no signal)
LEARNABLE = [
    ("The quick brown", " fox"),
    ("The brown", " fox"),
    ("quick brown", " fox"),
    ("A brown", " fox"),
    ("over the lazy", " dog"),
    ("The lazy", " dog"),
    ("the lazy", " dog"),
    ("a lazy", " dog"),
]


def test_grpo_learns_a_learnable_task(tmp_path, tiny_bpe_dir):
    model = tiny_llama(tmp_path / "model", tiny_bpe_dir)
    tasks = write_tasks_dir(tmp_path / "tasks", str(tiny_bpe_dir), LEARNABLE)
    assert greedy_accuracy(model, LEARNABLE, tiny_bpe_dir) <= 0.125
    summary = run_train(
        tiny_config((model, tasks), tmp_path / "run", steps=50, save_every=50, sample_every=0, lr=1e-2, group_size=16)
    )
    assert summary["steps"] == 50
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(m["reward_mean"] for m in metrics[:10]) / 10
    last = sum(m["reward_mean"] for m in metrics[-10:]) / 10
    assert first < 0.1 and last > 0.8, (first, last)
    final = list_checkpoints(tmp_path / "run")[-1]
    assert greedy_accuracy(final, LEARNABLE, tiny_bpe_dir) >= 0.875


def warm_config(warm, out, **over):
    """Settings that reach what a resume must restore: tied embeddings (as SmolLM2), the default
    prompt length, contexts of several lengths in several micro-batches, a gradient at every step
    and the default gradient clip."""
    base = dict(
        steps=4,
        batch_size=4,
        group_size=4,
        max_prompt_tokens=TrainConfig.__dataclass_fields__["max_prompt_tokens"].default,
        micro_batch_tokens=24,
        lr=1e-2,
        grad_clip=0.2,
        sample_every=0,
    )
    return tiny_config(warm, out, **{**base, **over})


def _timeless(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.endswith("_s") and k != "rollout_tokens_per_s"}


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])  # the HF folder, or master.safetensors
def test_resume_is_bit_exact_when_every_step_has_a_gradient(warm, tmp_path, compute_dtype):
    """Regression: the trainer never dropped a step's gradient, so the next backward added the
    previous step's clipped gradient to its own; a run resumed from a checkpoint (which holds no
    gradient) started without it, and from the step after the resume point its grad norm, then
    every weight, differed. Runs of a random tiny model never saw it: no reward, no gradient."""
    from safetensors.torch import load_file

    from rpttrain.checkpoint import MASTER_WEIGHTS

    whole, part = tmp_path / "whole", tmp_path / "part"
    run_train(warm_config(warm, whole, compute_dtype=compute_dtype))
    run_train(warm_config(warm, part, steps=2, compute_dtype=compute_dtype))
    run_train(warm_config(warm, part, compute_dtype=compute_dtype), resume=True)
    a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    # the path is reached: groups with both rewards, so a gradient at every step
    assert all(m["grad_norm"] > 0 and m["zero_variance_share"] < 1 for m in a), [m["grad_norm"] for m in a]
    assert [_timeless(m) for m in a] == [_timeless(m) for m in b]
    ca, cb = list_checkpoints(whole)[-1], list_checkpoints(part)[-1]
    names = ["model.safetensors"] + ([MASTER_WEIGHTS] if compute_dtype != "float32" else [])
    for name in names:  # bit for bit
        wa, wb = load_file(str(ca / name)), load_file(str(cb / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = (torch.load(c / "trainer_state.pt", weights_only=True)["optimizer"]["state"] for c in (ca, cb))
    assert all(torch.equal(v, sb[i][k]) for i, st in sa.items() for k, v in st.items())  # AdamW's moments
    # the resumed policy's LM head is still its input embedding
    trainer = Trainer(warm_config(warm, part, compute_dtype=compute_dtype))
    trainer.setup(resume=True, overwrite=False)
    assert trainer.model.lm_head.weight is trainer.model.get_input_embeddings().weight
    trainer.objective.close()


def test_rlp_resume_is_bit_exact_in_weights_and_ema(warm, tmp_path):
    """--objective rlp: a run stopped after step 2 and resumed equals the run that went through,
    in every logged metric, the weights and the EMA copy (ema.safetensors), bit for bit."""
    from safetensors.torch import load_file

    over = dict(objective="rlp", prompt_template=None, batch_size=3, max_new_tokens=4, micro_batch_tokens=48)
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_train(warm_config(warm, whole, **over))
    run_train(warm_config(warm, part, **{**over, "steps": 2}))
    run_train(warm_config(warm, part, **over), resume=True)
    a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert all(m["grad_norm"] > 0 for m in a)  # every step moved the policy, hence the EMA
    assert [_timeless(m) for m in a] == [_timeless(m) for m in b]
    ca, cb = list_checkpoints(whole)[-1], list_checkpoints(part)[-1]
    for name in ("model.safetensors", "ema.safetensors"):  # bit for bit
        wa, wb = load_file(str(ca / name)), load_file(str(cb / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ema, policy = load_file(str(ca / "ema.safetensors")), load_file(str(ca / "model.safetensors"))
    assert any(not torch.equal(ema[k], policy[k]) for k in ema.keys() & policy.keys())


def test_no_gradient_outlives_its_step(warm, tmp_path):
    """A step's gradient is dropped once the optimizer has used it (or skipped it), and a
    checkpoint refuses to be written while one is pending: it would not be in the checkpoint."""
    trainer = Trainer(warm_config(warm, tmp_path / "run", micro_batch_tokens=256))
    trainer.setup(resume=False, overwrite=False)
    metrics = trainer.train_step()
    assert metrics["grad_norm"] > 0
    assert all(p.grad is None for p in trainer.model.parameters())
    first = next(trainer.model.parameters())
    first.grad = torch.ones_like(first)
    with pytest.raises(RuntimeError, match="gradients pending"):
        trainer.save()
    trainer.objective.close()


def test_kill_during_checkpoint_write_resumes_from_previous(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_train(tiny_config(tiny, out, steps=2))
    # a half-written checkpoint folder, as a SIGKILL in the middle of save_checkpoint leaves it
    half = out / "checkpoints" / "step-000003.tmp-999"
    half.mkdir()
    (half / "config.json").write_text("{")
    assert list_checkpoints(out)[-1].name == "step-000002"
    summary = run_train(tiny_config(tiny, out, steps=3), resume=True)
    assert summary["steps"] == 3 and list_checkpoints(out)[-1].name == "step-000003"
    assert not half.exists()


def test_refuses_rerun_without_resume_and_mismatched_tokenizer(tiny, tmp_path):
    from rptdata.errors import ManifestMismatch

    out = tmp_path / "run"
    run_train(tiny_config(tiny, out, steps=1))
    with pytest.raises(ManifestMismatch, match="--resume"):
        run_train(tiny_config(tiny, out, steps=2))
    with pytest.raises(ManifestMismatch, match="other settings"):
        run_train(tiny_config(tiny, out, steps=2, lr=1e-3), resume=True)
    with pytest.raises(ManifestMismatch, match="vocab"):
        Trainer(tiny_config(tiny, tmp_path / "x", model="smollm2-135m")).setup(resume=False, overwrite=False)


def test_nonfinite_updates_are_skipped_then_stop(tiny, tmp_path, monkeypatch):
    from rpttrain.train import TrainingDiverged

    real = algos.aggregate_loss
    monkeypatch.setattr(algos, "aggregate_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        run_train(tiny_config(tiny, tmp_path / "run", steps=10, max_bad_steps=3, save_every=100))
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_update"] for m in metrics] == [True, True, True]
    from safetensors.torch import load_file

    before = load_file(str(tiny[0] / "model.safetensors"))
    after = load_file(str(list_checkpoints(tmp_path / "run")[-1] / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # no NaN update reached the weights


def test_shared_prompt_fast_path_equals_the_general_path(tiny, tmp_path, monkeypatch):
    from rpttrain.objectives import policy_update
    from rpttrain.objectives.grpo import Rollout
    from rpttrain.rollout import Sampling

    trainer = Trainer(tiny_config(tiny, tmp_path / "run"))
    trainer.setup(resume=False, overwrite=False)
    prompts = [trainer.tokenizer(c, add_special_tokens=False)["input_ids"] for c, _ in PAIRS[:3]]
    grpo = trainer.objective
    groups = grpo.engine.generate(prompts, Sampling(n=4, temperature=1.0, max_new_tokens=1, seed=5))
    batch = [
        Rollout(p, c.token_ids, c.text, 0.0, 0.0, None, False, c.logprobs) for p, g in zip(prompts, groups) for c in g
    ]
    fast, fast_mask = policy_update.completion_logprobs(trainer.model, batch, 1.0)
    monkeypatch.setattr(policy_update, "single_token", lambda b: False)  # force the general left-padded path
    slow, slow_mask = policy_update.completion_logprobs(trainer.model, batch, 1.0)
    assert torch.allclose(fast, slow, atol=1e-5) and torch.equal(fast_mask, slow_mask)
    engine = torch.tensor([c.logprobs[0] for g in groups for c in g])
    assert torch.allclose(fast[:, 0].detach(), engine, atol=1e-5)  # engine and trainer agree
    # one-token greedy sampling equals generate()'s first greedy token
    one = grpo.engine.generate(prompts, Sampling(n=1, temperature=0, max_new_tokens=1))
    two = grpo.engine.generate(prompts, Sampling(n=1, temperature=0, max_new_tokens=2))
    assert [g[0].token_ids[0] for g in one] == [g[0].token_ids[0] for g in two]


def test_fused_one_token_step_equals_the_two_pass_step(tiny, tmp_path):
    """The fused step samples from the update's own forward: same samples, rewards, loss and
    weights as a rollout forward followed by the update, one forward less in the FLOPs."""
    from safetensors.torch import load_file

    fused, two = tmp_path / "fused", tmp_path / "two"
    run_train(tiny_config(tiny, fused, steps=3, save_every=3, fused_one_token=True))
    run_train(tiny_config(tiny, two, steps=3, save_every=3, fused_one_token=False))
    a = [json.loads(x) for x in (fused / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    same = ("reward_mean", "accuracy", "zero_variance_share", "groups_trained", "update_tokens", "clip_frac")
    for ma, mb in zip(a, b):
        assert {k: ma[k] for k in same} == {k: mb[k] for k in same}
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-5) and ma["grad_norm"] == pytest.approx(
            mb["grad_norm"], rel=1e-5
        )
        assert ma["rollout_forward_tokens"] == 0 < mb["rollout_forward_tokens"]
        assert ma["flops"] < mb["flops"]  # 6N per update token only: the rollout forward is the update's
    sa = [json.loads(x) for x in (fused / "samples.jsonl").read_text().splitlines()]
    sb = [json.loads(x) for x in (two / "samples.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in sa] == [s["completion"] for s in sb]
    wa = load_file(str(list_checkpoints(fused)[-1] / "model.safetensors"))
    wb = load_file(str(list_checkpoints(two)[-1] / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_train_logs_the_predicted_zero_variance_share_beside_the_observed(tiny_bpe_dir, tmp_path):
    """Tasks that carry make-tasks' live estimate get it logged per step (rptdata.tasks.live)."""
    import pyarrow.parquet as pq

    model = tiny_llama(tmp_path / "model", tiny_bpe_dir)
    tasks = write_tasks_dir(tmp_path / "tasks", str(tiny_bpe_dir), PAIRS)
    shard = next((tasks / "train").glob("part-*.parquet"))
    table = pq.read_table(shard)
    q = [0.0, 1.0, 0.5, 0.25] * (table.num_rows // 4)
    table = table.set_column(table.schema.get_field_index("accept_mass"), "accept_mass", pa_array(q))
    rewrite_shard(tasks, shard, table)
    run_train(tiny_config((model, tasks), tmp_path / "run", steps=1, batch_size=8, group_size=2))
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # G = 2: dead with probability q^2 + (1-q)^2 -> 1, 1, 0.5, 0.625; the batch holds every task once
    assert m["predicted_zero_variance_share"] == pytest.approx((1 + 1 + 0.5 + 0.625) / 4)
    assert 0.0 <= m["zero_variance_share"] <= 1.0


def pa_array(values):
    import pyarrow as pa

    return pa.array(values, type=pa.float32())
