"""Corpus readers: turn the inputs of `rpt prepare` into a stream of raw records.

Inputs: files (`.jsonl`, `.jsonl.gz`, `.json`, `.parquet`, `.txt`, `.md`), folders (searched
recursively for those), globs, the built-in corpus `builtin:champ` (CHAMP, shipped in the PyPI
package `champ-dataset`), a local `datasets` folder (`save_to_disk`), or a `datasets` hub id.

Every record is streamed, never a whole corpus in memory; `.json` files (one array of objects)
are the exception: they are parsed whole, so use `.jsonl` or `.parquet` for large corpora.

Splitting between workers: `index_source` counts a source's records (a line scan for `.jsonl`,
metadata for `.parquet` and saved datasets) and notes where chosen records begin (byte offset
and line number in a `.jsonl`), so `read_source(..., start=i, mark=...)` starts at record i
without reading what comes before (a `.jsonl.gz` is decompressed up to it, a hub dataset
streamed up to it).
A bad record is yielded as a `RawRecord` with `reject` set (file, line, reason), so the caller
can stop with that message or, with `--skip-bad`, count it and go on.

Ids: `doc_id = "<source>#<row>"`, where row is the 1-based line number for `.jsonl`, the
0-based index for `.json`, `.parquet` and datasets, `0` for a text file, and the problem id
for `builtin:champ`. They are stable across runs over the same files.
"""

from __future__ import annotations

import glob as globlib
import gzip
import importlib.util
import itertools
import json
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rptdata.errors import BadInput, BadOption

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt", ".md")
BUILTINS = {"builtin:champ": "{problem}\n\n{solution}"}  # name -> default template


@dataclass
class RawRecord:
    source: str
    row: int | str
    text: str | None = None
    reject: str | None = None  # reason key, e.g. "malformed_json"
    detail: str = ""
    answer: str | None = None  # the answer field's text (`rpt answer-tasks`, TextBuilder's answer_field)

    @property
    def doc_id(self) -> str:
        return f"{self.source}#{self.row}"

    def where(self) -> str:
        return f"{self.source}, {'line' if self.source.endswith(('.jsonl', '.jsonl.gz')) else 'record'} {self.row}"


@dataclass(frozen=True)
class InputSource:
    kind: str  # file | builtin | hf_disk | hf_hub
    path: str

    def fingerprint(self) -> dict:
        if self.kind == "file":
            st = os.stat(self.path)
            return {"path": self.path, "size": st.st_size, "mtime": int(st.st_mtime)}
        if self.kind == "builtin":
            f = _champ_file()
            return {"path": self.path, "size": f.stat().st_size}
        if self.kind == "hf_disk":
            total = sum(p.stat().st_size for p in Path(self.path).rglob("*") if p.is_file())
            return {"path": self.path, "size": total}
        return {"path": self.path}


def _has_suffix(name: str) -> bool:
    return name.endswith(SUFFIXES)


