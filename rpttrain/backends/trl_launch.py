"""Several processes for `rpt train --backend trl`: the accelerate config (DDP, FSDP2, ZeRO-3)
and the launch script, RUN/accelerate.yaml and RUN/launch-trl.sh (paths quoted). The script runs
`python -m rpttrain.backends.trl RUN` in every process, through `accelerate launch`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from rptdata.io import write_text_atomic
from rpttrain.backends import BackendOptionError

SHARDINGS = ("ddp", "fsdp", "zero3")


def accelerate_config(
    sharding: str, gpus_per_node: int, nodes: int, mixed_precision: str = "bf16", cpu: bool = False
) -> dict:
    """An accelerate config: DDP, FSDP2 (full state dict, so checkpoints stay HF folders), or
    DeepSpeed ZeRO-3 (needs `pip install deepspeed`).

    `cpu`: DDP over gloo on a CPU. It is the MULTI_GPU launch on purpose: accelerate 1.15 runs
    `--cpu` / use_cpu configs through its single-process launcher (one process, whatever
    num_processes says), while the MULTI_GPU launch starts torchrun's processes, and the trainer's
    use_cpu=True then joins them in a gloo group (accelerate's MULTI_CPU).

    >>> accelerate_config("fsdp", 8, 2)["fsdp_config"]["fsdp_state_dict_type"]
    'FULL_STATE_DICT'
    >>> accelerate_config("ddp", 2, 1, "no", cpu=True)["distributed_type"]
    'MULTI_GPU'
    """
    if sharding not in SHARDINGS:
        raise BackendOptionError(f"--sharding must be one of {', '.join(SHARDINGS)}, not {sharding!r}")
    if cpu and sharding != "ddp":
        raise BackendOptionError("--sharding fsdp/zero3 needs GPUs; on a CPU only ddp (gloo) runs")
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": mixed_precision,
        "num_machines": nodes,
        "num_processes": gpus_per_node * nodes,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "distributed_type": "MULTI_GPU",
    }
    if sharding == "fsdp":
        out["distributed_type"] = "FSDP"
        out["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_activation_checkpointing": False,
        }
    elif sharding == "zero3":
        out["distributed_type"] = "DEEPSPEED"
        out["deepspeed_config"] = {
            "deepspeed_multinode_launcher": "standard",
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": True,
            "zero3_save_16bit_model": True,
            "zero_stage": 3,
        }
    return out


def launch_command(
    run: Path, sharding: str, gpus_per_node: int, nodes: int, mixed_precision: str, cpu: bool, resume: bool
) -> list[str]:
    """Write RUN/accelerate.yaml and RUN/launch-trl.sh; return the command that runs it.

    Several nodes: run the script on each with MACHINE_RANK and MAIN_PROCESS_IP set.
    """
    import yaml

    cfg = run / "accelerate.yaml"
    write_text_atomic(
        cfg, yaml.safe_dump(accelerate_config(sharding, gpus_per_node, nodes, mixed_precision, cpu), sort_keys=False)
    )
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        "# written by `rpt train --backend trl`; run it on every node",
        "set -euo pipefail",
        f"exec {q(sys.executable)} -m accelerate.commands.launch --config_file {q(str(cfg.resolve()))} \\",
    ]
    if nodes > 1:
        lines.append(
            '    --machine_rank "${MACHINE_RANK:?set MACHINE_RANK (0 on the main node)}" '
            '--main_process_ip "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP}" --main_process_port "${MAIN_PROCESS_PORT:-29500}" \\'
        )
    lines.append(f"    -m rpttrain.backends.trl {q(str(run.resolve()))}" + (" --resume" if resume else ""))
    script = run / "launch-trl.sh"
    write_text_atomic(script, "\n".join(lines) + "\n")
    script.chmod(0o755)
    return ["bash", str(script)]
