"""Shared pieces of the commands: error translation and option sets."""

from __future__ import annotations

import errno
import functools
from dataclasses import fields

import click

from rptdata.errors import BadOption, RptError
from rptdata.models import model_help  # noqa: F401  (the commands' --model help; the library owns the specs)


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


dtype_option = click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(DTYPE_CHOICES),
    help="Model dtype (auto: bfloat16 on a GPU, float32 on CPU).",
)
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")


def model_runtime_options(engine_help: str):
    """--engine (auto/hf/vllm), --dtype and --device; `engine_help` says what the engine runs."""
    from rptdata.engine_choice import ENGINE_CHOICES

    return options(
        click.option(
            "--engine", default="auto", show_default=True, type=click.Choice(ENGINE_CHOICES), help=engine_help
        ),
        dtype_option,
        device_option,
    )


# ---------------------------------------------------------------------------------------------
# options generated from a config dataclass (its fields' `rpttrain.config.opt` metadata)

# the options every command shares, by the config field they set (same name, text and default everywhere)
SHARED_OPTIONS = {
    "overwrite": overwrite_option,
    "dtype": dtype_option,
    "device": device_option,
    "trust_remote_code": trust_remote_code_option,
    "progress": no_progress_option,
}


def field_type(f) -> type:
    """The Python type of a config field's option values, from its annotation."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    return float if "float" in kind else int if "int" in kind else str


def config_options(config_cls, skip: tuple[str, ...] = ()):
    """One click option per field of `config_cls` (but `skip`), listed in `--help` in field order:
    the help text, the option's name, choices, path checks and one-text form come from the field's
    metadata (`rpttrain.config.opt`); tuple fields repeat; bool fields are flags; the default is
    shown unless it is None or empty; a field named in SHARED_OPTIONS takes that option."""

    def apply(fn):
        for f in reversed([f for f in fields(config_cls) if f.name not in skip]):
            fn = (SHARED_OPTIONS.get(f.name) or _field_option(f))(fn)
        return fn

    return apply


def _field_option(f):
    meta = f.metadata
    decls = [meta.get("flag") or "--" + f.name.replace("_", "-"), *([meta["short"]] if "short" in meta else []), f.name]
    if "bool" in str(f.type):
        return click.option(*decls, is_flag=True, help=meta["help"])
    text = "text" in meta  # one text that the config parses ("0.5,1.0,1.5", "T1,T2")
    default = meta["text"] if text else f.default
    if "choices" in meta:
        kind = click.Choice(meta["choices"])
    elif "path" in meta:
        kind = click.Path(**meta["path"])
    else:
        kind = str if text else field_type(f)
    return click.option(
        *decls,
        type=kind,
        default=default,
        multiple=not text and "tuple" in str(f.type),
        show_default=True if default not in (None, "", ()) else None,
        help=meta["help"],
    )


def config_values(config_cls, params: dict) -> dict:
    """`config_cls`'s keyword arguments from a command's parsed options (by field name; a
    --no-X flag, such as --no-progress, sets X to False)."""
    values = {}
    for f in fields(config_cls):
        if f.name in params:
            values[f.name] = params[f.name]
        elif f"no_{f.name}" in params:
            values[f.name] = not params[f"no_{f.name}"]
    return values
