"""Shared pieces of the commands: error translation and option sets."""

from __future__ import annotations

import functools

import click

from rptdata.errors import RptError


def library_errors(fn):
    """Turn the library's expected failures (and bad option combinations) into clean messages."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RptError as e:
            raise click.ClickException(str(e)) from e
        except ValueError as e:  # config __post_init__ checks explain the broken invariant
            raise click.UsageError(str(e)) from e

    return wrapper


def model_help(what: str) -> str:
    return (
        f"{what}: a hub id, a local HF folder, a local .gguf file, or the alias smollm2-135m "
        "(the embedded SmolLM2-135M-Instruct; works offline)."
    )


# ---------------------------------------------------------------------------------------------
# option sets shared by the commands (same names, defaults and meaning everywhere)

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def options(*decorators):
    """Several click options as one decorator, listed in --help in the order given."""

    def apply(fn):
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn

    return apply


overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="Replace what an earlier run left in the output directory (only this command's own files are removed).",
)
no_progress_option = click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
trust_remote_code_option = click.option(
    "--trust-remote-code", is_flag=True,
    help="Allow the model's (or tokenizer's) custom code from its repository (off by default).",
)


def model_runtime_options(engine_help: str):
    """--engine (auto/hf/vllm), --dtype and --device; `engine_help` says what the engine runs."""
    from rptdata.engine_choice import ENGINE_CHOICES

    return options(
        click.option("--engine", default="auto", show_default=True, type=click.Choice(ENGINE_CHOICES), help=engine_help),
        click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES),
                     help="Model dtype (auto: bfloat16 on a GPU, float32 on CPU)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    )
