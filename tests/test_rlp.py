"""`rpt train --objective rlp` (RLP, arXiv 2510.01265): the information-gain reward against the
base model recomputed with transformers, the EMA against a hand computation, the loss's
normalization by thought length, the compute accounting, the options it resolves and refuses.
The bit-exact resume of weights and EMA is in tests/test_train.py.

Run: .venv/bin/python -m pytest -q tests/test_rlp.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rptdata.errors import BackendOptionError, BadOption
from rpttrain.config import TrainConfig
from rpttrain.objectives import algos
from rpttrain.train import run_train
from tests.rpt_fixtures import tiny_train_config, write_tasks_dir
from tests.test_train_cli import PAIRS, RPT


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def rlp_config(warm, out, **over):
    model, tasks = warm
    base = dict(
        objective="rlp",
        prompt_template=None,
        steps=2,
        batch_size=2,
        group_size=4,
        max_new_tokens=6,
        micro_batch_tokens=96,
        lr=1e-2,
        sample_every=1,
    )
    return tiny_train_config(tasks, model, out, **{**base, **over})


# ---------------------------------------------------------------------------------------------
# the reward, through the CLI on the embedded model


@pytest.mark.slow
def test_rewards_at_step_one_are_the_base_models_log_probs(tmp_path):
    """At step 1 the EMA and the policy are the base model: every recorded reward is
    log p(x_t | scored_with) - log p(x_t | scored_without), recomputed here with transformers."""
    from transformers import AutoModelForCausalLM

    from rptdata.models import load_tokenizer, local_model_dir

    tasks = write_tasks_dir(tmp_path / "tasks", "smollm2-135m", PAIRS)
    out = tmp_path / "run"
    done = subprocess.run(
        [RPT, "train", str(tasks), "--out", str(out), "--objective", "rlp", "--model", "smollm2-135m"]
        + ["--device", "cpu", "--steps", "1", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "8"]
        + ["--max-prompt-tokens", "64", "--sample-every", "1", "--no-progress", "--report-to", "none"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    samples = lines(out / "samples.jsonl")
    assert len(samples) == 4 and all(s["step"] == 1 for s in samples)  # two groups of two
    tok = load_tokenizer("smollm2-135m")
    base = AutoModelForCausalLM.from_pretrained(local_model_dir("smollm2-135m"), dtype=torch.float32).eval()
    by_context = {c: cont for c, cont in PAIRS}
    tag = tok(" <think>", add_special_tokens=False)["input_ids"]

    def logp(ids: list[int], target: int) -> float:
        with torch.no_grad():
            return float(torch.log_softmax(base(torch.tensor([ids])).logits[0, -1].float(), -1)[target])

    for s in samples:
        context_ids = tok(s["context"], add_special_tokens=False)["input_ids"]
        assert s["scored_without"] == context_ids
        assert s["target_id"] == tok(by_context[s["context"]], add_special_tokens=False)["input_ids"][0]
        # everything before the target: the context, the opening tag, the thought, its closing tag
        assert s["scored_with"][: len(context_ids) + len(tag)] == context_ids + tag
        assert "</think>" in tok.decode(s["scored_with"][len(context_ids) + len(tag) :])
        want = logp(s["scored_with"], s["target_id"]) - logp(s["scored_without"], s["target_id"])
        assert s["reward"] == pytest.approx(want, abs=2e-4), (s["reward"], want)
        assert s["correct"] == (s["reward"] > 0)
    metrics = lines(out / "metrics.jsonl")[0]
    assert {"information_gain_mean", "positive_gain_share"} <= metrics.keys()
    assert 0.0 <= metrics["positive_gain_share"] <= 1.0


# ---------------------------------------------------------------------------------------------
# the EMA, the compute, the loss


def test_ema_starts_as_the_policy_and_follows_it_by_hand(warm, tmp_path):
    """phi_0 = theta_0 (the base model); after each optimizer step phi <- tau phi + (1 - tau) theta,
    checked against the checkpoints' weights by hand."""
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    from rpttrain.checkpoint import list_checkpoints

    model, _ = warm

    def params(folder: Path, ema: bool = False) -> dict[str, torch.Tensor]:
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if ema:  # the EMA file holds a tied tensor once (safetensors), so it loads into the model
            load_model(m, str(folder / "ema.safetensors"))
        return {k: v.detach().clone() for k, v in m.named_parameters()}

    tau = 0.75  # far from 1, so the EMA differs visibly from both sides
    out = tmp_path / "run"
    run_train(rlp_config(warm, out, ema_decay=tau, sample_every=0, keep_checkpoints=5))
    theta0 = params(Path(model))
    step1, step2 = list_checkpoints(out)
    theta1, theta2 = params(step1), params(step2)
    phi1, phi2 = params(step1, ema=True), params(step2, ema=True)
    moved = 0
    for name, t0 in theta0.items():
        want1 = tau * t0 + (1 - tau) * theta1[name]
        assert torch.allclose(phi1[name], want1, atol=1e-6, rtol=0), name
        want2 = tau * want1 + (1 - tau) * theta2[name]
        assert torch.allclose(phi2[name], want2, atol=1e-6, rtol=0), name
        moved += int(not torch.equal(t0, theta1[name]))
    assert moved > 0  # the policy did move, so the EMA is not trivially the policy
    assert any(not torch.allclose(phi1[k], theta1[k]) for k in theta1)
    assert all(phi1[k].dtype == torch.float32 for k in phi1)


