"""RMT (arXiv 2509.24375) in `rpt train`: the length budget and its reward and the easy-to-hard
curriculum (properties), the preset and its refusals, the next-token term against a hand
computation, training through the CLI on the embedded model, and exact resume with every
option on.

Run: .venv/bin/python -m pytest -q tests/test_rmt.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.main import cli
from rptdata.errors import BackendOptionError, BadOption, RptError
from rpttrain.backends import check_backend
from rpttrain.checkpoint import list_checkpoints
from rpttrain.config import TrainConfig
from rpttrain.curriculum import CurriculumSampler, band_tiers, band_weights
from rpttrain.data import TaskRows
from rpttrain.objectives.rmt import budget_format, context_ntp_backward, length_budget, length_reward, mixed_reward
from rpttrain.train import Trainer
from tests.rpt_fixtures import tiny_llama, tiny_train_config, write_tasks_dir

# ---------------------------------------------------------------------------------------------
# the length budget and its reward


@given(st.integers(1, 5000), st.integers(-10, 12000))
def test_length_reward_is_a_triangle_on_zero_to_twice_the_budget(budget, length):
    r = length_reward(length, budget)
    assert 0.0 <= r <= 1.0
    assert (r == 1.0) == (length == budget)  # one peak, at the budget
    if length <= 0 or length >= 2 * budget:
        assert r == 0.0
    d = abs(length - budget)
    if d <= budget:  # symmetric about the budget
        assert length_reward(budget - d, budget) == pytest.approx(length_reward(budget + d, budget))
    for a, b in ((0, budget), (budget, 2 * budget)):  # linear on each side: a step moves it by 1 / budget
        if a <= length < b:
            assert length_reward(length + 1, budget) - r == pytest.approx((1 if a == 0 else -1) / budget)


@given(st.integers(1, 100_000), st.integers(1, 1000), st.floats(0.001, 1.0), st.integers(1, 5000), st.data())
def test_length_budget_decays_from_b0_to_the_floor(b0, b_min, gamma, steps, data):
    t1 = data.draw(st.integers(0, steps))
    t2 = data.draw(st.integers(t1, steps))
    b1, b2 = (length_budget(t, steps, b0, b_min, gamma) for t in (t1, t2))
    assert isinstance(b1, int) and b2 <= b1  # never rises
    assert b_min <= b2 <= max(b0, b_min)
    assert length_budget(0, steps, b0, b_min, gamma) == max(b0, b_min)
    assert length_budget(steps, steps, b0, b_min, gamma) == max(b_min, int(b0 * gamma))


def test_length_budget_paper_values():
    """B_0 800, gamma 0.2, B_min 1 (paper): 800 at the start, 160 at the end, 357 half-way."""
    assert [length_budget(t, 10, 800, 1, 0.2) for t in (0, 5, 10)] == [800, 357, 160]


@given(st.floats(0, 1), st.integers(0, 50), st.integers(1, 50), st.floats(0, 1))
def test_mixed_reward_weighs_the_two_rewards(reward, length, budget, w):
    r = mixed_reward(reward, length, budget, w)
    lo, hi = sorted((reward, length_reward(length, budget)))
    assert lo - 1e-12 <= r <= hi + 1e-12
    assert mixed_reward(reward, length, budget, 0.0) == reward
    assert mixed_reward(reward, length, budget, 1.0) == length_reward(length, budget)


def test_the_budget_is_stated_in_chat_prompts_and_refused_in_raw_ones(smollm2_tokenizer):
    from rpttrain.prompts import load_prompt_format, render_prompt

    prompt = render_prompt(budget_format(load_prompt_format("v0"), 37), "1 + 1", smollm2_tokenizer)
    assert "Please use exactly 37 tokens to reason before your final answer." in prompt
    assert prompt.index("1 + 1") < prompt.index("exactly 37 tokens")
    with pytest.raises(ValueError, match="raw text"):
        budget_format(load_prompt_format("continuation"), 37)


# ---------------------------------------------------------------------------------------------
# the curriculum schedule


@given(st.floats(0, 1), st.floats(0, 1), st.integers(1, 6), st.floats(0, 0.5), st.floats(0.5, 1))
def test_band_weights_move_from_the_easiest_to_the_hardest(p1, p2, n, start, end):
    if start >= end:
        return
    p1, p2 = sorted((p1, p2))
    w1, w2 = band_weights(p1, n, start, end), band_weights(p2, n, start, end)
    for w in (w1, w2):
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
        on = np.flatnonzero(w > 1e-9)
        assert len(on) <= 2 and (len(on) < 2 or on[1] == on[0] + 1)  # at most two neighbouring bands
    mean = np.arange(n)
    assert w1 @ mean <= w2 @ mean + 1e-9  # the expected band never gets easier
    if p1 <= start:
        assert w1[0] == pytest.approx(1.0)
    if p2 >= end:
        assert w2[-1] == pytest.approx(1.0)


BAND_PAIRS = [(f"text number {i} and", f" w{i}") for i in range(24)]
BAND_ENTROPIES = [0.2, 0.7, 1.2, 1.7]  # other, easy, medium, hard, in turn


@pytest.fixture(scope="module")
def band_rows(tmp_path_factory, tiny_bpe_dir):
    root = tmp_path_factory.mktemp("bands")
    tasks = write_tasks_dir(root / "tasks", str(tiny_bpe_dir), BAND_PAIRS, entropies=BAND_ENTROPIES)
    return TaskRows(tasks, root / "cache")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 99), st.integers(1, 40))
def test_curriculum_draws_only_from_the_scheduled_bands_and_depends_on_seed_and_step_alone(band_rows, seed, step, n):
    a = CurriculumSampler(band_rows, {}, seed, steps=100)
    assert a.tiers == [["easy", "other"], ["medium"], ["hard"]]  # "other" joins the easiest band
    weights = a.weights(step)
    allowed = {b for tier, w in zip(a.tiers, weights) if w > 0 for b in tier}
    a.at_step(step)
    first, second = a.pick(n), a.pick(n)
    assert {r["band"] for r in band_rows.take(first + second)} <= allowed
    if n <= 6:  # within a call, no task twice while the band has enough (6 per band here)
        assert all(len(set(first)) == len(first) for w in weights if w == 1.0)
    b = CurriculumSampler(band_rows, {}, seed, steps=100)  # a fresh sampler, as after a resume
    b.at_step(step)
    assert b.pick(n) == first and b.pick(n) == second


def test_curriculum_schedule_over_a_run(band_rows):
    """Easy until 30% of the run, hard from 70%; bands with no task are skipped."""
    s = CurriculumSampler(band_rows, {}, 0, steps=10)
    bands = []
    for step in range(10):
        s.at_step(step)
        bands.append(sorted({r["band"] for r in s.take(8)}))
    assert bands[:4] == [["easy", "other"]] * 4 and bands[7:] == [["hard"]] * 3
    assert bands[5] == ["medium"]
    tiers = band_tiers({"bands": {"easy": 0.5, "medium": 1.0, "hard": 1.5}}, band_rows.table.column("band"))
    assert tiers == s.tiers
    with pytest.raises(RptError, match="do not name"):
        band_tiers({"bands": {"lo": 0.5, "hi": 1.0}}, band_rows.table.column("band"))


# ---------------------------------------------------------------------------------------------
# the options, the preset, and what refuses them


def test_rmt_preset_and_its_refusals():
    c = TrainConfig("t", "o", objective="rmt")
    assert (c.ntp_weight, c.length_weight, c.curriculum) == (0.1, 0.2, "easy-to-hard")
    assert (c.length_budget, c.length_budget_min, c.length_budget_decay) == (800, 1, 0.2)
    assert (c.curriculum_start, c.curriculum_end) == (0.3, 0.7)
    c = TrainConfig("t", "o", objective="rmt", length_weight=0.0, curriculum="none")  # given values win
    assert (c.ntp_weight, c.length_weight, c.curriculum) == (0.1, 0.0, "none")
    c = TrainConfig("t", "o")
    assert (c.ntp_weight, c.length_weight, c.curriculum) == (0.0, 0.0, "none")
    assert "steps" not in c.identity() and "steps" in TrainConfig("t", "o", objective="rmt").identity()
    with pytest.raises(BadOption, match="--prompt-template continuation is raw text"):
        TrainConfig("t", "o", objective="rmt", prompt_template="continuation")
    TrainConfig("t", "o", objective="rmt", prompt_template="continuation", length_weight=0)
    with pytest.raises(BadOption, match="--objective ntp does not take --ntp-weight"):
        TrainConfig("t", "o", objective="ntp", ntp_weight=0.1)
    for bad in (dict(curriculum="hard-first"), dict(length_weight=1.5), dict(length_budget_min=900)):
        with pytest.raises(BadOption):
            TrainConfig("t", "o", **bad)


@pytest.mark.parametrize("backend", ["trl", "verl"])
def test_backends_refuse_rmt_and_each_option_by_name(backend):
    with pytest.raises(BackendOptionError) as e:
        check_backend(TrainConfig("t", "o", objective="rmt"), backend)
    for name in ("objective", "ntp_weight", "length_weight", "curriculum"):
        assert f"{name} (--{name.replace('_', '-')}=" in str(e.value)
    for option, value in [
        ("ntp_weight", 0.1),
        ("length_weight", 0.3),
        ("curriculum", "easy-to-hard"),
        ("length_budget", 100),
        ("length_budget_min", 2),
        ("length_budget_decay", 0.5),
        ("curriculum_start", 0.1),
        ("curriculum_end", 0.9),
    ]:
        with pytest.raises(BackendOptionError, match=f"{option} \\(--{option.replace('_', '-')}="):
            check_backend(TrainConfig("t", "o", **{option: value}), backend)
    check_backend(TrainConfig("t", "o"), backend)  # rpt at its defaults passes


# ---------------------------------------------------------------------------------------------
# the next-token term


def test_ntp_term_is_lambda_times_the_mean_cross_entropy_of_every_context_position(tmp_path, tiny_bpe_dir):
    """Against each context run alone (no padding), summed over positions, divided by all of them;
    one left-padded micro-batch and one micro-batch per context give the same loss and gradient."""
    from rptdata.models import load_causal_lm, load_tokenizer
    from rpttrain.precision import resolve_precision

    model = load_causal_lm(str(tiny_llama(tmp_path / "m", tiny_bpe_dir)), dtype="float32", device="cpu")
    tok = load_tokenizer(str(tiny_bpe_dir))
    contexts = ["The quick brown fox jumps", "héllo", "over the lazy dog, 12345"]
    precision = resolve_precision("float32", "float32", "cpu")
    apart = context_ntp_backward(model, tok, contexts, 0.1, 64, 12, precision)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    out = context_ntp_backward(model, tok, contexts, 0.1, 64, 64, precision)  # one left-padded forward
    assert out["ntp_loss"] == pytest.approx(apart["ntp_loss"], rel=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), grads))
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
    assert [len(s) for s in ids][1] == 1  # "héllo" is one token: nothing to predict, left out
    ids = [s for s in ids if len(s) >= 2]
    want, n = 0.0, 0
    with torch.no_grad():
        for s in ids:
            logits = model(torch.tensor([s])).logits[0, :-1]
            targets = torch.tensor(s[1:], dtype=torch.long)
            want += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            n += len(s) - 1
    assert out["ntp_positions"] == n and out["ntp_tokens"] == sum(map(len, ids))
    assert out["ntp_loss"] == pytest.approx(0.1 * want / n, rel=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_ntp_term_counts_in_update_tokens_and_flops(tmp_path, tiny_bpe_dir):
    model = tiny_llama(tmp_path / "m", tiny_bpe_dir)
    tasks = write_tasks_dir(tmp_path / "tasks", str(tiny_bpe_dir), BAND_PAIRS[:8])
    steps = {}
    for weight in (0.0, 0.5):
        trainer = Trainer(tiny_train_config(tasks, model, tmp_path / f"run{weight}", ntp_weight=weight))
        trainer.setup(resume=False, overwrite=False)
        steps[weight] = trainer.train_step()
        trainer.objective.close()
    off, on = steps[0.0], steps[0.5]
    assert on["ntp_tokens"] > 0 and "ntp_tokens" not in off
    assert on["update_tokens"] == off["update_tokens"] + on["ntp_tokens"]
    assert on["flops"] - off["flops"] == pytest.approx(6 * trainer.n_params * on["ntp_tokens"])
    assert on["loss"] == pytest.approx(off["loss"] + on["ntp_loss"], abs=1e-6)


def test_the_memory_estimate_sizes_the_ntp_term():
    """Every context position goes through the LM head in the next-token term: with 1-token
    rollouts that is far more logits than the update's one position per prompt."""
    from rpttrain.memory import TrainSizing
    from rpttrain.precision import resolve_precision

    precision = resolve_precision("float32", "float32", "cpu")
    base = dict(max_new_tokens=1, prompt_template="continuation", max_prompt_tokens=512, batch_size=8)
    off = TrainSizing.of(TrainConfig("t", "o", **base), precision, "cpu")
    on = TrainSizing.of(TrainConfig("t", "o", ntp_weight=0.1, **base), precision, "cpu")
    assert off.logit_positions == 8  # one per distinct prompt
    assert on.logit_positions == 8 * 511  # min(B, micro-batch tokens / 512) contexts x 511 positions


