"""Final answers of math problems: where an answer sits in a text, and whether two answers agree.

    last_boxed("so \\boxed{72}.")                 -> "72"     the content of the last complete \\boxed{}
    answer_from(record_field, "gsm8k")            -> the text after GSM8K's "#### " (plain | gsm8k | boxed)
    parse_reference("\\frac{1}{2}")               -> math-verify's parse of a reference answer ([] = unusable)
    check_answer(completion, "72", timeout_s=5)   -> MathVerdict(reward, extracted, status)

`rpt answer-tasks` (`rptdata.answer_tasks`) finds and checks reference answers with these, and the
`math` reward (`rpttrain.reward.math_reward`) scores completions with `check_answer`, so what a task
promises and what training rewards are one definition. The comparison is math-verify's (Hugging
Face's Math-Verify, the checker TRL's `accuracy_reward` calls), never a parser written here.

How a completion is read (`check_answer`):
1. only the text after the last ``</think>`` (all of it when there is none);
2. its last complete ``\\boxed{...}`` (braces matched), given to math-verify as ``\\boxed{...}``
   (then, if that reads nothing, its content as written, e.g. ``$72$``); an empty box is no answer;
3. with no box, an answer math-verify finds after an anchor ("the final answer is 72"), LaTeX or
   plain, the extraction TRL's ``accuracy_reward`` uses (``try_extract_without_anchor=False``): a
   truncated completion ending in "... in 20" has no answer, rather than the answer 20;
4. ``verify(parse(reference), parse(answer))``, both with math-verify's defaults (so LaTeX that
   sympy cannot evaluate stays a string and compares as a string); the reference is parsed
   inside ``$...$`` (answers are bare LaTeX: ``\\frac{1}{2}``), as written when that reads nothing.

Every check runs in a worker process under a deadline (`timeout_s`, default 5 s for the whole
check): math-verify (sympy) can hang inside C code, where no signal reaches it, or allocate without
bound (``\\boxed{(10^{10^{10}})!}`` took this machine's 24 GiB), so it never runs in the caller's
process. The worker (one spawned process, shared by the caller's threads, memory capped at 4 GiB)
stops a Python-level hang itself with SIGALRM; the caller kills and replaces it when a check is
still running 2 s after its deadline, or when it dies. A check that times out, raises or kills its
worker scores 0 and says so in `status` ("timeout" | "error"), so callers count them; it never
raises. Cost: one round trip to the worker per check (about a millisecond) besides math-verify.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "ANSWER_FROM",
    "DEFAULT_TIMEOUT_S",
    "STATUSES",
    "MathVerdict",
    "answer_from",
    "check_answer",
    "last_boxed",
    "parse_reference",
]

ANSWER_FROM = ("plain", "gsm8k", "boxed")
DEFAULT_TIMEOUT_S = 5.0
STATUSES = ("ok", "no_answer", "timeout", "error")

_BOX = "\\boxed{"
_END_THINK = "</think>"
# One step of the brace scan: a box opening (group 1), a run of "{" (group 2), a run of "}"
# (group 3), or a run of brace-free "{...}" groups (no group; they cannot hold a box, since
# "\\boxed{" contains a brace). Runs keep hostile inputs fast.
_BRACE_SCAN = re.compile(r"(\\boxed\{)|(?:\{[^{}]*\})+|(\{+)|(\}+)")
_GSM8K_MARK = re.compile(r"^####[ \t]*(.*?)\s*$", re.MULTILINE)


def last_boxed(text: str, start: int = 0) -> str | None:
    """The content of the last complete ``\\boxed{...}`` in ``text[start:]``, or None.

    "Last" means the complete box whose closing brace comes last: with nested boxes the outermost
    wins; a box that never closes (a truncated answer) is ignored; unmatched braces outside any
    box are ignored. Braces are matched, so ``\\boxed{a{b}c}`` gives ``a{b}c``. One forward scan
    with a stack: linear time even for megabytes of unclosed ``\\boxed{`` or stray braces.

    >>> last_boxed("\\\\boxed{\\\\frac{a}{b}} then \\\\boxed{ =}")
    ' ='
    >>> last_boxed("\\\\boxed{a \\\\boxed{b}}")
    'a \\\\boxed{b}'
    >>> last_boxed("\\\\boxed{1} and \\\\boxed{2"), last_boxed("none") is None
    ('1', True)
    """
    best: tuple[int, int] | None = None  # (content start, closing brace) of the answer
    # Braces outside every box cannot change which boxes close, so whenever no box is open,
    # jump straight to the next box opening with str.find.
    i = text.find(_BOX, start)
    while i != -1:
        content = i + len(_BOX)
        close = text.find("}", content)
        if close != -1 and text.find("{", content, close) == -1:
            best = (content, close)  # fast path: a box with no braces inside
            i = text.find(_BOX, close)
            continue
        boxes = [content]  # content start of each open box, innermost last
        plain = [0]  # open plain "{" directly above each open box
        i = -1  # stays -1 if the text ends inside an unclosed box
        for m in _BRACE_SCAN.finditer(text, content):
            s, e = m.span()
            kind = m.lastindex
            if kind == 1:  # \boxed{
                boxes.append(e)
                plain.append(0)
            elif kind == 2:  # a run of "{"
                plain[-1] += e - s
            elif kind == 3:  # a run of "}": closes plain braces first, then boxes, one by one
                while s < e:
                    if plain[-1] >= e - s:
                        plain[-1] -= e - s
                        break
                    s += plain.pop()
                    best = (boxes.pop(), s)
                    s += 1
                    if not boxes:
                        break
                if not boxes:
                    i = text.find(_BOX, e)
                    break
            # kind None: brace-free "{...}" groups, which leave the stack as it was
    return None if best is None else text[best[0] : best[1]]


def after_think(text: str) -> str:
    """The text after the last ``</think>`` (all of it when there is none).

    >>> after_think("<think>\\\\boxed{1}</think> \\\\boxed{2}")
    ' \\\\boxed{2}'
    """
    end = text.rfind(_END_THINK)
    return text if end < 0 else text[end + len(_END_THINK) :]


def answer_from(value: str, rule: str) -> str | None:
    """Where a record's final answer sits in its answer field; None when it is not there.

    - ``plain``: the whole field, stripped;
    - ``gsm8k``: what follows the last line starting with ``####`` (GSM8K's solutions end with
      ``#### 72``), with thousands separators removed from a number (``1,000`` -> ``1000``);
    - ``boxed``: the content of the last complete ``\\boxed{...}`` (a solution's final answer).

    An empty result is None (no answer).

    >>> answer_from("so 48+24=72.\\n#### 72", "gsm8k"), answer_from("#### 1,000", "gsm8k")
    ('72', '1000')
    >>> answer_from("The answer is \\\\(\\\\boxed{115440}\\\\).", "boxed"), answer_from("  7 ", "plain")
    ('115440', '7')
    >>> answer_from("no mark", "gsm8k") is None, answer_from("\\\\boxed{ }", "boxed") is None
    (True, True)
    """
    if rule == "plain":
        found = value
    elif rule == "gsm8k":
        marks = _GSM8K_MARK.findall(value)
        found = marks[-1] if marks else None
        if found and re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", found.strip()):
            found = found.replace(",", "")
    elif rule == "boxed":
        found = last_boxed(value)
    else:
        raise ValueError(f"answer rule must be one of {', '.join(ANSWER_FROM)}, not {rule!r}")
    found = None if found is None else found.strip()
    return found or None


# ---------------------------------------------------------------------------------------------
# math-verify under a deadline


@dataclass(frozen=True)
class MathVerdict:
    """One completion checked against a reference answer.

    reward: 1.0 when math-verify says they agree, else 0.0.
    extracted: the answer read from the completion (math-verify's string of it), None when none.
    status: ok (checked, right or wrong) | no_answer | timeout | error (math-verify raised, or
        its worker process died).
    """

    reward: float
    extracted: str | None
    status: str


class _Deadline(BaseException):
    """Raised by SIGALRM in the worker; a BaseException, so math-verify's `except Exception` lets it through."""


def _quiet_math_verify() -> None:
    # math-verify warns once that its own (signal, whole-second) timeouts are off: ours replaces them
    for name in ("math_verify", "math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _mv():
    import math_verify

    _quiet_math_verify()
    return math_verify


def _as_string(parsed: list) -> str | None:
    """math-verify's parse is [sympy object, the matched string] (or [string] on a fallback)."""
    # never str() the sympy object: printing some (floor of a huge power) evaluates them and raises
    strings = [x for x in parsed if isinstance(x, str)]
    return strings[-1] if strings else None


@lru_cache(maxsize=65536)
def _parse_reference_cached(answer: str) -> tuple:
    mv = _mv()
    # a reference is usually bare LaTeX (\frac{1}{2}, \sqrt{2}): math delimiters first, then as written
    for text in (f"${answer}$", answer):
        parsed = mv.parse(text, parsing_timeout=None)
        if parsed:
            return tuple(parsed)
    return ()


def parse_reference(answer: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """The text math-verify matched in a reference answer ([] when it reads nothing usable, or when
    reading it failed or ran out of time): `rpt answer-tasks` refuses such an answer.

    >>> parse_reference("\\\\frac{1}{2}")
    ['\\\\frac{1}{2}']
    """
    kind, value = _POOL.run("reference", (answer,), timeout_s)
    return value if kind == "ok" else []


def _check(completion: str, answer: str) -> MathVerdict:
    mv = _mv()
    region = after_think(completion)
    box = last_boxed(region)
    if box is not None and not box.strip():
        return MathVerdict(0.0, None, "no_answer")
    if box is not None:  # the box, as math-verify reads a box; else its content as written (`$72$`)
        parsed = mv.parse(f"\\boxed{{{box}}}", parsing_timeout=None) or mv.parse(box, parsing_timeout=None)
    else:  # no box: only an anchored answer ("the final answer is 72"), as TRL's accuracy_reward reads one
        parsed = mv.parse(region, extraction_config=_ANCHORED(), parsing_timeout=None)
    if not parsed:
        return MathVerdict(0.0, None, "no_answer")
    gold = list(_parse_reference_cached(answer))
    if not gold:
        return MathVerdict(0.0, _as_string(parsed), "error")
    right = mv.verify(gold, parsed, timeout_seconds=None)
    return MathVerdict(1.0 if right else 0.0, _as_string(parsed), "ok")


def _ANCHORED() -> list:
    mv = _mv()
    return [
        mv.LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
        mv.ExprExtractionConfig(try_extract_without_anchor=False),
    ]


def check_answer(completion: str, answer: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> MathVerdict:
    """Check a completion's final answer against the reference `answer` with math-verify (see the
    module docstring for how the completion is read), under a deadline of `timeout_s` seconds.
    Never raises for strings: a timeout or an error is a verdict of 0 with its status.

    >>> check_answer("<think>maybe 3</think> so \\\\boxed{\\\\frac{144}{2}}", "72")
    MathVerdict(reward=1.0, extracted='\\\\frac{144}{2}', status='ok')
    >>> check_answer("\\\\boxed{}", "72").status, check_answer("\\\\boxed{73}", "72").reward
    ('no_answer', 0.0)
    """
    if timeout_s is None or not timeout_s > 0:
        raise ValueError(f"a math check needs a timeout > 0 seconds, not {timeout_s!r}")
    kind, value = _POOL.run("check", (completion, answer), timeout_s)
    return value if kind == "ok" else MathVerdict(0.0, None, kind)


# ---------------------------------------------------------------------------------------------
# the worker process: math-verify (sympy) can hang in C code, where no signal reaches it, or
# allocate without bound (`(10^{10^{10}})!`), so checks never run in the caller's process. The
# worker is `python -m rptdata.math_answers --worker` speaking JSON lines on its stdin and stdout:
# no multiprocessing, so nothing depends on how the caller's main module can be imported.

_WORKER_MEMORY = 4 * 2**30  # address-space cap of the worker: a runaway sympy number is a MemoryError
_START_TIMEOUT_S = 120.0  # the worker's imports (sympy, antlr) on a loaded machine


def _serve() -> None:
    """The worker's loop: one request a line, [kind, args, timeout_s] -> [status, value]."""
    import json
    import resource
    import sys

    _quiet_math_verify()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _WORKER_MEMORY if hard == resource.RLIM_INFINITY else min(_WORKER_MEMORY, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    _mv()  # imported once, before the first deadline starts
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        kind, args, timeout_s = json.loads(line)
        status, value = _in_worker(kind, tuple(args), float(timeout_s))
        if isinstance(value, MathVerdict):
            value = [value.reward, value.extracted, value.status]
        out.write(json.dumps([status, value]).encode() + b"\n")
        out.flush()


def _in_worker(kind: str, args: tuple, timeout_s: float) -> tuple[str, object]:
    """("ok", result) | ("timeout", None) | ("error", None); a Python-level hang is stopped here by
    SIGALRM (the worker's main thread), one in C code by the caller killing the process."""
    previous = signal.signal(signal.SIGALRM, _raise_deadline)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        if kind == "check":
            return "ok", _check(*args)
        parsed = _parse_reference_cached(*args)
        return "ok", [x for x in parsed if isinstance(x, str)] or (["<parsed>"] if parsed else [])
    except _Deadline:
        return "timeout", None
    except BaseException:  # sympy and antlr raise anything (MemoryError, RecursionError) on hostile LaTeX
        return "error", None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _raise_deadline(signum, frame):
    raise _Deadline()


class _Worker:
    """The caller's side: one worker process, shared by every thread (a lock orders them), started
    on first use and replaced when a check runs past its deadline (killed) or the process dies."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._buffer = b""

    def _start(self) -> None:
        import os
        import subprocess
        import sys
        from pathlib import Path

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # where this package is imported from
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rptdata.math_answers", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._buffer = b""
        if self._readline(_START_TIMEOUT_S) != b"ready":
            self._kill()
            raise RuntimeError("the math-verify worker process did not start (is math-verify installed?)")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def _readline(self, timeout_s: float) -> bytes | None:
        """The next line from the worker; None when none came in time, b"" when it died."""
        import os
        import select
        import time

        deadline = time.monotonic() + timeout_s
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def run(self, kind: str, args: tuple, timeout_s: float) -> tuple[str, object]:
        import json

        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(json.dumps([kind, list(args), timeout_s]).encode() + b"\n")
                self._proc.stdin.flush()
            except OSError:  # the worker died since the last check
                self._kill()
                return "error", None
            line = self._readline(timeout_s + 2.0)  # the margin: the round trip
            if not line:  # None: still running past its deadline (stuck in C code); b"": it died
                self._kill()
                return ("timeout" if line is None else "error"), None
            status, value = json.loads(line)
            if kind == "check" and status == "ok":
                value = MathVerdict(float(value[0]), value[1], value[2])
            return status, value


_POOL = _Worker()


if __name__ == "__main__" and "--worker" in __import__("sys").argv:
    _serve()
