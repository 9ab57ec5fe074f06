"""Exceptions the library raises; `cli/` turns them into clear messages and exit codes."""


class RptError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class ModelResolutionError(RptError):
    """A --model/--tokenizer value could not be resolved or loaded."""


class TokenizerNotSupported(RptError):
    """The tokenizer cannot give exact byte spans (not byte-level, or it rewrites text)."""


class BadInput(RptError):
    """A corpus file or record is malformed; the message names the file and line."""


class ManifestMismatch(RptError):
    """An output directory holds a run with other inputs/options, or upstream does not match."""


class MissingUpstream(RptError):
    """The previous stage's output is absent or incomplete."""


class MissingDependency(RptError):
    """An optional package the chosen option needs (vllm) is not installed; the message says how to get it."""


class DamagedFile(RptError):
    """A file a stage wrote is truncated, altered or unreadable; the message names the file, what is
    wrong with it, and the command that rebuilds it."""


class BadOption(RptError, ValueError):
    """An option (or config field) that cannot work: the command line's fault, not the data's.
    The CLI answers it as a usage error (exit 2, with the usage line). It is a ValueError too, so
    code that validates configs keeps catching what it caught."""


class BackendOptionError(RptError):
    """A training option (or launch option) the chosen `rpt train --backend` cannot honour; raised
    by the dispatcher (`rpttrain.backends`, which re-exports it), the backends and the preflight."""
