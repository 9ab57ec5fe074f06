"""Shared pieces of the commands: error translation and option sets."""

from __future__ import annotations

import errno
import functools

import click

from rptdata.errors import BadOption, RptError


def library_errors(fn):
    """Turn the library's expected failures into clean messages, by their type: a usage error
    (exit 2, with the usage line) for BadOption, an option that cannot work; an error (exit 1)
    naming the file for any other RptError, for a file that cannot be read or written, and for a
    ValueError from the data (pyarrow's ArrowInvalid, a JSON decode error)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadOption as e:
            raise click.UsageError(str(e)) from e
        except RptError as e:
            raise click.ClickException(str(e)) from e
        except OSError as e:  # disk full, permissions, a vanished file: the system's message and the file
            raise click.ClickException(os_error_message(e)) from e
        except ValueError as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from e

    return wrapper


def os_error_message(e: OSError) -> str:
    """'PATH: reason' for an OSError that names a file, else its own text.

    >>> import errno
    >>> os_error_message(OSError(errno.ENOSPC, "No space left on device", "out/x.parquet"))
    'out/x.parquet: No space left on device (nothing half-written was kept; free space and rerun to resume)'
    """
    if e.filename is None:
        return str(e)
    hint = " (nothing half-written was kept; free space and rerun to resume)" if e.errno == errno.ENOSPC else ""
    return f"{e.filename}: {e.strerror or e}{hint}"


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
    "--overwrite",
    is_flag=True,
    help="Replace what an earlier run left in the output directory (only this command's own files are removed).",
)


def _quiet(ctx, param, value):
    if value:
        from rptdata.models import hide_library_progress

        hide_library_progress()
    return value


no_progress_option = click.option(
    "--no-progress",
    is_flag=True,
    callback=_quiet,
    help="Hide the progress bars (rpt's and the libraries': transformers' weight loading and saving).",
)
trust_remote_code_option = click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow the model's (or tokenizer's) custom code from its repository (off by default).",
)


executor_options = options(
    click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="Run the shards here (local), or as tasks/actors on a Ray cluster with retries (ray; the `ray` extra).",
    ),
    click.option(
        "--ray-address",
        default=None,
        help="With --executor ray: the cluster to join [default: RAY_ADDRESS, else a local cluster started for the run].",
    ),
)


def model_runtime_options(engine_help: str):
    """--engine (auto/hf/vllm), --dtype and --device; `engine_help` says what the engine runs."""
    from rptdata.engine_choice import ENGINE_CHOICES

    return options(
        click.option(
            "--engine", default="auto", show_default=True, type=click.Choice(ENGINE_CHOICES), help=engine_help
        ),
        click.option(
            "--dtype",
            default="auto",
            show_default=True,
            type=click.Choice(DTYPE_CHOICES),
            help="Model dtype (auto: bfloat16 on a GPU, float32 on CPU).",
        ),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    )
