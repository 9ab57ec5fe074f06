"""Rollout engines behind one narrow interface, shared by `rpt train`, `rpt probe` and `rpt eval`.

    engine = make_engine(choose_engine("auto", device), model, tokenizer)   # "hf" or "vllm" (imported lazily)
    groups = engine.generate(prompt_ids, Sampling(n=8, temperature=0.8, max_new_tokens=64, seed=0))
    groups[i][j] -> Completion(token_ids, text, logprobs, finish_reason)

The backend is chosen by `rptdata.engine_choice.choose_engine`, the rule `rpt score-entropy`
uses for its scorers too. Prompts go in as token-id lists (already rendered with the prompt
format and tokenized), so every engine sees exactly the same tokens. `update_weights(model)` pushes trained weights into engines
that keep their own copy (vLLM); the transformers engine shares the training model, so it is a no-op.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rptdata.engine_choice import BACKENDS
from rptdata.errors import BadOption


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise BadOption("n and max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise BadOption("temperature must be >= 0 and top_p in (0, 1]")
        if self.temperature == 0 and self.n > 1:
            raise BadOption("greedy decoding (temperature 0) gives n identical samples; use n=1")


@dataclass
class Completion:
    token_ids: list[int]  # new tokens, up to and including a stop token if one was produced
    text: str  # decoded new tokens, stop/special tokens removed
    finish_reason: str  # "stop" (a stop token) or "length" (hit max_new_tokens)
    logprobs: list[float] | None = field(default=None)  # the engine's log-prob of each sampled token


def fed_back_tokens(groups: Sequence[Sequence[Completion]]) -> int:
    """Generated tokens that go back through the model: all but each completion's last one (the
    last is sampled from the previous step's logits and never fed)."""
    return sum(max(len(c.token_ids) - 1, 0) for g in groups for c in g)


_SEED_SPACE = 2**31 - 2**20  # vLLM seeds are ints; keep seed + n below 2**31


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index` in a call seeded `seed`: each prompt's samples depend on its own
    seed only, not on how prompts are chunked or ordered (vLLM: its n samples use seed .. seed+n-1).

    >>> prompt_seed(0, 0) == prompt_seed(0, 0) != prompt_seed(0, 1)
    True
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _SEED_SPACE


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[Completion]]: ...

    def forward_tokens(
        self, prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Completion]], sampling: Sampling
    ) -> int:
        """Tokens the engine ran through the model for generate(prompts, sampling) -> groups: what
        the rollout compute (2·N FLOPs a token) is counted from."""
        ...

    def update_weights(self, model) -> None: ...

    def close(self) -> None: ...


def make_engine(name: str, model, tokenizer, **kwargs) -> RolloutEngine:
    if name == "hf":
        from rpttrain.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, **kwargs)
    if name == "vllm":
        from rpttrain.rollout.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, **kwargs)
    raise BadOption(f"unknown engine {name!r}; choose one of {', '.join(BACKENDS)}")


def stop_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end a completion: eos plus the chat end-of-turn token when there is one."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for tok in ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return tuple(sorted(ids))
