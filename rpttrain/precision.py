"""Training precision: what the forward/backward computes in, and what the optimizer updates.

    p = resolve_precision("auto", "float32", "cuda")   # bf16 compute, fp32 master weights (the default on GPU)
    with p.autocast():
        loss = model(...)                                # matmuls in bf16, reductions in fp32
    loss.backward()                                      # gradients land in the fp32 parameters

Why master weights stay in float32: AdamW's update is about lr per weight (its step is
m / sqrt(v), of order 1). A bfloat16 weight of size 0.05 has a spacing of 2.4e-4, so an update of
1e-6 (the paper's lr) is less than half a step and rounds away: pure-bf16 training at lr 1e-6
leaves >99% of the weights unchanged (tests/test_precision.py measures it on the embedded model).
Mixed precision (torch.autocast over float32 parameters, as accelerate's `mixed_precision="bf16"`
and verl's FSDP `param_dtype=bf16, reduce_dtype=fp32` master copy do) keeps every update.

float16 compute is refused: without loss scaling its gradients underflow, and bfloat16 has the same
speed on every GPU that has float16 tensor cores since Ampere.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from rptdata.errors import BadOption

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
MASTER_DTYPES = ("float32", "bfloat16")
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}

LOST_UPDATES = (
    "pure bfloat16 training (--master-dtype bfloat16): AdamW updates smaller than half a bfloat16 step "
    "(about 1e-4 for a weight of 0.05) are rounded away, so at lr 1e-6 almost no weight changes. Use "
    "--master-dtype float32 (the default) unless you have measured that your run still learns."
)


@dataclass(frozen=True)
class Precision:
    """compute: the dtype of matmuls in forward/backward and rollouts; master: the dtype of the
    parameters, their gradients and the AdamW state (what the checkpoint's master file holds)."""

    compute: torch.dtype
    master: torch.dtype
    device_type: str  # "cpu" | "cuda"

    @property
    def mixed(self) -> bool:
        return self.compute != self.master

    def autocast(self):
        """A context that runs the forward in the compute dtype when it differs from the master's."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def describe(self) -> str:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        if self.mixed:
            return f"{name(self.compute)} compute, {name(self.master)} master weights"
        return f"pure {name(self.compute)}"


def resolve_precision(compute_dtype: str, master_dtype: str, device: str) -> Precision:
    """The precision of a run on `device`; `auto` compute is bfloat16 on CUDA, float32 on CPU.

    >>> resolve_precision("auto", "float32", "cpu").describe()
    'pure float32'
    >>> resolve_precision("bfloat16", "float32", "cpu").describe()
    'bfloat16 compute, float32 master weights'
    >>> resolve_precision("float32", "bfloat16", "cpu")
    Traceback (most recent call last):
    ...
    rptdata.errors.BadOption: master_dtype bfloat16 needs compute_dtype bfloat16: master weights less precise than the compute make no sense
    """
    check_dtypes(compute_dtype, master_dtype)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if device_type == "cuda" else "float32"
    if master_dtype == "bfloat16" and compute_dtype != "bfloat16":
        raise BadOption(
            "master_dtype bfloat16 needs compute_dtype bfloat16: master weights less precise than the compute make no sense"
        )
    p = Precision(_TORCH[compute_dtype], _TORCH[master_dtype], device_type)
    if master_dtype == "bfloat16":
        log.warning(LOST_UPDATES)
    return p


def check_dtypes(compute_dtype: str, master_dtype: str) -> None:
    """Reject names the trainer does not support, saying why (float16 in particular)."""
    if compute_dtype == "float16" or master_dtype == "float16":
        raise BadOption(
            "float16 training is not supported: without loss scaling its gradients underflow; use "
            "--compute-dtype bfloat16 (same speed on Ampere and newer GPUs)"
        )
    if compute_dtype not in COMPUTE_DTYPES:
        raise BadOption(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} (got {compute_dtype!r})")
    if master_dtype not in MASTER_DTYPES:
        raise BadOption(f"master_dtype must be one of {', '.join(MASTER_DTYPES)} (got {master_dtype!r})")


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the spelling transformers, vLLM and our configs use)."""
    return str(dtype).removeprefix("torch.")