# ---------------------------------------------------------------------------------------------
# through the CLI, on the embedded model

SMOL_PAIRS = [
    ("1, 2, 3, 4, 5,", " 6"),
    ("The capital of France is", " Paris"),
    ("Monday, Tuesday,", " Wednesday"),
    ("She opened the", " door"),
]
SMOL = ["--model", "smollm2-135m", "--device", "cpu", "--batch-size", "2", "--group-size", "2"]
SMOL += ["--max-prompt-tokens", "256", "--dynamic-sampling-from", "-1", "--no-progress", "--sample-every", "1"]
CHAT = ["--prompt-template", "v0", "--max-new-tokens", "3", "--length-budget", "2"]
RAW = ["--prompt-template", "continuation", "--max-new-tokens", "1"]


@pytest.fixture(scope="module")
def smol_tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rmt_tasks")
    return write_tasks_dir(root / "tasks", "smollm2-135m", SMOL_PAIRS, entropies=[0.7, 1.2, 1.7, 0.7])


def train_cli(tasks: Path, out: Path, *args: str) -> list[dict]:
    result = CliRunner().invoke(cli, ["train", str(tasks), "--out", str(out), *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def samples_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_objective_rmt_trains_through_the_cli(smol_tasks, tmp_path):
    """Two steps of the preset: the budget decays and is logged, the next-token term adds to the
    loss and the update's tokens, the curriculum draws step 1 from the easy band, step 2
    (half-way) from the medium one."""
    out = tmp_path / "rmt"
    m = train_cli(smol_tasks, out, *SMOL, *CHAT, "--objective", "rmt", "--steps", "2")
    assert [x["length_budget"] for x in m] == [2, 1]  # max(1, floor(2 * 0.2 ** (t / 2)))
    assert all(x["length_weight"] == 0.2 and x["ntp_weight"] == 0.1 for x in m)
    assert all(x["ntp_loss"] > 0 and 0 < x["ntp_tokens"] < x["update_tokens"] and x["grad_norm"] > 0 for x in m)
    assert [(x["curriculum_weight_easy"], x["curriculum_weight_medium"]) for x in m] == [(1.0, 0.0), (0.0, 1.0)]
    assert {(s["step"], s["band"]) for s in samples_of(out)} == {(1, "easy"), (2, "medium")}
    budget = [x for x in m if "length_reward_mean" in x]
    assert len(budget) == 2 and all(0 <= x["length_reward_mean"] <= 1 for x in budget)
    config = (out / "config.yaml").read_text()
    assert "objective: rmt" in config and "curriculum: easy-to-hard" in config and "ntp_weight: 0.1" in config


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize(
    "args,key",
    [
        ([*RAW, "--ntp-weight", "0.1"], "ntp_loss"),
        ([*CHAT, "--length-weight", "0.5"], "length_budget"),
        ([*RAW, "--curriculum", "easy-to-hard"], "curriculum_weight_hard"),
    ],
    ids=["ntp-weight", "length-weight", "curriculum"],
)
def test_each_rmt_option_trains_through_the_cli(smol_tasks, tmp_path, args, key):
    (m,) = train_cli(smol_tasks, tmp_path / "run", *SMOL, *args, "--steps", "1")
    assert key in m and m["flops"] > 0
    others = {"ntp_loss", "length_budget", "curriculum_weight_hard"} - {key}
    assert not others & set(m)  # an option turns on its own part only


def test_backend_refusal_through_the_cli(smol_tasks, tmp_path):
    result = CliRunner().invoke(
        cli, ["train", str(smol_tasks), "--out", str(tmp_path / "r"), "--backend", "trl", "--objective", "rmt"]
    )
    assert result.exit_code != 0
    assert "--backend trl cannot honour" in result.output and "ntp_weight (--ntp-weight=0.1)" in result.output


# ---------------------------------------------------------------------------------------------
# exact resume with every option on (the warm tiny model of tests/test_train.py: a gradient at
# every step)

WARM = [
    "The quick brown fox jumps over the lazy dog.",
    "1234567890 the lazy dog jumps over the quick brown fox",
]
WARM_PAIRS = [(" ".join(w[:k]), " " + w[k]) for w in (t.split(" ") for t in WARM) for k in range(1, len(w))]


@pytest.mark.parametrize("preset", [True, False], ids=["objective-rmt", "ntp-weight+curriculum-one-token"])
def test_resume_is_bit_exact_with_the_rmt_options_on(tmp_path, tiny_bpe_dir, preset):
    """`--objective rmt` (budget in a chat prompt of two new tokens, the next-token term, the
    curriculum; the tiny model boxes nothing, so the gradient is the next-token term's), and the
    next-token term with the curriculum on the fused one-token path (groups with both rewards, so
    the policy gradient too): stopped after step 2, resumed, identical to the run never stopped."""
    from safetensors.torch import load_file

    model = tiny_llama(tmp_path / "model", tiny_bpe_dir, tie=True, warm_texts=WARM)
    tasks = write_tasks_dir(tmp_path / "tasks", str(tiny_bpe_dir), WARM_PAIRS, entropies=[0.7, 1.2, 1.7])
    template = tmp_path / "short.txt"  # a chat format (the budget is stated in it) short in the tiny vocabulary
    template.write_text("{context}")
    args = [
        "--model", str(model), "--device", "cpu", "--steps", "4", "--batch-size", "4", "--group-size", "4",
        "--temperature", "1.0", "--max-prompt-tokens", "96", "--micro-batch-tokens", "64", "--lr", "1e-2",
        "--grad-clip", "0.2", "--dynamic-sampling-from", "-1", "--save-every", "1", "--no-progress", "--seed", "3",
    ]  # fmt: skip
    if preset:
        args += ["--objective", "rmt", "--max-new-tokens", "2", "--prompt-template", str(template)]
        args += ["--length-budget", "2"]
    else:
        args += ["--ntp-weight", "0.1", "--curriculum", "easy-to-hard", "--max-new-tokens", "1"]
        args += ["--prompt-template", "continuation"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    a = train_cli(tasks, whole, *args)
    # the same run stopped after step 2 by its compute budget (as by a signal), then resumed
    train_cli(tasks, part, *args, "--compute-budget", str(a[1]["flops_total"]))
    assert len(list_checkpoints(part)) == 2
    refused = CliRunner().invoke(cli, ["train", str(tasks), "--out", str(part), *args, "--steps", "5", "--resume"])
    assert refused.exit_code != 0 and "steps" in refused.output  # T shapes the schedules: it is the run's
    b = train_cli(tasks, part, *args, "--resume")
    assert [_timeless(x) for x in b] == [_timeless(x) for x in a]
    assert all(x["grad_norm"] > 0 and x["ntp_loss"] > 0 for x in a)
    assert [x["curriculum_weight_hard"] for x in a] == [0.0, 0.0, 0.0, 1.0]
    if preset:
        assert [x["length_budget"] for x in a] == [2, 1, 1, 1]
    else:
        assert all(x["zero_variance_share"] < 1 for x in a)  # the policy gradient at every step
    ca, cb = list_checkpoints(whole)[-1], list_checkpoints(part)[-1]
    wa, wb = load_file(str(ca / "model.safetensors")), load_file(str(cb / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit
    sa, sb = (torch.load(c / "trainer_state.pt", weights_only=True)["optimizer"]["state"] for c in (ca, cb))
    assert all(torch.equal(v, sb[i][k]) for i, st_ in sa.items() for k, v in st_.items())  # AdamW's moments


def _timeless(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.endswith("_s") and k != "rollout_tokens_per_s"}
