"""Measure sentence splitters on math text (docs/tasks.md, "Choosing the sentence splitter").

    PYTHONPATH=. .venv/bin/python bench/sentence_splitters.py ../shared/corpora/omnimath-rule.jsonl builtin:champ

For each splitter: sentences, characters per second, and the bad splits, with two examples of
each kind: a split inside a LaTeX math span ($...$, $$...$$, \\[...\\], \\(...\\)), right after an
abbreviation ("e.g.", "i.e.", "cf.", "vs.", "Fig.", "Eq.", "resp.", "approx.", "Thm.", "Lem.",
"Prop."), between the digits of a decimal ("1.5"), or a sentence that is only an enumeration
marker ("1.", "(a)", "[*]"). Bad splits are found by these patterns, not by hand, so the counts
compare across splitters. `rpt` is the splitter make-tasks uses (`rptdata.tasks.units.sentence_spans`:
nupunkt, plus blank lines, minus boundaries inside math). Needs pysbd, nupunkt and sentencex.
"""

from __future__ import annotations

import json
import re
import sys
import time

ABBREV = re.compile(r"\b(?:e\.g|i\.e|cf|vs|Fig|Eq|resp|approx|Thm|Lem|Prop)\.$")
MARKER = re.compile(r"^(?:\(?[0-9a-zA-Z]{1,2}[.)]|\[\*\]|\[list\])$")


def math_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in re.finditer(r"\$\$.+?\$\$|\$[^$]+?\$|\\\[.+?\\\]|\\\(.+?\\\)", text, flags=re.S):
        spans.append((m.start(), m.end()))
    return spans


def classify(text: str, start: int, cut: int, spans) -> str | None:
    """Why the split that ends the sentence text[start:cut] is bad, or None."""
    if any(a < cut < b for a, b in spans):
        return "inside_math"
    left = text[:cut].rstrip()
    if cut < len(text) and text[cut - 1] == "." and text[cut - 2 : cut - 1].isdigit() and text[cut].isdigit():
        return "decimal"
    if ABBREV.search(left):
        return "abbreviation"
    if MARKER.match(text[start:cut].strip()):
        return "enumeration_alone"
    return None


def splitters():
    import pysbd
    from nupunkt import sent_spans_with_text
    from sentencex import segment

    seg = pysbd.Segmenter(language="en", clean=False, char_span=True)

    def pysbd_cuts(text):
        return [s.end for s in seg.segment(text)][:-1]

    def nupunkt_cuts(text):
        return [end for _, (start, end) in sent_spans_with_text(text)][:-1]

    def sentencex_cuts(text):
        # sentencex returns strings (whitespace runs as pieces of their own): find each in order
        cuts, pos = [], 0
        for s in segment("en", text):
            i = text.find(s, pos)
            if i >= 0 and s.strip():
                pos = i + len(s)
                cuts.append(pos)
        return cuts[:-1]

    def rpt_cuts(text):
        from rptdata.tasks.units import sentence_spans

        return [end for _, end in sentence_spans(text)][:-1]

    return {"pysbd": pysbd_cuts, "nupunkt": nupunkt_cuts, "sentencex": sentencex_cuts, "rpt": rpt_cuts}


def docs_of(path: str, limit: int | None = None) -> list[str]:
    if path == "builtin:champ":
        from rptdata.sources import _champ_file

        data = json.loads(_champ_file().read_text(encoding="utf-8"))["problems"]
        docs = [
            p.get("_text", "") + "\n\n" + " ".join(s["_text"] for s in p.get("solution", {}).get("steps", []))
            for p in data.values()
        ]
    else:
        with open(path, encoding="utf-8") as f:
            docs = [(lambda o: f"{o['problem']}\n\n{o['solution']}")(json.loads(line)) for line in f]
    return docs[:limit]


def main(paths: list[str]) -> None:
    for path in paths:
        docs = docs_of(path)
        chars = sum(len(d) for d in docs)
        print(f"\n## {path}: {len(docs)} documents, {chars:,} characters")
        for name, cuts_of in splitters().items():
            t = time.perf_counter()
            all_cuts = [cuts_of(d) for d in docs]
            secs = time.perf_counter() - t
            bad: dict[str, list[str]] = {}
            n = 0
            for d, cuts in zip(docs, all_cuts):
                spans = math_spans(d)
                n += len(cuts) + 1
                for start, c in zip([0, *cuts], cuts):
                    why = classify(d, start, c, spans)
                    if why:
                        bad.setdefault(why, []).append(repr(d[max(0, c - 30) : c] + " || " + d[c : c + 20]))
            counts = {k: len(v) for k, v in sorted(bad.items())}
            print(
                f"- {name}: {n:,} sentences, {chars / secs / 1e6:.2f} M chars/s; bad splits {sum(counts.values())}: {counts}"
            )
            for why, ex in sorted(bad.items()):
                for e in ex[:2]:
                    print(f"    {why}: {e}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["../shared/corpora/omnimath-rule.jsonl", "builtin:champ"])
