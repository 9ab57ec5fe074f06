from __future__ import annotations

import click

from cli.common import library_errors, no_progress_option, overwrite_option


@click.command("make-tasks")
@click.argument("scored_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="Output directory (train/ and eval/ shards + manifest.json).",
)
@click.option(
    "--threshold",
    default=0.5,
    show_default=True,
    type=float,
    help="Keep positions whose proxy entropy is at least this (0 keeps all).",
)
@click.option(
    "--context-tokens",
    default=1024,
    show_default=True,
    type=int,
    help="At most this many tokens of context before each position.",
)
@click.option(
    "--continuation-tokens",
    default=8,
    show_default=True,
    type=int,
    help="Tokens in each continuation (the longest prediction that can score).",
)
@click.option(
    "--eval-fraction",
    default=0.1,
    show_default=True,
    type=float,
    help="Share of documents held out for evaluation (seeded hash of doc_id).",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seeds the document split and the --max-tasks sample."
)
@click.option(
    "--max-tasks",
    default=None,
    type=int,
    help="Keep at most N training tasks (a seeded, exact, uniform sample). Default: all.",
)
@click.option(
    "--max-eval-tasks", default=None, type=int, help="Keep at most N evaluation tasks (same sampling). Default: all."
)
@click.option(
    "--bands",
    default="0.5,1.0,1.5",
    show_default=True,
    help="Entropy thresholds of the bands: 3 values name easy/medium/hard; or name=value,... A task's band is the highest it exceeds.",
)
@click.option(
    "--min-live",
    default=None,
    type=click.FloatRange(0, 1),
    help="Drop training positions whose predicted probability of a mixed-reward group (live = 1 - q^G - (1-q)^G) "
    "is below P; counted as low_live. Eval positions are never dropped. Default: keep all. The estimate is exact "
    "only when the policy is the proxy and the format is `continuation`.",
)
@click.option(
    "--group-size",
    default=8,
    show_default=True,
    type=int,
    help="G of the live estimate: samples per group in training.",
)
@click.option(
    "--temperature",
    default=0.8,
    show_default=True,
    type=float,
    help="T of the live estimate: the training sampling temperature.",
)
@click.option(
    "--unit",
    type=click.Choice(["token", "sentence", "span"]),
    default="token",
    show_default=True,
    help="What a task predicts: the next tokens (RPT), the next sentence (RLPT's ASR; with --masked the middle "
    "sentence, RLPT's MSR) or a masked span of 1..--span-words words (PretrainZero). See docs/tasks.md.",
)
@click.option(
    "--masked",
    is_flag=True,
    help="--unit sentence: mask the sentence and show the one after it too (the task carries context_after).",
)
@click.option(
    "--min-sentence-words",
    default=3,
    show_default=True,
    type=int,
    help="--unit sentence: sentences with fewer words are not targets (counted as short_sentence).",
)
@click.option(
    "--max-target-tokens",
    default=128,
    show_default=True,
    type=int,
    help="--unit sentence: sentences over more tokens are not targets (counted as long_target).",
)
@click.option(
    "--context-after-tokens",
    default=256,
    show_default=True,
    type=int,
    help="Masked units: at most this many tokens of the text after the target (context_after).",
)
@click.option(
    "--span-words", default=3, show_default=True, type=int, help="--unit span: a span holds 1..N whole words."
)
@click.option(
    "--span-select",
    type=click.Choice(["random", "entropy"]),
    default="random",
    show_default=True,
    help="--unit span: start words drawn at random (seeded by --seed), or the words whose first token has the "
    "highest entropy first.",
)
@click.option(
    "--spans-per-paragraph", default=1, show_default=True, type=int, help="--unit span: span slots per paragraph."
)
@click.option(
    "--unit-entropy",
    type=click.Choice(["mean", "first"]),
    default="mean",
    show_default=True,
    help="Sentence and span units: a task's entropy (what --threshold and --bands read) is the mean over its "
    "scored tokens, or its first token's.",
)
@click.option(
    "--prepared",
    "prepared_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="The `rpt prepare` directory, if it moved since scoring (default: the one the scored manifest names).",
)
@overwrite_option
@no_progress_option
@library_errors
def make_tasks(
    scored_dir,
    out,
    threshold,
    context_tokens,
    continuation_tokens,
    eval_fraction,
    seed,
    max_tasks,
    max_eval_tasks,
    bands,
    min_live,
    group_size,
    temperature,
    unit,
    masked,
    min_sentence_words,
    max_target_tokens,
    context_after_tokens,
    span_words,
    span_select,
    spans_per_paragraph,
    unit_entropy,
    prepared_dir,
    overwrite,
    no_progress,
):
    """Turn scored positions into RPT tasks: context, continuation and token boundaries.

    SCORED_DIR is a finished `rpt score-entropy` directory. Documents are split into train and
    eval by a seeded hash of their id, so no evaluation document is ever trained on.

    Every task carries accept_mass (q: the proxy's probability at --temperature of a one-token
    prediction the prefix reward accepts: the true token, plus saved top-k tokens spanning whole
    continuation tokens) and live = 1 - q^G - (1-q)^G, the chance that a group of --group-size
    samples gets mixed rewards (GRPO learns nothing from the others). The estimate is exact only
    when the policy is the proxy and the prompt format is `continuation`; otherwise it is a prior.

    \b
    Example:
      rpt make-tasks out/scored --out out/tasks
      rpt make-tasks out/scored --out out/tasks --threshold 1.0 --max-tasks 20000 --max-eval-tasks 1000
      rpt make-tasks out/scored --out out/tasks --min-live 0.2 --group-size 8 --temperature 0.8
      rpt make-tasks out/scored --out out/sentences --unit sentence --threshold 0
      rpt make-tasks out/scored --out out/spans --unit span --span-words 3 --span-select entropy
    """
    from rptdata.tasks import MakeTasksConfig, run_make_tasks

    config = MakeTasksConfig(
        scored_dir=scored_dir,
        out=out,
        threshold=threshold,
        context_tokens=context_tokens,
        continuation_tokens=continuation_tokens,
        eval_fraction=eval_fraction,
        seed=seed,
        max_tasks=max_tasks,
        max_eval_tasks=max_eval_tasks,
        bands=bands,
        min_live=min_live,
        group_size=group_size,
        temperature=temperature,
        unit=unit,
        masked=masked,
        min_sentence_words=min_sentence_words,
        max_target_tokens=max_target_tokens,
        context_after_tokens=context_after_tokens,
        span_words=span_words,
        span_select=span_select,
        spans_per_paragraph=spans_per_paragraph,
        unit_entropy=unit_entropy,
        prepared_dir=prepared_dir,
        overwrite=overwrite,
        progress=not no_progress,
    )
    m = run_make_tasks(config)
    c = m["counts"]
    skipped = ", ".join(f"{k} {v:,}" for k, v in c["skipped"].items() if v) or "none"
    bands_line = "; ".join(
        f"{split}: " + ", ".join(f"{b} {n:,}" for b, n in c["tasks_by_band"][split].items())
        for split in ("train", "eval")
    )
    live = c.get("predicted_live") or {}
    live_line = (
        ", ".join(f"{split} {100 * live[split]:.1f}%" for split in ("train", "eval") if live.get(split) is not None)
        or "no estimate (no target_logprob)"
    )
    read = f"{c['positions_in']:,} positions" if unit == "token" else f"{c['candidates_in']:,} {c['candidates']}"
    lines = [
        f"make-tasks{'' if unit == 'token' else ' --unit ' + m['unit']}: {read} -> {c['tasks']['train']:,} train tasks "
        f"({c['documents']['train']:,} docs), {c['tasks']['eval']:,} eval tasks ({c['documents']['eval']:,} docs); "
        f"skipped: {skipped} -> {out} ({m['seconds']:.1f} s)",
        f"  bands (highest exceeded): {bands_line}",
    ]
    if unit == "token":
        lines.append(f"  predicted live groups (G={group_size}, T={temperature:g}): {live_line}")
    click.echo("\n".join(lines))
