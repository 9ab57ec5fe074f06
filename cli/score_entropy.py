from __future__ import annotations

import click

from cli.common import (
    executor_options,
    library_errors,
    model_help,
    model_runtime_options,
    no_progress_option,
    overwrite_option,
    trust_remote_code_option,
)


@click.command("score-entropy")
@click.argument("prepared_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--model",
    "-m",
    default="smollm2-135m",
    show_default=True,
    help=model_help(
        "Proxy model; it must use the tokenizer the corpus was prepared with. "
        "The paper's proxy is deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (GPU)"
    ),
)
@click.option(
    "--out", "-o", type=click.Path(file_okay=False), help="Output directory (positions/ shards + manifest.json)."
)
@click.option(
    "--top-k", default=16, show_default=True, type=int, help="k, the number of most likely next tokens in the entropy."
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Keep positions with entropy >= H (the hard positions) [default: 0.5].",
)
@click.option("--keep-all", is_flag=True, help="Keep every scored position (no threshold).")
@click.option(
    "--max-context",
    type=int,
    default=None,
    help="Window size in tokens (context + target); longer documents are scored in chunks that carry the "
    "key/value cache (hf engine: each token once) or in overlapping windows (vllm) "
    "[default: the model's max positions, capped at 2048].",
)
@click.option(
    "--min-context",
    type=int,
    default=1,
    show_default=True,
    help="Score only positions with at least this many tokens of context; every window gives them at least this many.",
)
@click.option(
    "--overlap",
    type=int,
    default=None,
    help="Tokens of context each later chunk (or window) of a long document carries [default: half the window].",
)
@click.option(
    "--batch-tokens",
    type=int,
    default=None,
    help="Padded tokens per forward batch (length-sorted) [default: 8192 on CPU, 65536 on a GPU].",
)
@model_runtime_options(
    "Scorer: hf (transformers, CPU/GPU), vllm (prompt log-probs), or auto: vllm when it is installed and CUDA is present."
)
@click.option(
    "--entropy",
    "entropy_mode",
    type=click.Choice(["full-softmax", "renormalized"]),
    default="full-softmax",
    show_default=True,
    help="Use the top-k full-softmax probabilities as they are, or renormalize them to sum to 1.",
)
@click.option("--save-topk", is_flag=True, help="Also store topk_ids and topk_logprobs for every kept position.")
@click.option(
    "--num-workers",
    type=int,
    default=None,
    help="Split the input shards between N processes [default: torchrun's WORLD_SIZE, else 1].",
)
@click.option(
    "--worker-index", type=int, default=None, help="This process's share, 0..N-1 [default: torchrun's RANK, else 0]."
)
@executor_options
@click.option(
    "--merge",
    is_flag=True,
    help="Only write the manifest of a finished multi-worker run; the argument is then the scored directory.",
)
@overwrite_option
@trust_remote_code_option
@no_progress_option
@library_errors
def score_entropy(
    prepared_dir,
    model,
    out,
    top_k,
    threshold,
    keep_all,
    max_context,
    min_context,
    overlap,
    batch_tokens,
    engine,
    dtype,
    device,
    entropy_mode,
    save_topk,
    num_workers,
    worker_index,
    executor,
    ray_address,
    merge,
    overwrite,
    trust_remote_code,
    no_progress,
):
    """Score every position of a prepared corpus with a proxy model's top-k entropy.

    Position pos of a document has context tokens[0:pos] and target token_ids[pos]. With p_i
    the proxy's full-softmax next-token probabilities, sorted, and k = --top-k:

    \b
      full-softmax:  H = -sum_{i=1..k} p_i log p_i
      renormalized:  H = -sum_{i=1..k} q_i log q_i,  q_i = p_i / sum_{j=1..k} p_j   (0 <= H <= log k)

    Writes OUT/positions/part-NNNNN.parquet (one per input shard): doc_id, pos, token_id,
    entropy, target_logprob, target_rank (1 = top choice), top1_id [, topk_ids, topk_logprobs].

    \b
    Example:
      rpt score-entropy out/prep --out out/scored --threshold 1.0
      rpt score-entropy out/prep --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --out out/scored
      rpt score-entropy out/prep --out out/scored --num-workers 2 --worker-index 0   # and 1, then:
      rpt score-entropy out/scored --merge
      rpt score-entropy out/prep --out out/scored --executor ray   # one scorer per GPU (or CPU) of a Ray cluster
    """
    from rptdata.score import DEFAULT_THRESHOLD, ScoreConfig, merge_scored, run_score_entropy

    if merge:
        m = merge_scored(prepared_dir)
        _summary(m, prepared_dir)
        return
    if not out:
        raise click.UsageError("--out is required (or pass --merge with a scored directory)")
    if keep_all and threshold is not None:
        raise click.UsageError("give either --threshold or --keep-all, not both")
    config = ScoreConfig(
        prepared=prepared_dir,
        out=out,
        model=model,
        top_k=top_k,
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
        keep_all=keep_all,
        max_context=max_context,
        min_context=min_context,
        overlap=overlap,
        batch_tokens=batch_tokens,
        engine=engine,
        dtype=dtype,
        device=device,
        entropy=entropy_mode,
        save_topk=save_topk,
        num_workers=num_workers,
        worker_index=worker_index,
        executor=executor,
        ray_address=ray_address,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        progress=not no_progress,
    )
    m = run_score_entropy(config)
    if m.get("complete", True):
        _summary(m, out)
    else:
        c = m["counts"]
        w, n = m["worker"]
        click.echo(
            f"score-entropy: worker {w}/{n} done ({c['positions_scored']:,} positions scored, {c['positions_kept']:,} kept); "
            f"{m['shards_done']}/{m['shards_total']} shards finished. The last worker writes the manifest "
            f"(or run: rpt score-entropy {out} --merge)"
        )


def _summary(m: dict, out: str) -> None:
    c, o = m["counts"], m["options"]
    rule = "all kept" if o["keep_all"] else f"entropy >= {o['threshold']:g}"
    seconds = m.get("seconds") or 0.0
    rate = f", {c['positions_scored'] / seconds:,.0f} tok/s" if seconds > 0 else ""
    click.echo(
        f"score-entropy: {c['positions_scored']:,} positions scored in {c['documents']:,} documents with "
        f"{m['proxy']['name']}, {c['positions_kept']:,} kept ({rule}), {c['positions_skipped_short_context']:,} "
        f"skipped (context < {o['min_context']}) -> {out}/positions ({seconds:.1f} s{rate})"
    )
