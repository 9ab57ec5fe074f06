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
