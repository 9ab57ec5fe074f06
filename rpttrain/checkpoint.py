"""Training checkpoints: HF-format model + optimizer/scheduler/RNG/data cursor, written atomically.

    RUN/checkpoints/step-000020/
        model.safetensors, config.json, tokenizer files   (loadable by transformers and vLLM), in the
                             run's compute dtype (bf16 on GPU)
        master.safetensors   the float32 master weights, when they differ from the HF folder's dtype
                             (mixed precision): what --resume continues from, so it stays exact
        ema.safetensors      an rlp run's EMA copy of the policy (the objective's own state,
                             `Objective.save_state`), float32
        trainer_state.pt     optimizer + scheduler state dicts (loaded with weights_only=True)
        rng.pt               python / numpy / torch (+cuda) RNG states
        state.json           step, data cursor, cumulative counters (tokens, FLOPs), config fingerprint,
                             and "files": {name: {bytes, sha256}} of every other file, checked on --resume

A checkpoint is written into `step-N.tmp-<pid>/` and renamed when complete, so a run killed in the
middle of a write resumes from the previous complete checkpoint; temporary folders are ignored and
cleaned up. Only the newest `keep` checkpoints are kept. A checkpoint whose files no longer match
state.json's record (truncated, altered, missing) is refused by `verify_checkpoint` with DamagedFile.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rptdata import faults
from rptdata.errors import DamagedFile
from rptdata.io import atomic_folder, digest_problem, file_digest, read_json, write_json_atomic, write_text_atomic

CHECKPOINTS = "checkpoints"
MASTER_WEIGHTS = "master.safetensors"
STATE_FILE = "state.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its state.json is in place)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and "." not in p.name]
    return sorted((p for p in done if (p / "state.json").exists()), key=lambda p: p.name)


def checkpoint_origin(model: str) -> dict | None:
    """What a `--model` that is a checkpoint of an earlier `rpt train` run (RUN/checkpoints/step-N)
    holds: that run, its step, objective, tasks and training FLOPs; None for any other model. A run
    records it (trained_on.json, `started_from`) and `rpt eval` shows it: "the same RLVR after each
    pretraining-stage run" names which run each one started from."""
    import yaml

    folder = Path(str(model)).expanduser()
    state_path = folder / STATE_FILE
    if not (folder.is_dir() and state_path.is_file() and folder.parent.name == CHECKPOINTS):
        return None
    state = read_json(state_path, f"{folder} is a damaged checkpoint; start from another one")
    run = folder.parent.parent
    config = {}
    if (run / "config.yaml").is_file():
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    return {
        "checkpoint": str(folder.resolve()),
        "run_dir": str(run.resolve()),
        "step": state.get("step"),
        "flops": (state.get("totals") or {}).get("flops"),
        "objective": config.get("objective"),
        "reward": config.get("reward"),
        "model": config.get("model"),
        "tasks_dir": config.get("tasks_dir"),
    }


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def link_checkpoint(run_dir: Path, folder: Path, step: int, state: dict) -> Path:
    """Make TRL's checkpoint-N readable as an rpt checkpoint: state.json in it, and
    RUN/checkpoints/step-N linking to it (links to checkpoints TRL has rotated away are removed)."""
    write_json_atomic(Path(folder) / STATE_FILE, {"step": step, "backend": "trl", **state})
    link = checkpoint_dir(run_dir, step)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(folder, link.parent), target_is_directory=True)
    for stale in link.parent.iterdir():
        if stale.is_symlink() and not stale.exists():
            stale.unlink()
    return link


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: dict,
    keep: int = 2,
    hf_dtype: torch.dtype | None = None,
    objective_state: Callable[[Path], None] | None = None,
) -> Path:
    """Write step-N atomically. `hf_dtype`: the dtype of the HF folder (default: the parameters');
    when it differs from the parameters', the exact parameters also go to master.safetensors.
    `objective_state(folder)` writes the objective's own files there (recorded like every file)."""
    final = checkpoint_dir(run_dir, step)
    with atomic_folder(final, fault="checkpoint-rename") as tmp:
        save_hf_model(model, tmp, hf_dtype)
        faults.hit("checkpoint-weights", tmp)
        if hf_dtype is not None and hf_dtype != next(model.parameters()).dtype:
            from safetensors.torch import save_model

            save_model(model, str(tmp / MASTER_WEIGHTS))  # handles tied (shared) tensors
        tokenizer.save_pretrained(tmp)
        if objective_state is not None:
            objective_state(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
        # RNG states hold numpy/python objects; pickle them apart from the tensors
        torch.save(_rng_to_tensors(rng_state()), tmp / "rng.pt")
        write_json_atomic(tmp / STATE_FILE, {"step": step, **state, "files": _digests(tmp)})
    faults.hit("checkpoint-prune", final)
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (all when keep <= 0) and drop half-written folders. Called
    after every save and when a run ends: a run killed between its last save and this prune, then
    resumed with nothing left to train, would otherwise keep one checkpoint too many."""
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / CHECKPOINTS).glob("step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _digests(folder: Path) -> dict[str, dict]:
    """{name: {bytes, sha256}} of the folder's files, hashed in parallel threads (hashlib releases
    the GIL), so a large checkpoint costs about one read of its biggest file."""
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.name != STATE_FILE)
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(Path(folder) / n), names)))


def verify_checkpoint(ckpt: Path, previous: Path | None = None) -> dict:
    """state.json of `ckpt` after checking every file it records (size, sha256); DamagedFile
    naming the first damaged file and the way out. Checkpoints older than the record pass."""
    ckpt = Path(ckpt)
    way_out = (
        f"remove {ckpt} to resume from {previous.name}"
        if previous is not None
        else f"remove {ckpt} and rerun, or start over with --overwrite"
    )
    state = read_json(ckpt / STATE_FILE, way_out)
    for name, record in (state.get("files") or {}).items():
        problem = digest_problem(ckpt / name, record)
        if problem:
            raise DamagedFile(f"{ckpt / name}: damaged checkpoint file: {problem}; {way_out}")
    return state


def save_hf_model(model, folder: Path, dtype: torch.dtype | None = None) -> None:
    """save_pretrained, with the weights (and config.json's dtype) cast to `dtype` when given.

    Tied weights stay one tensor after the cast (keyed by storage), so transformers still saves
    them once; the cast copy lives on the CPU, one tensor at a time of the model's own size."""
    have = next(model.parameters()).dtype
    if dtype is None or dtype == have:
        model.save_pretrained(folder, safe_serialization=True)
        return
    cast: dict[tuple, torch.Tensor] = {}
    state = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in cast:
            cast[key] = t.detach().to("cpu", dtype=dtype if t.is_floating_point() else t.dtype)
        state[name] = cast[key]
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = name
    write_text_atomic(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_master_weights(ckpt: Path, model) -> bool:
    """Overwrite `model`'s parameters with the checkpoint's exact master weights, if it has them
    (mixed precision); returns whether it did. Without them the HF folder is the master."""
    path = Path(ckpt) / MASTER_WEIGHTS
    if not path.exists():
        return False
    from safetensors.torch import load_model

    load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
    return True


def load_trainer_state(ckpt: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG; return state.json."""
    blob = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(_rng_from_tensors(torch.load(ckpt / "rng.pt", weights_only=True)))
    return json.loads((ckpt / "state.json").read_text())


def _rng_to_tensors(state: dict) -> dict:
    """RNG states as tensors and plain lists, so they load with weights_only=True."""
    version, keys, gauss = state["python"]
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    out = {
        "python_version": version,
        "python_keys": torch.tensor(keys, dtype=torch.int64),
        "python_gauss": gauss if gauss is not None else float("nan"),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": pos,
        "numpy_has_gauss": has_gauss,
        "numpy_cached": cached,
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def _rng_from_tensors(blob: dict) -> dict:
    gauss = blob["python_gauss"]
    state = {
        "python": (
            blob["python_version"],
            tuple(int(x) for x in blob["python_keys"].tolist()),
            None if gauss != gauss else gauss,
        ),
        "numpy": (
            "MT19937",
            blob["numpy_keys"].numpy().astype(np.uint32),
            blob["numpy_pos"],
            blob["numpy_has_gauss"],
            blob["numpy_cached"],
        ),
        "torch": blob["torch"],
    }
    if "cuda" in blob:
        state["cuda"] = blob["cuda"]
    return state
