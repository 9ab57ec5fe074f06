"""The judge reward (`--reward judge --judge MODEL`): a local model decides whether a prediction is a
semantic prefix of the text that really follows (RLPT, arXiv 2509.19249, its generative reward model).

    judge = Judge.load("path/to/judge-model", device="cpu")            # or Judge(model, tokenizer, engine, ...)
    verdicts = judge.judge([(task, prediction), ...])                  # batched, cached
    verdicts[0].reward, verdicts[0].status                             # 1.0 | 0.0; yes | no | unparseable | ...
    judge.take_counts()                                                # calls, cache hits, tokens, FLOPs since last

What the judge sees (`judge_messages`): RLPT's prompt in our words, with the reference (the task's
`continuation`: the true next sentence, or the masked sentence or span) and the prediction, no
context (as RLPT's). It answers ``Score: 1`` or ``Score: 0``; `parse_verdict` reads that (or a boxed
or bare 1/0, yes/no). Greedy decoding, so a verdict is a function of (judge, prompt).
Where we chose (RLPT, arXiv 2509.19249, names no judge model and no parsing rule): RLPT gives the
judge "several subsequent segments as reference" for a next-sentence task; our tasks carry the
target sentence alone, so a prediction that runs on past it is judged against the sentence.

Where no call is needed:
- no prediction (no box, or an empty one): 0, status ``no_prediction``;
- a prediction whose normalized text (NFC, whitespace folded, `rpttrain.reward.normalize_text`) is a
  prefix of the reference's at a word boundary: 1, status ``exact`` (a byte-exact prefix is a
  semantic prefix; our choice, it spares the judge the easy cases and keeps the reward monotone in
  the exact match).

Everything else goes to the model, all of a call's items as one batch through the rollout engine
(`rpttrain.rollout`): each distinct (task, prediction) once. Its verdicts are cached in an SQLite file
(`JudgeCache`) keyed by the judge's identity, the task's text and the normalized prediction, so the
G samples of a group that say the same thing, later steps, `rpt probe` and `rpt eval` pay once. An
unparseable verdict scores 0, is cached as such (greedy decoding would write it again) and is counted
(`judge_unparseable`).

Compute: the judge's tokens (prompt + written, of each distinct pair a call judges, whether the
model ran it or the cache held it, so the count does not depend on the cache) at 2·N_judge FLOPs each,
N_judge the judge's parameters, reported as `judge_flops` and added to a training step's FLOPs, so
runs with a judge compare honestly at equal --compute-budget.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rptdata.errors import BadOption
from rpttrain.reward import normalize_text

__all__ = [
    "JUDGE_PROMPT_VERSION",
    "Judge",
    "JudgeCache",
    "Verdict",
    "default_cache_path",
    "judge_from_options",
    "judge_messages",
    "parse_verdict",
    "prefix_at_word",
]

# the --judge options' help, shared by rpt train, rpt eval and rpt probe
JUDGE_HELP = (
    "The judge model of --reward judge (sentence and span tasks; a local folder, hub id or rpt alias such as "
    "smollm2-135m): it reads the prediction and the true target and answers Score: 1|0, is it a semantic prefix "
    "(RLPT); greedy, batched through the rollout engine; in rpt train its tokens count at 2·N_judge FLOPs."
)
JUDGE_MAX_NEW_TOKENS_HELP = "Tokens the judge may write (its one-line verdict; more for a judge that reasons first)."
JUDGE_CACHE_HELP = (
    "SQLite file of the judge's verdicts per (judge, task, prediction); default $RPT_CACHE_DIR/judge/<judge>.sqlite "
    "(~/.cache/rpt), shared by train, probe and eval with the same judge, so none pays twice."
)


def judge_from_options(options, device: str, engine: str, dtype: str, gpu_memory_utilization: float = 0.2):
    """The `Judge` of a command's options (`judge`, `judge_max_new_tokens`, `judge_cache`,
    `trust_remote_code`: rpt train's, eval's and probe's configs), on `device` and `engine`; None
    without --judge."""
    if not getattr(options, "judge", None):
        return None
    return Judge.load(
        options.judge,
        device=device,
        dtype=dtype,
        engine=engine,
        cache_path=options.judge_cache,
        max_new_tokens=options.judge_max_new_tokens,
        trust_remote_code=options.trust_remote_code,
        gpu_memory_utilization=gpu_memory_utilization,
    )


# bump when the prompt's words change: cached verdicts of another prompt are not reused
JUDGE_PROMPT_VERSION = 1

# RLPT's prompt for its generative reward model (arXiv 2509.19249 Sec. 3.2), in our words: the same
# task (is the prediction a prefix of the reference in meaning, wording free), the same two inputs,
# the same one-line output "Score: 1" / "Score: 0"
_USER = """## Task
You get a Prediction and a Reference text. Decide whether the Prediction is the beginning of the Reference: \
it must say the same thing as the Reference's first part, though not necessarily in the same words. It may \
stop before the Reference ends, but it must not add, change or contradict anything.

