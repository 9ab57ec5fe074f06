from __future__ import annotations

from dataclasses import MISSING, fields

import click

from cli.common import library_errors

# options are generated from TrainConfig's fields (help text included), so that every one is
# settable both here and in --config YAML


def _options(fn):
    from rpttrain.config import TrainConfig

    for f in reversed([f for f in fields(TrainConfig) if f.name not in ("tasks_dir", "out")]):
        name = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        default = None if f.default is MISSING else f.default
        show = f" [default: {default}]"
        if "bool" in kind:
            fn = click.option(f"{name}/--no-{f.name.replace('_', '-')}", default=None, help=f.metadata["help"] + show)(fn)
        else:
            typ = float if "float" in kind else int if "int" in kind else str
            fn = click.option(name, type=typ, default=None, help=f.metadata["help"] + show)(fn)
    return fn


@click.command()
@click.argument("tasks_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML file of options (command-line options win).")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --out, exactly.")
@click.option("--overwrite", is_flag=True, help="Delete an existing run in --out and start over.")
@_options
@library_errors
def train(tasks_dir, out, config_file, resume, overwrite, **options):
    """Train a policy with GRPO on RPT tasks (the prefix-matching reward).

    Defaults are the paper's recipe (Table 5). On a CPU, use a small batch, the continuation
    format and a few new tokens.

    \b
    Example (CPU, embedded model):
      rpt train out/tasks --out out/run --prompt-template continuation --max-new-tokens 1 \\
          --batch-size 16 --group-size 8 --lr 1e-5 --steps 20 --max-prompt-tokens 256
    Example (paper recipe):
      rpt train out/tasks --out out/run --config configs/paper.yaml
    """
    import yaml

    from rpttrain.config import config_from_dict
    from rpttrain.train import run_train

    data = {}
    if config_file:
        with open(config_file) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise click.UsageError(f"{config_file}: expected a mapping of option: value")
        data = {k.replace("-", "_"): v for k, v in data.items()}
    data.update({k: v for k, v in options.items() if v is not None})
    data.update(tasks_dir=tasks_dir, out=out)
    summary = run_train(config_from_dict(data), resume=resume, overwrite=overwrite)
    t = summary["totals"]
    why = {"signal": " (stopped by a signal; continue with --resume)", "compute_budget": " (compute budget reached)"}.get(summary["stopped_by"] or "", "")
    click.echo(f"train: {summary['steps']} steps{why}, {t['samples']:,} samples, {t['flops']:.3g} FLOPs -> {out}")
