"""The judge (`rpttrain.judge`) through the vLLM engine: the same verdicts, counts and cache as through
transformers (greedy decoding in float32 writes the same tokens; tests/test_rollout_vllm.py checks
that for the engine itself). Run by `make test-vllm`."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from rpttrain.judge import Judge  # noqa: E402
from tests.test_judge import TASKS  # noqa: E402

ITEMS = [
    (TASKS[0], " The total is four."),
    (TASKS[0], " The total is four."),
    (TASKS[0], " The sum"),
    (TASKS[1], " It was on the sofa."),
    (TASKS[1], None),
]


def test_the_vllm_judge_agrees_with_the_transformers_judge(tmp_path):
    verdicts, counts = {}, {}
    for engine in ("hf", "vllm"):
        judge = Judge.load(
            "smollm2-135m", device="cpu", dtype="float32", engine=engine, cache_path=tmp_path / f"{engine}.sqlite"
        )
        try:
            verdicts[engine] = judge.judge(ITEMS)
            counts[engine] = judge.take_counts()
            again = judge.judge(ITEMS)
            assert again == verdicts[engine] and judge.take_counts()["judge_calls"] == 0
        finally:
            judge.close()
    assert verdicts["vllm"] == verdicts["hf"]
    assert [v.status for v in verdicts["vllm"][2:]][::2] == ["exact", "no_prediction"]
    assert counts["vllm"]["judge_calls"] == counts["hf"]["judge_calls"] == 2
    assert counts["vllm"]["judge_tokens"] == counts["hf"]["judge_tokens"] > 0
