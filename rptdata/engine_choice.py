"""Which backend runs a model, for scoring (`rptdata.scorers`) and for rollouts (`rpttrain.rollout`).

    choose_engine("auto", "cuda")   -> "vllm" when the vllm package is installed, else "hf"
    vllm = import_vllm()            # or MissingDependency with the install advice

"hf" is transformers (any device); "vllm" needs the optional vllm package (CUDA, or vllm-cpu in
its own venv). A missing vLLM raises `MissingDependency` with one install advice wherever it is
found missing: when `--engine vllm` is chosen, or when a vLLM scorer or rollout engine is built.
"""

from __future__ import annotations

import importlib.util

from rptdata.errors import BadOption, MissingDependency

__all__ = ["BACKENDS", "ENGINE_CHOICES", "choose_engine", "import_vllm", "vllm_available"]

BACKENDS = ("hf", "vllm")
ENGINE_CHOICES = ("auto", *BACKENDS)  # the values of every --engine option
VLLM_ADVICE = (
    "on a GPU machine pip install -e '.[vllm]'; on a CPU, build .venv-vllm with bench/setup_vllm_cpu.sh "
    "(make test-vllm); or use --engine hf"
)


def vllm_available() -> bool:
    """True when the vllm package can be imported (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def _missing(reason: str) -> MissingDependency:
    return MissingDependency(f"--engine vllm needs the vllm package ({reason}): {VLLM_ADVICE}")


def choose_engine(name: str, device: str = "auto") -> str:
    """The backend for `--engine name` on `device`: "hf" or "vllm".

    "auto" picks vllm only when it is installed and the device is CUDA ("auto" counts as CUDA
    when torch sees a GPU); "vllm" without the package raises MissingDependency.

    >>> choose_engine("hf", "cuda"), choose_engine("auto", "cpu"), choose_engine("auto", "mps")
    ('hf', 'hf', 'hf')
    >>> choose_engine("fast", "cpu")
    Traceback (most recent call last):
    ...
    rptdata.errors.BadOption: --engine must be one of auto, hf, vllm, not 'fast'
    """
    if name not in ENGINE_CHOICES:
        raise BadOption(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, not {name!r}")
    if name == "vllm" and not vllm_available():
        raise _missing("it is not installed")
    if name != "auto":
        return name
    if not vllm_available() or not device.startswith(("cuda", "auto")):
        return "hf"
    if device == "auto":
        import torch

        return "vllm" if torch.cuda.is_available() else "hf"
    return "vllm"


def import_vllm():
    """The vllm module, or MissingDependency with the install advice (the import error inside)."""
    try:
        import vllm
    except ImportError as e:
        raise _missing(str(e)) from e
    return vllm