def test_compute_counts_every_forward(warm, tmp_path):
    """FLOPs = 6N x update tokens + 2N x (rollout tokens the engine ran + both scoring forwards);
    the scoring forwards are every scored_with token and each context once."""
    from rptdata.models import load_causal_lm

    model, _ = warm
    out = tmp_path / "run"
    summary = run_train(rlp_config(warm, out, steps=1))
    n = sum(p.numel() for p in load_causal_lm(str(model), dtype="float32", device="cpu").parameters())
    (m,) = lines(out / "metrics.jsonl")
    samples = lines(out / "samples.jsonl")  # batch 2: both groups recorded, every rollout
    assert len(samples) == 2 * 4
    contexts = {s["context"]: len(s["scored_without"]) for s in samples}
    assert m["scoring_forward_tokens"] == sum(len(s["scored_with"]) for s in samples) + sum(contexts.values())
    assert m["rollout_forward_tokens"] > 0 and m["update_tokens"] > 0
    assert m["flops"] == 6.0 * n * m["update_tokens"] + 2.0 * n * (
        m["rollout_forward_tokens"] + m["scoring_forward_tokens"]
    )
    assert summary["totals"]["scoring_forward_tokens"] == m["scoring_forward_tokens"]
    assert m["positive_gain_share"] == pytest.approx(sum(s["reward"] > 0 for s in samples) / len(samples))
    assert m["information_gain_mean"] == pytest.approx(sum(s["reward"] for s in samples) / len(samples))


def test_loss_is_normalized_by_each_thoughts_length():
    """Eq. 8 with seq-mean: each thought's tokens share 1/|c| of its loss, then 1/(B G): the
    gradient on token u of thought i is -A_i / (|c_i| N), and nothing on padding."""
    from types import SimpleNamespace

    from rpttrain.objectives.policy_update import PolicyUpdate

    config = SimpleNamespace(clip_eps=0.2, clip_eps_high=None, kl_coef=0.0, loss_agg="seq-mean")
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-3.0, 0.0, 0.0, 0.0]], requires_grad=True)
    adv = torch.tensor([1.5, -1.5])
    update = PolicyUpdate(config, algos.loss_denominator(mask, "seq-mean"))
    update.loss(logp, adv, mask).backward()
    want = torch.tensor([[-1.5 / 3 / 2] * 3 + [0.0], [1.5 / 1 / 2, 0.0, 0.0, 0.0]])
    assert torch.allclose(logp.grad, want)
    assert update.loss_sum == pytest.approx(-(1.5 - 1.5) / 2)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.floats(-20, 20), min_size=2, max_size=8), min_size=1, max_size=4).filter(
        lambda g: len({len(r) for r in g}) == 1
    )
)
def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_others(groups):
    """A_i = G/(G-1)(r_i - mean r) (RLP Eq. 7) is r_i minus the mean of the group's other rewards."""
    rewards = torch.tensor(groups, dtype=torch.float64)
    adv = algos.group_advantages(rewards, scale="rloo")
    g = rewards.shape[1]
    others = (rewards.sum(1, keepdim=True) - rewards) / (g - 1)
    assert torch.allclose(adv, rewards - others, atol=1e-9)
    assert torch.allclose(adv.sum(1), torch.zeros(len(groups), dtype=torch.float64), atol=1e-9)


