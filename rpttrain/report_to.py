"""`rpt train --report-to tensorboard,wandb,none`: where a run's metrics go besides metrics.jsonl.

    names = parse_report_to("tensorboard,wandb")     # ("tensorboard", "wandb"); bad names raise ValueError
    loggers = open_loggers(names, run_dir, config)    # RunLoggers; wandb missing -> a clear RptError
    loggers.log(metrics, step)                        # + samples.jsonl's new lines as the `samples` table
    loggers.log_table("samples", columns, rows, step)  # any table: a wandb.Table (TensorBoard has none)
    loggers.close()

- tensorboard (the default): RUN/tb/, when tensorboard is installed (skipped quietly otherwise, as
  before this option existed).
- wandb (`pip install 'rpt[wandb]'`): one W&B run per run directory, files under RUN/wandb/. It
  logs the keys of metrics.jsonl at their step, the resolved config (config.yaml's contents),
  and a table `samples` (step, context, completion, prediction, target, reward, band) of the
  lines samples.jsonl gains, at the steps it gains them (every --sample-every steps), as TRL logs
  its completions table. The run id is kept in RUN/wandb/rpt-run-id, so `--resume` continues the
  same W&B run. W&B's own variables apply: WANDB_MODE=offline writes a run that `wandb sync`
  uploads later, WANDB_PROJECT (default `rpt`), WANDB_ENTITY, WANDB_DIR.
- none: metrics.jsonl only.

`--backend trl` passes the names to TRL's `report_to` (`trl_report_to`); `--backend verl` maps them
onto `trainer.logger` (`verl_loggers`).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rptdata.errors import BadOption, RptError

REPORTERS = ("tensorboard", "wandb", "none")
WANDB_DIR = "wandb"  # under the run directory
WANDB_EXTRA = "pip install 'rpt[wandb]'  (pins wandb==0.31.0)"
# the wandb table of samples.jsonl's lines (band: None for answer tasks and older tasks)
SAMPLE_COLUMNS = ("step", "context", "completion", "prediction", "target", "reward", "band")


def parse_report_to(value: str) -> tuple[str, ...]:
    """The reporters named in a comma-separated list; `none` only alone.

    >>> parse_report_to("tensorboard, wandb"), parse_report_to("none")
    (('tensorboard', 'wandb'), ())
    """
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    bad = [n for n in names if n not in REPORTERS]
    if bad or not names:
        raise BadOption(
            f"report_to: {', '.join(bad) or repr(value)} is not one of {', '.join(REPORTERS)} "
            "(a comma-separated list, e.g. tensorboard,wandb)"
        )
    if "none" in names and len(names) > 1:
        raise BadOption(f"report_to: 'none' cannot be combined with other reporters ({value!r})")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def require_wandb():
    """The wandb module, or an RptError naming the extra that installs it."""
    try:
        import wandb
    except ImportError:
        raise RptError(f"--report-to wandb needs the wandb package, which is not installed: {WANDB_EXTRA}") from None
    return wandb


def check_reporters(value: str) -> None:
    """Raise before a run starts when a named reporter's package is missing (wandb)."""
    if "wandb" in parse_report_to(value):
        require_wandb()


def tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def trl_report_to(value: str) -> list[str] | str:
    """TRL's `report_to` for `--report-to`: the same names; tensorboard left out when it is not
    installed (as the rpt backend does); "none" when nothing is left."""
    names = [n for n in parse_report_to(value) if n != "tensorboard" or tensorboard_installed()]
    if "wandb" in names:
        require_wandb()
    return names or "none"


def verl_loggers(value: str) -> list[str]:
    """verl's `trainer.logger`: console and file (rpt reads verl's file logs), plus each reporter."""
    return ["console", "file", *parse_report_to(value)]


class RunLoggers:
    """The writers of one `rpt train` run: TensorBoard's SummaryWriter and/or a wandb run."""

    def __init__(self, names: tuple[str, ...], run_dir: Path, config: dict):
        self.run_dir = Path(run_dir)
        self.tb = _tensorboard(self.run_dir / "tb") if "tensorboard" in names else None
        self.wandb_run = _wandb_run(self.run_dir, config) if "wandb" in names else None
        samples = self.run_dir / "samples.jsonl"
        self.samples_read = samples.stat().st_size if samples.exists() else 0  # lines logged before this start

    def log(self, metrics: dict, step: int) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k != "step" and v is not None}, step=step)
            self._log_samples(step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence], step: int) -> None:
        """A table of `rows` (one value per column) at `step`, on the reporters that take tables:
        wandb (a wandb.Table under `key`); TensorBoard has none."""
        if self.wandb_run is None or not rows:
            return
        import wandb

        self.wandb_run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

    def _log_samples(self, step: int) -> None:
        """samples.jsonl's new complete lines as the `samples` table: the objective appends them
        every --sample-every steps, just before this step's metrics are logged."""
        path = self.run_dir / "samples.jsonl"
        if not path.exists() or path.stat().st_size <= self.samples_read:
            return
        with path.open("rb") as f:
            f.seek(self.samples_read)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.samples_read += len(complete)
        rows = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
        self.log_table("samples", SAMPLE_COLUMNS, [[r.get(c) for c in SAMPLE_COLUMNS] for r in rows], step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def open_loggers(value: str, run_dir: Path, config: dict) -> RunLoggers:
    return RunLoggers(parse_report_to(value), run_dir, config)


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def _wandb_run(run_dir: Path, config: dict) -> Any:
    """A wandb run for this run directory: the id in RUN/wandb/rpt-run-id (new on a fresh run)."""
    wandb = require_wandb()
    folder = run_dir / WANDB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "rpt-run-id"
    from rptdata.io import write_text_atomic

    run_id = id_file.read_text().strip() if id_file.exists() else None
    if not run_id:
        run_id = secrets.token_hex(4)
        write_text_atomic(id_file, run_id + "\n")
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "rpt"),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        dir=os.environ.get("WANDB_DIR", str(run_dir)),
        config=config,
    )
