from __future__ import annotations

import click

from cli.common import (
    executor_options,
    library_errors,
    model_help,
    no_progress_option,
    overwrite_option,
    trust_remote_code_option,
)


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="Output directory (docs/ shards + manifest.json).",
)
@click.option("--tokenizer", default="smollm2-135m", show_default=True, help=model_help("Tokenizer to use"))
@click.option("--text-field", default=None, help="Record field holding the text (default: 'text').")
@click.option(
    "--template",
    default=None,
    help=r'Build the text from several fields, e.g. "{problem}\n\n{solution}" (\n and \t are unescaped; literal braces as {{ }}).',
)
@click.option(
    "--split", default="train", show_default=True, help="Split to read from a datasets id or a saved DatasetDict."
)
@click.option(
    "--max-docs", default=None, type=int, help="Read only the first N records (quick trials); they are counted as read."
)
@click.option("--dedupe", is_flag=True, help="Drop exact duplicate documents (by content hash, after normalization).")
@click.option(
    "--min-chars", default=1, show_default=True, type=int, help="Drop documents shorter than this many characters."
)
@click.option(
    "--shard-docs",
    default=10_000,
    show_default=True,
    type=int,
    help="Input records per output shard (it holds the documents kept from them); the unit of work, of the worker split and of resume.",
)
@click.option("--batch-docs", default=512, show_default=True, type=int, help="Documents per tokenizer batch.")
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=int,
    help="Prepare with N local processes (one per core; the shards are split between them).",
)
@click.option(
    "--num-workers",
    type=int,
    default=None,
    help="Split the shards between N processes or machines [default: torchrun's WORLD_SIZE, else 1].",
)
@click.option(
    "--worker-index", type=int, default=None, help="This process's share, 0..N-1 [default: torchrun's RANK, else 0]."
)
@executor_options
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Skip malformed records into OUT/rejects.jsonl (counted) instead of stopping at the first.",
)
@click.option(
    "--allow-empty", is_flag=True, help="Write the output even when the inputs yield no document (an error otherwise)."
)
@overwrite_option
@trust_remote_code_option
@no_progress_option
@library_errors
def prepare(
    inputs,
    out,
    tokenizer,
    text_field,
    template,
    split,
    max_docs,
    dedupe,
    min_chars,
    shard_docs,
    batch_docs,
    processes,
    num_workers,
    worker_index,
    executor,
    ray_address,
    skip_bad,
    allow_empty,
    overwrite,
    trust_remote_code,
    no_progress,
):
    """Ingest a corpus: clean, tokenize with exact byte spans, write document shards.

    INPUTS are files (.jsonl, .jsonl.gz, .json, .parquet, .txt, .md), folders, globs, the
    built-in corpus builtin:champ, a saved `datasets` folder, or a `datasets` hub id.

    \b
    Example:
      rpt prepare builtin:champ --out out/prep
      rpt prepare corpus/*.jsonl --template "{problem}\\n\\n{solution}" --out out/prep --dedupe
      rpt prepare corpus/*.jsonl --out out/prep --processes 8
      rpt prepare corpus/*.jsonl --out out/prep --num-workers 4 --worker-index 0   # and 1..3, anywhere
      rpt prepare builtin:champ --out out/prep --executor ray   # every shard a task on a Ray cluster
    """
    from rptdata.prepare import PrepareConfig, run_prepare

    config = PrepareConfig(
        inputs=tuple(inputs),
        out=out,
        tokenizer=tokenizer,
        text_field=text_field,
        template=template,
        split=split,
        max_docs=max_docs,
        dedupe=dedupe,
        min_chars=min_chars,
        shard_docs=shard_docs,
        batch_docs=batch_docs,
        skip_bad=skip_bad,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        progress=not no_progress,
        num_workers=num_workers,
        worker_index=worker_index,
        processes=processes,
        executor=executor,
        ray_address=ray_address,
        allow_empty=allow_empty,
    )
    m = run_prepare(config)
    c = m["counts"]
    if not m.get("complete", True):
        w, n = m["worker"]
        click.echo(
            f"prepare: worker {w}/{n} done ({c['documents_read']:,} documents read, {c['tokens']:,} tokens written); "
            f"{m['shards_done']}/{m['shards_total']} shards finished. The worker that finishes last writes "
            f"the manifest (or run this command again once the others are done)."
        )
        return
    rejected = sum(c["documents_rejected"].values())
    dropped = ", ".join(f"{k} {v}" for k, v in c["documents_dropped"].items()) or "none"
    click.echo(
        f"prepare: {c['documents_read']:,} documents read, {c['documents_written']:,} written "
        f"({c['tokens']:,} tokens) in {len(m['shards'])} shard(s), {rejected:,} rejected, dropped: {dropped} "
        f"-> {out}/docs ({m['seconds']:.1f} s)"
    )