def expand_inputs(inputs: list[str]) -> list[InputSource]:
    """Files, folders, globs and named datasets -> an ordered list of sources (no duplicates)."""
    out: list[InputSource] = []
    for item in inputs:
        if item in BUILTINS:
            out.append(InputSource("builtin", item))
            continue
        p = Path(item)
        if p.is_dir():
            if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
                out.append(InputSource("hf_disk", os.path.normpath(item)))
                continue
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _has_suffix(f.name))
            if not files:
                raise BadInput(f"{item}: folder holds no {', '.join(SUFFIXES)} files")
            out += [InputSource("file", os.path.normpath(f)) for f in files]
        elif p.is_file():
            if not _has_suffix(p.name):
                raise BadInput(f"{item}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
            out.append(InputSource("file", os.path.normpath(item)))
        elif any(ch in item for ch in "*?["):
            files = sorted(f for f in globlib.glob(item, recursive=True) if os.path.isfile(f) and _has_suffix(f))
            if not files:
                raise BadInput(f"{item}: the pattern matches no {', '.join(SUFFIXES)} files")
            out += [InputSource("file", os.path.normpath(f)) for f in files]
        elif item.startswith(("builtin:", "/", ".", "~")) or item.count("/") > 1 or _has_suffix(item):
            raise BadInput(f"{item}: no such file, folder or built-in corpus (built-ins: {', '.join(BUILTINS)})")
        else:
            out.append(InputSource("hf_hub", item))
    seen, unique = set(), []
    for src in out:
        if src not in seen:
            seen.add(src)
            unique.append(src)
    return unique


# ---------------------------------------------------------------------------------------------
# records -> text


class TextBuilder:
    """Builds a document's text from a record: `--text-field F` or `--template "{a}\\n\\n{b}"`;
    with `answer_field` (`rpt answer-tasks`) it also reads that field's text into RawRecord.answer,
    and a record without it is rejected like one without its text."""

    def __init__(self, text_field: str | None = None, template: str | None = None, answer_field: str | None = None):
        if text_field and template:
            raise BadOption("give either --text-field or --template, not both")
        self.answer_field = answer_field
        self.template = unescape(template) if template else None
        self.text_field = text_field or ("text" if not template else None)
        self.fields = []
        if self.template is not None:
            try:
                self.fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
            except ValueError as e:
                raise BadOption(f"--template {template!r}: {e} (write literal braces as {{{{ and }}}})") from None
            if not self.fields:
                raise BadOption(f'--template {template!r} names no field, e.g. "{{problem}}\\n\\n{{solution}}"')
            if any(not f.isidentifier() for f in self.fields):
                raise BadOption(f"--template {template!r}: fields must be plain names like {{problem}}")

    @property
    def names(self) -> list[str]:
        """The record fields the text (and the answer) are built from."""
        names = self.fields if self.template is not None else [self.text_field]
        return names + [self.answer_field] if self.answer_field else names

    def for_source(self, source: InputSource) -> TextBuilder:
        if source.kind == "builtin" and self.template is None and self.text_field == "text":
            return TextBuilder(template=BUILTINS[source.path], answer_field=self.answer_field)
        return self

    def build(self, record) -> tuple[str | None, str | None, str]:
        """(text, reject_reason, detail)."""
        if not isinstance(record, dict):
            return None, "not_an_object", f"expected a JSON object, got {type(record).__name__}"
        values = {}
        for name in self.names:
            value = record.get(name)
            if value is None:
                fields = ", ".join(sorted(map(str, record))[:12])
                if name == self.answer_field:
                    return None, "missing_answer", f"no answer field {name!r} (fields: {fields}); use --answer-field"
                return None, "missing_field", f"no field {name!r} (fields: {fields}); use --text-field or --template"
            if not isinstance(value, (str, int, float)):
                return None, "bad_field_type", f"field {name!r} is a {type(value).__name__}, not text"
            values[name] = str(value)
        if self.template is None:
            return values[self.text_field], None, ""
        return self.template.format_map({k: values[k] for k in self.fields}), None, ""


def unescape(template: str) -> str:
    r"""Turn the two-character sequences \n, \t and \\ into the characters (shell-friendly).

    >>> unescape(r"{a}\n\n{b}")
    '{a}\n\n{b}'
    """
    out, i = [], 0
    while i < len(template):
        ch = template[i]
        if ch == "\\" and i + 1 < len(template) and template[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[template[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# readers


def read_source(
    src: InputSource, builder: TextBuilder, split: str = "train", start: int = 0, mark: tuple[int, int] | None = None
) -> Iterator[RawRecord]:
    """The source's records from record `start` on (0-based, in reading order). For a `.jsonl`,
    `mark` is (byte offset, line number) of record `start`, from `index_source`."""
    builder = builder.for_source(src)
    try:
        if src.kind == "builtin":
            yield from itertools.islice(_read_champ(builder), start, None)
        elif src.kind in ("hf_disk", "hf_hub"):
            yield from _read_hf(src, builder, split, start)
        elif src.path.endswith((".jsonl", ".jsonl.gz")):
            if start and mark is None:
                raise ValueError(f"{src.path}: starting at record {start} needs its mark from index_source")
            yield from _read_jsonl(src.path, builder, *(mark or (0, 1)))
        elif src.path.endswith(".json"):
            yield from itertools.islice(_read_json(src.path, builder), start, None)
        elif src.path.endswith(".parquet"):
            yield from _read_parquet(src.path, builder, start)
        elif start == 0:
            yield from _read_text_file(src.path)
    except (OSError, EOFError) as e:  # unreadable / truncated file
        yield RawRecord(src.path, 0, reject="unreadable_file", detail=f"{type(e).__name__}: {e}")


@dataclass(frozen=True)
class SourceIndex:
    """How many records a source holds, and where the marked ones begin (`.jsonl` only:
    record index -> (byte offset, 1-based line number))."""

    records: int
    marks: dict


def index_source(src: InputSource, split: str = "train", mark_every: int = 1, offset: int = 0) -> SourceIndex:
    """Count the records `read_source` yields for this source, marking every record whose global
    index (`offset` + its index here) is a multiple of `mark_every`. An unreadable or truncated
    file counts one more record: the reject `read_source` yields for it."""
    try:
        if src.kind == "builtin":
            return SourceIndex(len(json.loads(_champ_file().read_text(encoding="utf-8"))["problems"]), {})
        if src.kind in ("hf_disk", "hf_hub"):
            return SourceIndex(_count_hf(src, split), {})
        if src.path.endswith((".jsonl", ".jsonl.gz")):
            return _index_jsonl(src.path, mark_every, offset)
        if src.path.endswith(".json"):
            return SourceIndex(sum(1 for _ in _read_json(src.path, TextBuilder())), {})
        if src.path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return SourceIndex(pq.ParquetFile(src.path).metadata.num_rows, {})
        return SourceIndex(1, {})
    except (OSError, EOFError):
        return SourceIndex(1, {})


def _index_jsonl(path: str, mark_every: int, offset: int) -> SourceIndex:
    opener = gzip.open if path.endswith(".gz") else open
    marks, n, pos = {}, 0, 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():  # the reader's test for a blank line
                    if (offset + n) % mark_every == 0:
                        marks[n] = (pos, lineno)
                    n += 1
                pos += len(raw)
    except (OSError, EOFError):  # the reader yields one reject for the broken rest
        if (offset + n) % mark_every == 0:
            marks[n] = (pos, 0)
        n += 1
    return SourceIndex(n, marks)


def _record(source: str, row, obj, builder: TextBuilder) -> RawRecord:
    text, reason, detail = builder.build(obj)
    answer = str(obj[builder.answer_field]) if builder.answer_field and reason is None else None
    return RawRecord(source, row, text=text, reject=reason, detail=detail, answer=answer)


def _read_jsonl(path: str, builder: TextBuilder, byte_offset: int = 0, first_line: int = 1) -> Iterator[RawRecord]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        if byte_offset:
            f.seek(byte_offset)  # gzip: decompresses up to it
        for lineno, raw in enumerate(f, first_line):
            if not raw.strip():
                continue  # a blank line (ASCII whitespace only) is not a record
            try:  # orjson parses valid lines ~3x faster; whatever it refuses takes the json path below,
                obj = _fast_loads(raw)  # so rejects read as they always did
            except ValueError:
                obj = None
            if isinstance(obj, dict) and not any(isinstance(obj.get(k), float) for k in builder.names):
                yield _record(path, lineno, obj, builder)  # (a float may be an integer over 64 bits: json's)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRecord(path, lineno, reject="invalid_utf8", detail=f"byte {e.start} of the line is not UTF-8")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield RawRecord(path, lineno, reject="malformed_json", detail=f"{e.msg} at column {e.colno}")
                continue
            yield _record(path, lineno, obj, builder)


def _fast_loads(raw: bytes):
    """orjson.loads (JSONDecodeError, a ValueError, for anything it refuses: invalid UTF-8, lone
    surrogates, NaN, integers over 64 bits); json.loads when orjson is not installed."""
    global _fast_loads
    try:
        from orjson import loads
    except ImportError:
        loads = json.loads
    _fast_loads = loads
    return loads(raw)


def _read_json(path: str, builder: TextBuilder) -> Iterator[RawRecord]:
    raw = Path(path).read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        yield RawRecord(path, 0, reject="invalid_utf8", detail=f"line {line}: not UTF-8")
        return
    except json.JSONDecodeError as e:
        yield RawRecord(path, 0, reject="malformed_json", detail=f"{e.msg} at line {e.lineno} column {e.colno}")
        return
    records = data if isinstance(data, list) else [data]
    for i, obj in enumerate(records):
        yield _record(path, i, obj, builder)


def _read_parquet(path: str, builder: TextBuilder, start: int = 0) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    row, groups = 0, []
    for g in range(f.metadata.num_row_groups):  # skip whole row groups before `start`
        n = f.metadata.row_group(g).num_rows
        if row + n <= start and not groups:
            row += n
        else:
            groups.append(g)
    if not groups:
        return
    for batch in f.iter_batches(batch_size=1024, row_groups=groups):
        for obj in batch.to_pylist():
            if row >= start:
                yield _record(path, row, obj, builder)
            row += 1


def _read_text_file(path: str) -> Iterator[RawRecord]:
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        yield RawRecord(path, 0, reject="invalid_utf8", detail=f"line {line}, byte {e.start}: not UTF-8")
        return
    yield RawRecord(path, 0, text=text)


def _champ_file() -> Path:
    # find_spec does not run champ_dataset/__init__.py (which needs natsort)
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("builtin:champ needs the package champ-dataset: pip install --no-deps champ-dataset==1.0.0")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json"


def _read_champ(builder: TextBuilder) -> Iterator[RawRecord]:
    data = json.loads(_champ_file().read_text(encoding="utf-8"))
    for pid, p in data["problems"].items():
        record = {
            "id": pid,
            "problem": p.get("_text", ""),
            "solution": " ".join(step["_text"] for step in p.get("solution", {}).get("steps", [])),
            "answer": p.get("_answer", ""),
            "category": p.get("category", ""),
        }
        yield _record("builtin:champ", pid, record, builder)


def _read_hf(src: InputSource, builder: TextBuilder, split: str, start: int = 0) -> Iterator[RawRecord]:
    ds, source = _open_hf(src, split)
    if start:
        ds = ds.skip(start) if src.kind == "hf_hub" else ds.select(range(start, len(ds)))
    for i, obj in enumerate(ds, start):
        yield _record(source, i, obj, builder)


def _count_hf(src: InputSource, split: str) -> int:
    ds, _ = _open_hf(src, split)
    if src.kind == "hf_disk":
        return len(ds)
    info = getattr(ds, "info", None)
    known = info.splits.get(split) if info is not None and info.splits else None
    return known.num_examples if known is not None and known.num_examples else sum(1 for _ in ds)


def _open_hf(src: InputSource, split: str):
    import datasets

    if src.kind == "hf_disk":
        ds = datasets.load_from_disk(src.path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise BadInput(f"{src.path}: no split {split!r} (splits: {', '.join(ds)}); use --split")
            ds = ds[split]
        source = src.path
    else:
        from rptdata.models import _hub_reachable

        if not _hub_reachable():
            raise BadInput(
                f"{src.path}: not a file, folder or built-in corpus; as a `datasets` id it needs the "
                "Hugging Face hub, which cannot be reached (no network?). Pass local files instead."
            )
        try:
            ds = datasets.load_dataset(src.path, split=split, streaming=True)
        except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
            raise BadInput(
                f"{src.path}: not a file, folder or built-in corpus, and `datasets` could not load it "
                f"as a dataset id ({type(e).__name__}: {str(e)[:200]}). Offline? Pass local files."
            ) from e
        source = f"hf:{src.path}/{split}"
    return ds, source
