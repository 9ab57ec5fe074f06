"""Next-token baselines: the shaped loss, its gradient, its direction, and compute accounting."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rpttrain.objectives import algos
from rpttrain.train import run_train
from tests.rpt_fixtures import tiny_llama, tiny_train_config, write_tasks_dir


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), v=st.integers(2, 40))
def test_shaped_loss_is_cross_entropy_at_beta_zero(seed, n, v):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 3
    targets = torch.randint(0, v, (n,), generator=g)
    got = algos.shaped_ntp_loss(logits, targets, beta=0.0, topk=5, lambda_top=0.0, lambda_tail=0.0)
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def reference_loss(logits, targets, beta, k, lam_top, lam_tail):
    """The formula written out one position at a time, for autograd to differentiate."""
    total = []
    for row, x in zip(logits, targets.tolist()):
        p = torch.softmax(row, -1)
        w = (1 - p[x].detach()).clamp(min=1e-6) ** beta
        top = set(torch.topk(row.detach(), k).indices.tolist())
        top_sum = sum(p[a] for a in range(len(row)) if a in top and a != x)
        tail_sum = sum(p[a] for a in range(len(row)) if a not in top and a != x)
        total.append(-w * torch.log(p[x]) - lam_top * top_sum - lam_tail * tail_sum)
    return torch.stack(total)


@pytest.mark.parametrize("beta,lam_top,lam_tail", [(-0.25, 0.0, -0.1), (0.5, 0.3, 0.2), (0.0, 0.0, 0.0)])
def test_shaped_loss_gradient_matches_autograd_reference(beta, lam_top, lam_tail):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(5, 12, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 3, 11, 5, 5])
    a = base.clone().float().requires_grad_()
    b = base.clone().float().requires_grad_()
    got = algos.shaped_ntp_loss(a, targets, beta, 4, lam_top, lam_tail)
    want = reference_loss(b, targets, beta, 4, lam_top, lam_tail)
    assert torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_weight_function():
    assert algos.ntp_weight(torch.tensor([0.0, 0.5, 1.0]), 0.0).tolist() == [1.0, 1.0, 1.0]
    w = algos.ntp_weight(torch.tensor([0.5, 0.9]), -0.25)
    assert w[1] > w[0] > 1.0  # beta < 0 up-weights what the model already predicts well
    assert torch.isfinite(algos.ntp_weight(torch.tensor([1.0]), -0.25)).all()


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


def baseline_config(model, tasks, out, **over):
    """The tests' tiny run (`tiny_train_config`) as a next-token baseline on the tasks' positions."""
    base = dict(objective="ntp", ntp_positions="tasks", steps=2, lr=1e-2, save_every=100, seed=0)
    return tiny_train_config(tasks, model, out, **{**base, **over})


def mean_entropy(model_dir, tokenizer_dir):
    from rptdata.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    model = load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    ents = []
    with torch.no_grad():
        for ctx, _ in PAIRS:
            logits = model(torch.tensor([tok(ctx, add_special_tokens=False)["input_ids"]])).logits[0, -1]
            ents.append(float(algos.entropy_of_logits(logits)))
    return sum(ents) / len(ents)


def test_negative_beta_sharpens_relative_to_positive_beta(tmp_path, tiny_bpe_dir):
    from rpttrain.checkpoint import list_checkpoints

    model = tiny_llama(tmp_path / "m", tiny_bpe_dir)
    tasks = write_tasks_dir(tmp_path / "t", str(tiny_bpe_dir), PAIRS)
    ents = {}
    for beta in (-0.25, 0.5):
        out = tmp_path / f"run{beta}"
        run_train(
            baseline_config(
                model, tasks, out, objective="shaped-ntp", beta=beta, lambda_tail=0.0, steps=15, save_every=15, lr=3e-3
            )
        )
        ents[beta] = mean_entropy(list_checkpoints(out)[-1], tiny_bpe_dir)
    assert ents[-0.25] < ents[0.5], ents


def test_compute_accounting_adds_up_and_budget_stops(tmp_path, tiny_bpe_dir):
    model = tiny_llama(tmp_path / "m", tiny_bpe_dir)
    tasks = write_tasks_dir(tmp_path / "t", str(tiny_bpe_dir), PAIRS)
    summary = run_train(baseline_config(model, tasks, tmp_path / "ntp"))
    steps = [json.loads(x) for x in (tmp_path / "ntp" / "metrics.jsonl").read_text().splitlines()]
    from rptdata.models import load_causal_lm

    n_params = sum(p.numel() for p in load_causal_lm(str(model), dtype="float32", device="cpu").parameters())
    assert [m["flops"] for m in steps] == [6.0 * n_params * m["update_tokens"] for m in steps]
    assert steps[1]["flops_total"] == steps[0]["flops"] + steps[1]["flops"] == summary["totals"]["flops"]
    # GRPO: 6N per update token + 2N per rollout token, logged the same way (the two-pass step;
    # the fused one-token step runs no rollout forward: tests/test_train.py)
    run_train(baseline_config(model, tasks, tmp_path / "rpt", objective="rpt", group_size=4, fused_one_token=False))
    rpt_steps = [json.loads(x) for x in (tmp_path / "rpt" / "metrics.jsonl").read_text().splitlines()]
    assert rpt_steps[0]["flops"] > 0 and rpt_steps[0]["flops_total"] == rpt_steps[0]["flops"]
    for m in rpt_steps:
        # one-token rollouts: each of the 8 distinct prompts runs once in the rollout and once in
        # the update, not once per sample (group size 4)
        assert m["rollout_forward_tokens"] == m["update_tokens"] > 0
        assert m["flops"] == 6.0 * n_params * m["update_tokens"] + 2.0 * n_params * m["rollout_forward_tokens"]
    # the step that reaches the budget draws only the tasks the rest of the budget buys
    # (rpttrain.train.step_batch): 1.5 steps' FLOPs are 8 tasks, then about 4, ending within about
    # a task's cost of the budget, with a final checkpoint
    f0 = steps[0]["flops"]
    for budget, n_tasks in ((1.5 * f0, 4), (1.25 * f0, 2)):
        out = tmp_path / f"budget-{n_tasks}"
        s = run_train(baseline_config(model, tasks, out, steps=10, compute_budget=budget))
        last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
        assert s["stopped_by"] == "compute_budget" and s["steps"] == 2 and last["batch_size"] == n_tasks
        assert abs(s["totals"]["flops"] - budget) <= f0 / 8  # within a mean task's cost (tasks differ in length)
        assert s["flops_of_budget"] == round(s["totals"]["flops"] / budget, 4)
        assert (out / "checkpoints" / "step-000002" / "state.json").exists()


def test_ntp_on_all_tokens_of_training_documents(tmp_path, tiny_bpe_dir, write_jsonl):
    from rptdata.prepare import PrepareConfig, run_prepare
    from rptdata.tasks.taskdef import split_of

    src = write_jsonl("c.jsonl", [{"text": f"The quick brown fox {i} jumps over the lazy dog."} for i in range(12)])
    run_prepare(
        PrepareConfig(inputs=(str(src),), out=str(tmp_path / "prep"), tokenizer=str(tiny_bpe_dir), progress=False)
    )
    tasks = write_tasks_dir(tmp_path / "t", str(tiny_bpe_dir), PAIRS, prepared_dir=str(tmp_path / "prep"))
    model = tiny_llama(tmp_path / "m", tiny_bpe_dir)
    run_train(
        baseline_config(
            model, tasks, tmp_path / "run", ntp_positions="all", batch_size=4, max_prompt_tokens=16, steps=2
        )
    )
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["positions"] > 4 for m in steps)  # many positions per window, not one per task
    # the windows come from the training documents only (the tasks' split rule), none held out
    import pyarrow.parquet as pq

    from rptdata.io import read_manifest
    from rpttrain.data import DocWindows

    docs = pq.read_table(tmp_path / "prep" / "docs" / "part-00000.parquet").to_pylist()
    train_docs = [d for d in docs if split_of(d["doc_id"], 0, 0.5) == "train"]
    assert 0 < len(train_docs) < len(docs)
    windows = DocWindows(read_manifest(tasks), 16, tmp_path / "cache")
    chunks = windows.take(range(len(windows)))
    assert len(chunks) == sum(len(range(0, d["n_tokens"] - 1, 16)) for d in train_docs)
    assert sorted(map(tuple, (c.tolist() for c in chunks))) == sorted(
        tuple(d["token_ids"][s : s + 17]) for d in train_docs for s in range(0, d["n_tokens"] - 1, 16)
    )


def test_rollout_compute_is_the_tokens_the_model_actually_ran(tmp_path, tiny_bpe_dir):
    """forward_tokens agrees with a hook that counts the tokens entering the model."""
    from rptdata.models import load_causal_lm, load_tokenizer
    from rpttrain.rollout import Sampling, make_engine

    model = load_causal_lm(str(tiny_llama(tmp_path / "m", tiny_bpe_dir)), dtype="float32", device="cpu")
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
    engine = make_engine("hf", model, load_tokenizer(str(tiny_bpe_dir)))
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]  # equal lengths: no padding to count
    for sampling in (
        Sampling(n=4, temperature=1.0, max_new_tokens=1, seed=1),
        Sampling(n=4, temperature=1.0, max_new_tokens=3, seed=1),
    ):
        seen.clear()
        groups = engine.generate(prompts, sampling)
        assert all(len(c.token_ids) == sampling.max_new_tokens for g in groups for c in g)  # no early stop
        assert engine.forward_tokens(prompts, groups, sampling) == sum(seen)
    # one token: 3 prompts once (12), not 3 x 4 samples; three tokens: 4 x 12 prefill + 2 fed back x 12 samples
    assert sum(seen) == 4 * 12 + 2 * 12
