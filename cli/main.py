"""The `rpt` click group. Commands live one per file in `cli/` and are imported lazily, so
`rpt --help` stays fast and a command's heavy imports (torch, vLLM) load only when it runs."""

from __future__ import annotations

import importlib
import importlib.util
import logging

import click

# command name -> "module:attribute"
COMMANDS = {
    "prepare": "cli.prepare:prepare",
    "score-entropy": "cli.score_entropy:score_entropy",
    "query": "cli.query:query",
    "stats": "cli.stats:stats",
    "make-tasks": "cli.make_tasks:make_tasks",
    "answer-tasks": "cli.answer_tasks:answer_tasks",
    "export-tasks": "cli.export_tasks:export_tasks",
    "probe": "cli.probe:probe",
    "train": "cli.train:train",
    "plot": "cli.plot:plot",
    "samples": "cli.samples:samples",
    "eval": "cli.eval:eval_cmd",
    "verify": "cli.verify:verify",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if importlib.util.find_spec(COMMANDS[name].split(":")[0])]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not importlib.util.find_spec(COMMANDS[name].split(":")[0]):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log more (INFO level) to stderr.")
@click.version_option(package_name="rpt")
def cli(verbose: bool) -> None:
    """rpt: Reinforcement Pre-Training (arXiv 2506.08007) as a staged pipeline.

    \b
    prepare -> score-entropy -> make-tasks -> train -> eval
    Each stage reads the previous stage's directory and writes its own, with manifest.json last.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