def test_thought_ends_at_its_closing_tag(tiny_bpe_dir):
    """The action is the shortest run of sampled tokens whose text holds </think>; without one
    (or after a stop token), the closing tag is appended to what is scored, not trained."""
    from rptdata.models import load_tokenizer
    from rpttrain.objectives.rlp import thought_of
    from rpttrain.rollout import Completion

    tok = load_tokenizer(str(tiny_bpe_dir))
    close = tok("</think>", add_special_tokens=False)["input_ids"]
    think = tok(" the fox</think> dog 123", add_special_tokens=False)["input_ids"]
    action, text, closed, scored = thought_of(Completion(think, "", "length"), [1, 2], close, {0}, tok, "</think>")
    assert closed and text.endswith("</think>") and " dog" not in text
    assert tok.decode(action) == text and scored == [1, 2] + action
    assert "</think>" not in tok.decode(action[:-1])
    eos = tok.eos_token_id
    plain = tok(" the fox", add_special_tokens=False)["input_ids"] + [eos]
    action, text, closed, scored = thought_of(Completion(plain, "", "stop"), [1], close, {eos}, tok, "</think>")
    assert not closed and action == plain and text == " the fox"
    assert scored == [1] + plain[:-1] + close  # the stop token is trained, not scored


# ---------------------------------------------------------------------------------------------
# options


def test_rlp_defaults_and_refusals():
    c = TrainConfig("t", "o", objective="rlp")
    assert (c.prompt_template, c.scale_rewards, c.loss_agg, c.ema_decay) == ("rlp", "rloo", "seq-mean", 0.999)
    rpt = TrainConfig("t", "o")
    assert (rpt.prompt_template, rpt.scale_rewards, rpt.loss_agg) == ("v0", "group", "token-mean")
    assert "ema_decay" not in rpt.identity() and "reward" not in c.identity() and "ema_decay" in c.identity()
    with pytest.raises(BadOption, match="--reward dense does not apply to --objective rlp"):
        TrainConfig("t", "o", objective="rlp", reward="dense")
    with pytest.raises(BadOption, match="--prompt-template v0 writes no thought"):
        TrainConfig("t", "o", objective="rlp", prompt_template="v0")
    with pytest.raises(BadOption, match="rloo is RLP's advantage"):
        TrainConfig("t", "o", scale_rewards="rloo")
    with pytest.raises(BadOption, match="ema_decay must be in"):
        TrainConfig("t", "o", objective="rlp", ema_decay=1.0)


@pytest.mark.parametrize("backend", ["trl", "verl"])
def test_backends_refuse_rlp_by_name(backend, tmp_path):
    from rpttrain.backends import check_backend

    with pytest.raises(BackendOptionError, match=f"--backend {backend} cannot honour --objective rlp"):
        check_backend(TrainConfig("t", "o", objective="rlp"), backend)
    tasks = write_tasks_dir(tmp_path / "tasks", "smollm2-135m", PAIRS)
    done = subprocess.run(
        [RPT, "train", str(tasks), "--out", str(tmp_path / "run"), "--objective", "rlp", "--backend", backend],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "cannot honour --objective rlp" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_preflight_counts_the_ema(warm):
    """The memory estimate holds one float32 copy of the weights for the EMA, only for rlp."""
    from rpttrain.memory import TrainSizing, estimate_train_memory, model_shape
    from rpttrain.precision import resolve_precision

    model, _ = warm
    shape = model_shape(str(model))
    precision = resolve_precision("float32", "float32", "cpu")
    parts = {
        objective: estimate_train_memory(
            shape, TrainSizing.of(TrainConfig("t", "o", objective=objective), precision, "cpu")
        )
        for objective in ("rpt", "rlp")
    }
    assert parts["rlp"]["ema"] == 4 * shape.n_params and parts["rpt"]["ema"] == 0
    assert parts["rlp"]["peak"] - parts["rpt"]["peak"] >= 4 * shape.n_params


def test_rpt_plot_draws_an_rlp_run(warm, tmp_path):
    from rpttrain.plot import plot_run

    out = tmp_path / "run"
    run_train(rlp_config(warm, out, steps=1, sample_every=0))
    assert plot_run(out).stat().st_size > 0
