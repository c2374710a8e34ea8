#!/usr/bin/env bash
# Create .venv at the repo root with the CPU stack (requirements/cpu.txt), OpenRLHF 0.11.2, flash-attn's
# Python layer, this package (editable), and DeepSpeed's CPU ops pre-built. Idempotent: when nothing it
# depends on changed since the last successful run, it returns at once and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.sepo-setup-done
KEY=$(cat requirements/cpu.txt setup.py tools/setup_venv.sh | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat "$STAMP")" == "$KEY" ]]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
start=$(date +%s)
PY=$(command -v python3.11 || command -v python3)
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "[setup] installing the CPU stack into $VENV"
"${PIP[@]}" install -r requirements/cpu.txt
# OpenRLHF pins CUDA-only packages (vllm extras aside: ray, bitsandbytes, flash-attn, ...) that the CPU
# path never imports; install it without its dependency list, next to the stack above.
"${PIP[@]}" install --no-deps "openrlhf==0.11.2"
# OpenRLHF imports flash_attn.bert_padding at import time. Without CUDA only flash-attn's pure-Python
# layer can be built; openrlhf_sepo registers a placeholder for its kernel module (openrlhf_sepo/_flash_attn.py).
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
  "${PIP[@]}" install --no-build-isolation --no-deps "flash-attn==2.8.3"
"${PIP[@]}" install --no-build-isolation --no-deps -e .
# DeepSpeed JIT-compiles its shared-memory comm op and CPU fused Adam with ninja the first time a run
# needs them (about a minute on 2 cores, which looks like a hang). Build them once here instead.
echo "[setup] pre-building DeepSpeed's CPU ops (shared-memory comm, fused Adam)"
DS_ACCELERATOR=cpu "$VENV/bin/python" - <<'PY'
from deepspeed.accelerator import get_accelerator
for name in ("ShareMemCommBuilder", "FusedAdamBuilder"):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)
PY
echo "$KEY" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s"