Reference: {reference}

Prediction: {prediction}

## Scoring
Score 1 if the Prediction means the same as the beginning of the Reference, else 0. Judge the meaning, not \
the exact wording.

Write only the score, on one line, and nothing else:
Score: 1
or
Score: 0"""


def judge_messages(reference: str, prediction: str) -> list[dict]:
    """The judge's one user turn: RLPT's task in our words, the reference, the prediction.

    >>> m = judge_messages("The sum is 4.", "It equals 4.")
    >>> len(m), "Reference: The sum is 4." in m[0]["content"], "Prediction: It equals 4." in m[0]["content"]
    (1, True, True)
    """
    return [{"role": "user", "content": _USER.format(reference=reference.strip(), prediction=prediction.strip())}]


_SCORE = re.compile(r"score\s*(?:[:=]|is|of)?\s*([01])(?!\d|\.\d)", re.IGNORECASE)
_BOX = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")
_YES, _NO = {"yes", "true", "1"}, {"no", "false", "0"}


def parse_verdict(text: str) -> float | None:
    """1.0, 0.0, or None (unparseable): the last ``Score: 0|1`` (or "score is 1"; case, spacing and
    markdown bold free), else the last ``\\boxed{...}`` holding 1/0, yes/no or true/false, else a reply whose first
    word is 0, 1, yes or no. Reasoning before it (``<think>...</think>``) is allowed.

    >>> parse_verdict("Score: 1"), parse_verdict("Hmm.\\n**Score:** 0"), parse_verdict("\\\\boxed{yes}"), parse_verdict("1")
    (1.0, 0.0, 1.0, 1.0)
    >>> parse_verdict("The score is 1."), parse_verdict("Score: 0.5"), parse_verdict("It is fine"), parse_verdict("")
    (1.0, None, None, None)
    """
    scores = _SCORE.findall(text.replace("**", ""))
    if scores:
        return float(scores[-1])
    boxes = _BOX.findall(text)
    if boxes:
        word = boxes[-1].strip().strip(".!*`'\"").lower()
        return 1.0 if word in _YES else 0.0 if word in _NO else None
    first = re.match(r"\W*(\w+)", text)
    if first:
        word = first.group(1).lower()
        if word in _YES | _NO:
            return 1.0 if word in _YES else 0.0
    return None


def prefix_at_word(prediction: str, reference: str) -> bool:
    """True when the normalized prediction is a non-empty prefix of the normalized reference that
    ends where a word ends (so "The su" is no prefix of "The sum is 4.").

    >>> prefix_at_word("The sum", "The  sum is 4."), prefix_at_word("The su", "The sum is 4.")
    (True, False)
    >>> prefix_at_word("The sum is 4.", "The sum is 4."), prefix_at_word("", "x")
    (True, False)
    """
    p, r = normalize_text(prediction), normalize_text(reference)
    if not p or not r.startswith(p):
        return False
    return len(p) == len(r) or not (r[len(p) - 1].isalnum() and r[len(p)].isalnum())


@dataclass(frozen=True)
class Verdict:
    reward: float
    status: str  # yes | no | unparseable | exact | no_prediction
    output: str | None = None  # what the judge wrote (None where it was not asked)
    tokens: int = 0  # the judge call behind it: prompt + written tokens (0 where it was not asked)


def default_cache_path(judge_id: str) -> Path:
    """`$RPT_CACHE_DIR/judge/<judge identity hash>.sqlite` (default `~/.cache/rpt`): shared by every
    run, probe and eval with the same judge, so none pays twice."""
    from rptdata.models import cache_root

    return cache_root() / "judge" / f"{hashlib.sha256(judge_id.encode()).hexdigest()[:16]}.sqlite"


class JudgeCache:
    """Verdicts by key in one SQLite file (WAL: a training run and an eval may share it). Writes are
    committed per batch, so a crash loses at most the batch being judged."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, reward REAL, status TEXT, output TEXT, tokens INTEGER)"
        )
        self.db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, Verdict]:
        out: dict[str, Verdict] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                q = f"SELECT key, reward, status, output, tokens FROM verdicts WHERE key IN ({','.join('?' * len(chunk))})"
                for key, reward, status, output, tokens in self.db.execute(q, chunk):
                    out[key] = Verdict(float(reward), status, output, int(tokens))
        return out

    def put_many(self, items: dict[str, Verdict]) -> None:
        with self._lock:
            self.db.executemany(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?)",
                [(k, v.reward, v.status, v.output, v.tokens) for k, v in items.items()],
            )
            self.db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT count(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        self.db.close()


def _key(judge_id: str, task: dict, prediction: str) -> str:
    fields = [
        judge_id,
        task.get("context", ""),
        task["continuation"],
        task.get("context_after") or "",
        normalize_text(prediction),
    ]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()


class Judge:
    """A frozen judge model behind a rollout engine, with its cache and its counts.

    `judge_id` names what a verdict depends on (the model, the prompt's version, the token limits);
    it keys the cache. Counts since the last `take_counts()`: judge_calls (prompts the model ran),
    judge_cache_hits, judge_unparseable (verdicts of this call's items, cached or not, that were
    unparseable), judge_tokens (prompt + written tokens of each distinct pair judged, run or cached),
    judge_flops (2·N_judge per such token)."""

    COUNTS = ("judge_calls", "judge_cache_hits", "judge_unparseable", "judge_tokens", "judge_flops")

    def __init__(
        self,
        model,
        tokenizer,
        engine,
        judge_id: str,
        cache: JudgeCache,
        max_new_tokens: int = 64,
        max_prompt_tokens: int = 2048,
    ):
        self.model, self.tokenizer, self.engine, self.judge_id, self.cache = model, tokenizer, engine, judge_id, cache
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.n_params = sum(p.numel() for p in model.parameters()) if model is not None else 0
        self.counts = dict.fromkeys(self.COUNTS, 0)

    @classmethod
    def load(
        cls,
        spec: str,
        device: str = "cpu",
        dtype: str = "auto",
        engine: str = "hf",
        cache_path: str | Path | None = None,
        max_new_tokens: int = 64,
        max_prompt_tokens: int = 2048,
        trust_remote_code: bool = False,
        gpu_memory_utilization: float = 0.2,
    ) -> Judge:
        """Load the judge model `spec` (a local folder, a hub id, or an rpt model alias) frozen, in
        eval mode, behind engine `engine` (hf | vllm), with its cache (default `default_cache_path`)."""
        from rptdata.models import load_causal_lm, load_tokenizer
        from rpttrain.rollout import make_engine

        if max_new_tokens < 1:
            raise BadOption(f"--judge-max-new-tokens must be at least 1 (got {max_new_tokens})")
        tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
        model = load_causal_lm(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        model.requires_grad_(False)
        judge_id = json.dumps(
            {"judge": _identity(spec), "prompt": JUDGE_PROMPT_VERSION, "max_new_tokens": max_new_tokens,
             "max_prompt_tokens": max_prompt_tokens},
            sort_keys=True,
        )  # fmt: skip
        if engine == "vllm":
            from rpttrain.eval.passes import _vllm_path

            eng = make_engine(
                "vllm",
                model,
                tokenizer,
                model_path=_vllm_path(spec),
                gpu_memory_utilization=gpu_memory_utilization,
                dtype=dtype,
            )
        else:
            eng = make_engine("hf", model, tokenizer)
        cache = JudgeCache(cache_path or default_cache_path(judge_id))
        return cls(model, tokenizer, eng, judge_id, cache, max_new_tokens, max_prompt_tokens)

    def render(self, reference: str, prediction: str) -> list[int]:
        messages = judge_messages(reference, prediction)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"
            ids = tok(text)["input_ids"]
        return ids

    def prompt_ids(self, task: dict, prediction: str) -> list[int]:
        """The judge's prompt, at most `max_prompt_tokens` long: a prediction too long for it keeps its
        start (what a prefix is judged by)."""
        ids = self.render(task["continuation"], prediction)
        over = len(ids) - self.max_prompt_tokens
        if over > 0:
            pred_ids = self.tokenizer(prediction, add_special_tokens=False)["input_ids"]
            ids = self.render(task["continuation"], self.tokenizer.decode(pred_ids[: max(len(pred_ids) - over, 0)]))
        if len(ids) > self.max_prompt_tokens:
            raise BadOption(
                f"task {task.get('task_id', '?')}: its target alone makes a judge prompt of {len(ids)} tokens, over the "
                f"judge's {self.max_prompt_tokens}; make the tasks with a lower --max-target-tokens"
            )
        return ids

    def judge(self, items: Sequence[tuple[dict, str | None]]) -> list[Verdict]:
        """One verdict per (task, prediction), the model run once per distinct uncached pair. The
        counted tokens and FLOPs are those of every distinct pair judged, from the model or the cache
        (what judging these predictions costs, so a resumed run, or a run on another's cache,
        counts the same compute); calls and cache hits say what actually ran."""
        from rpttrain.rollout import Sampling, stop_ids

        out: list[Verdict | None] = [None] * len(items)
        keys: dict[int, str] = {}
        for i, (task, pred) in enumerate(items):
            if pred is None or not pred.strip():
                out[i] = Verdict(0.0, "no_prediction")
            elif prefix_at_word(pred, task["continuation"]):
                out[i] = Verdict(1.0, "exact")
            else:
                keys[i] = _key(self.judge_id, task, pred)
        cached = self.cache.get_many(sorted(set(keys.values())))
        todo: dict[str, int] = {}  # key -> the first item that needs it
        for i, k in keys.items():
            if k in cached:
                self.counts["judge_cache_hits"] += 1
            elif k not in todo:
                todo[k] = i
            else:
                self.counts["judge_cache_hits"] += 1  # the same pair twice in one call: judged once
        fresh: dict[str, Verdict] = {}
        if todo:
            order = list(todo.items())
            prompts = [self.prompt_ids(items[i][0], items[i][1]) for _, i in order]
            sampling = Sampling(
                n=1, temperature=0.0, max_new_tokens=self.max_new_tokens, stop_token_ids=stop_ids(self.tokenizer)
            )
            groups = self.engine.generate(prompts, sampling)
            self.counts["judge_calls"] += len(prompts)
            for (k, _), prompt, g in zip(order, prompts, groups):
                text, n = g[0].text, len(prompt) + len(g[0].token_ids)
                v = parse_verdict(text)
                fresh[k] = (
                    Verdict(0.0, "unparseable", text, n) if v is None else Verdict(v, "yes" if v else "no", text, n)
                )
            self.cache.put_many(fresh)
        judged = {**{k: cached[k] for k in set(keys.values()) if k in cached}, **fresh}
        tokens = sum(v.tokens for v in judged.values())
        self.counts["judge_tokens"] += tokens
        self.counts["judge_flops"] += 2.0 * self.n_params * tokens
        for i, k in keys.items():
            out[i] = fresh.get(k) or cached[k]
        self.counts["judge_unparseable"] += sum(v.status == "unparseable" for v in out)
        return out  # type: ignore[return-value]

    def take_counts(self) -> dict:
        """The counts since the last call, then zeroed."""
        out, self.counts = self.counts, dict.fromkeys(self.COUNTS, 0)
        return out

    def close(self) -> None:
        self.engine.close()
        self.cache.close()


def _identity(spec: str) -> str:
    """A model spec as it keys the cache: a local folder by its resolved path and its weights'
    sizes and modification times (retrained weights in the same folder are another judge)."""
    p = Path(spec)
    if not p.is_dir():
        return spec
    stamp = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in p.glob("*.safetensors"))
    return json.dumps([str(p.resolve()), stamp])
