from __future__ import annotations

from dataclasses import MISSING, fields

import click

from cli.common import field_type, library_errors

# options are generated from TrainConfig's fields (help text included), so that every one is
# settable both here and in --config YAML


def _options(fn):
    from rpttrain.config import RMT_OFF, RMT_PRESET, TrainConfig

    for f in reversed([f for f in fields(TrainConfig) if f.name not in ("tasks_dir", "out")]):
        name = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        show = f" [default: {default}]" if default is not None else ""  # None: the help says what applies
        if f.name in RMT_OFF:  # set by --objective where not given
            show = f" [default: {RMT_OFF[f.name]}; with --objective rmt: {RMT_PRESET[f.name]}]"
        if "bool" in str(f.type):
            fn = click.option(f"{name}/--no-{f.name.replace('_', '-')}", default=None, help=f.metadata["help"] + show)(
                fn
            )
        else:
            fn = click.option(name, type=field_type(f), default=None, help=f.metadata["help"] + show)(fn)
    return fn


@click.command()
@click.argument("tasks_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML file of options (command-line options win).",
)
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --out, exactly.")
@click.option("--overwrite", is_flag=True, help="Delete an existing run in --out and start over.")
@click.option(
    "--backend",
    type=click.Choice(["rpt", "verl", "trl"]),
    default="rpt",
    show_default=True,
    help="rpt: this trainer, one process on one device | trl: TRL's GRPOTrainer in-process, several "
    "processes through accelerate | verl: write (and with --launch run) a verl 0.9.1 launch for "
    "several GPUs and nodes. Options a backend cannot honour are refused by name.",
)
@click.option(
    "--launch",
    is_flag=True,
    help="verl: run the written launch script; trl: start accelerate when more than one process.",
)
@click.option(
    "--gpus-per-node", type=int, default=1, show_default=True, help="GPUs (processes) per node, --backend trl|verl."
)
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes, --backend trl|verl.")
@click.option(
    "--sharding",
    type=click.Choice(["ddp", "fsdp", "zero3"]),
    default="ddp",
    show_default=True,
    help="--backend trl on several GPUs: DDP, FSDP2, or DeepSpeed ZeRO-3 (pip install deepspeed).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the memory estimate by part and what it was sized from (the tasks' longest context, "
    "the micro-batch, the attention kernel), then exit: 0 when the run fits, 1 when it does not. "
    "Loads no weight and writes nothing.",
)
@_options
@library_errors
def train(
    tasks_dir, out, config_file, resume, overwrite, backend, launch, gpus_per_node, nodes, sharding, dry_run, **options
):
    """Train a policy on RPT tasks: GRPO with the prefix-matching reward (--objective rpt, the
    default; --objective rmt adds RMT's next-token term, length budget and curriculum), RLP
    (--objective rlp) or a next-token baseline (--objective ntp | shaped-ntp).

    Defaults are the paper's recipe (Table 5). On a CPU, use a small batch, the continuation
    format and a few new tokens.

    \b
    Example (CPU, embedded model):
      rpt train out/tasks --out out/run --prompt-template continuation --max-new-tokens 1 \\
          --batch-size 16 --group-size 8 --lr 1e-5 --steps 20 --max-prompt-tokens 256
    Example (paper recipe):
      rpt train out/tasks --out out/run --config configs/paper.yaml
    Example (RMT: budget in a chat prompt, next-token term, easy-to-hard bands; docs/family.md):
      rpt train out/tasks --out out/rmt --objective rmt --prompt-template v0 --max-new-tokens 1024
    Example (RLP, a thought before each next token; docs/family.md):
      rpt train out/tasks --out out/rlp --objective rlp --max-new-tokens 32 --batch-size 4 --group-size 4
    Example (past one GPU: 2 nodes x 8 GPUs with verl; TRL on one node):
      rpt train out/tasks --out out/verl-run --config configs/paper.yaml --backend verl --nodes 2 --gpus-per-node 8
      rpt train out/tasks --out out/trl-run --backend trl --gpus-per-node 8 --sharding fsdp --launch
    """
    import yaml

    from rpttrain.backends import run_backend
    from rpttrain.config import config_from_dict

    data = {}
    if config_file:
        with open(config_file) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise click.BadParameter(f"{config_file}: not valid YAML ({e})", param_hint="--config") from None
        if not isinstance(data, dict):
            raise click.UsageError(f"{config_file}: expected a mapping of option: value")
        data = {k.replace("-", "_"): v for k, v in data.items()}
    data.update({k: v for k, v in options.items() if v is not None})
    data.update(tasks_dir=tasks_dir, out=out)
    if data.get("progress") is False:
        from rptdata.models import hide_library_progress

        hide_library_progress()
    if dry_run:
        from rpttrain.preflight import dry_run, format_plan

        record = dry_run(config_from_dict(data), backend, gpus_per_node * nodes)
        click.echo(format_plan(record))
        if record["verdict"] == "does-not-fit":
            click.echo(record["refusal"], err=True)
            raise SystemExit(1)
        return
    summary = run_backend(
        config_from_dict(data),
        backend,
        launch=launch,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        sharding=sharding,
        resume=resume,
        overwrite=overwrite,
    )
    if "command" in summary and "totals" not in summary:
        what = "launched" if launch else "launch with"
        click.echo(f"train --backend {backend}: {what}: {summary['command']}")
        return
    t = summary["totals"]
    why = {
        "signal": " (stopped by a signal; continue with --resume)",
        "compute_budget": " (compute budget reached)",
    }.get(summary.get("stopped_by") or "", "")
    click.echo(
        f"train: {summary['steps']} steps{why}, {t.get('samples', 0):,} samples, {t.get('flops', 0):.3g} FLOPs -> {out}"
    )
