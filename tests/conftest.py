"""Shared fixtures. Run everything with `make test` (or `.venv/bin/python -m pytest -q`).

Real-model fixtures use the embedded SmolLM2-135M (alias smollm2-135m); its GGUF is converted
once into the rpt cache (~30 s on a fresh machine) and loads in well under a second afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
QWEN_TOKENIZER = SHARED / "tokenizers" / "r1-distill-qwen"
OMNIMATH = SHARED / "corpora" / "omnimath-rule.jsonl"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from rptdata.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    if not QWEN_TOKENIZER.exists():
        pytest.skip("../shared/tokenizers/r1-distill-qwen is not present")
    from rptdata.models import load_tokenizer

    return load_tokenizer(str(QWEN_TOKENIZER))


@pytest.fixture(scope="session")
def tiny_bpe_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer folder trained offline (GPT-2 style pre-tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    corpus = ["The quick brown fox jumps over the lazy dog. 1234567890 "] * 50 + [
        "héllo wörld 世界 🎉 naïve café\r\n"
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    folder = tmp_path_factory.mktemp("tiny_bpe")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    return folder


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name: str, rows: list, raw_lines: list[bytes] | None = None) -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            for row in rows:
                f.write(json.dumps(row).encode("utf-8") + b"\n")
            for line in raw_lines or []:
                f.write(line + b"\n")
        return path

    return write


# texts a tied tiny model is warmed on (tests/rpt_fixtures.warm_up), and tasks cut from them at
# every word: contexts of 1 to 9 words (1 to 11 tokens), whose next word the model gets right
# with middling probability, so groups hold both rewards and every step has a gradient; with
# --micro-batch-tokens 24 most batches of 4 take 2 micro-batches
WARM = [
    "The quick brown fox jumps over the lazy dog.",
    "1234567890 the lazy dog jumps over the quick brown fox",
    "héllo wörld, naïve café",
]
WARM_PAIRS = [(" ".join(w[:k]), " " + w[k]) for w in (t.split(" ") for t in WARM) for k in range(1, len(w))]


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tiny_bpe_dir):
    """A tied tiny model warmed on WARM, and tasks cut from WARM (tests/test_train.py, test_rlp.py)."""
    from tests.rpt_fixtures import tiny_llama, write_tasks_dir

    root = tmp_path_factory.mktemp("warm_rl")
    model = tiny_llama(root / "model", tiny_bpe_dir, tie=True, warm_texts=WARM)
    return model, write_tasks_dir(root / "tasks", str(tiny_bpe_dir), WARM_PAIRS)
