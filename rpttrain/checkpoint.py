"""Training checkpoints: HF-format model + optimizer/scheduler/RNG/data cursor, written atomically.

    RUN/checkpoints/step-000020/
        model.safetensors, config.json, tokenizer files   (loadable by transformers and vLLM)
        trainer_state.pt     optimizer + scheduler state dicts (loaded with weights_only=True)
        rng.pt               python / numpy / torch (+cuda) RNG states
        state.json           step, data cursor, cumulative counters (tokens, FLOPs), config fingerprint

A checkpoint is written into `step-N.tmp-<pid>/` and renamed when complete, so a run killed in the
middle of a write resumes from the previous complete checkpoint; temporary folders are ignored and
cleaned up. Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

CHECKPOINTS = "checkpoints"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its state.json is in place)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and "." not in p.name]
    return sorted((p for p in done if (p / "state.json").exists()), key=lambda p: p.name)


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


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int = 2) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
    # RNG states hold numpy/python objects; pickle them apart from the tensors
    torch.save(_rng_to_tensors(rng_state()), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / CHECKPOINTS).glob("step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


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
        "python": (blob["python_version"], tuple(int(x) for x in blob["python_keys"].tolist()), None if gauss != gauss else gauss),
        "numpy": ("MT19937", blob["numpy_keys"].numpy().astype(np.uint32), blob["numpy_pos"], blob["numpy_has_gauss"], blob["numpy_cached"]),
        "torch": blob["torch"],
    }
    if "cuda" in blob:
        state["cuda"] = blob["cuda"]
    return state
