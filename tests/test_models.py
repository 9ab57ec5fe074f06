"""Model resolution: alias, .gguf, folder, hub id without network."""

from __future__ import annotations

import time

import pytest

from rptdata.errors import ModelResolutionError
from rptdata.models import load_tokenizer, resolve_model, vocab_hash


def test_alias_resolves_to_packaged_gguf():
    src = resolve_model("smollm2-135m")
    assert src.kind == "alias" and src.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_model(src.path).kind == "gguf"


def test_alias_gguf_and_folder_give_the_same_vocabulary(smollm2_tokenizer, tiny_bpe_dir):
    via_gguf = load_tokenizer(resolve_model("smollm2-135m").path)
    assert vocab_hash(via_gguf) == vocab_hash(smollm2_tokenizer)
    assert smollm2_tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [19556, 905]
    assert vocab_hash(load_tokenizer(str(tiny_bpe_dir))) != vocab_hash(smollm2_tokenizer)


def test_hub_id_without_network_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ModelResolutionError, match="pass a local model folder|Pass a local model folder"):
        load_tokenizer("someone/not-a-real-model-xyz")
    assert time.time() - t < 10  # no minute of retries


def test_missing_local_path_is_an_error():
    with pytest.raises(ModelResolutionError, match="no such file"):
        resolve_model("./does/not/exist")


def test_one_tokenizer_check_names_both_vocabularies_and_the_way_out(smollm2_tokenizer, tiny_bpe_dir):
    """Every training backend refuses tasks of another vocabulary with the same message, unless
    --allow-tokenizer-mismatch; answer tasks record no tokenizer and pass."""
    from dataclasses import replace

    from rptdata.errors import ManifestMismatch
    from rpttrain.config import TrainConfig
    from rpttrain.data import policy_tokenizer

    tiny = vocab_hash(load_tokenizer(str(tiny_bpe_dir)))
    tasks = {"stage": "make-tasks", "tokenizer": {"name": "tiny-bpe", "vocab_hash": tiny}}
    config = TrainConfig("out/tasks", "out/run", model="smollm2-135m")
    with pytest.raises(ManifestMismatch) as e:
        policy_tokenizer(config, tasks)
    smol = vocab_hash(smollm2_tokenizer)
    for part in ("tiny-bpe", tiny, "smollm2-135m", smol, "Rebuild", "--allow-tokenizer-mismatch"):
        assert part in str(e.value), part
    assert policy_tokenizer(replace(config, allow_tokenizer_mismatch=True), tasks) is not None
    assert policy_tokenizer(config, {"stage": "answer-tasks", "task_kind": "answer"}) is not None
