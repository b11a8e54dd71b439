#!/usr/bin/env bash
# One prepared run of the GPU-only training paths (bf16 LoRA steps, SDPA / FlashAttention-2
# selection, packed-sequence isolation, QLoRA where bitsandbytes is present).
# Usage: scripts/gpu_check.sh [--device cpu --preset tiny ...]; see scripts/gpu_check.py --help.
# With $OUT set, the results are also written to $OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
# The project's venv where there is one (development machines); the system python elsewhere.
python=python3
if [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
fi
# Wheels brought along for a GPU machine without network (e.g. bitsandbytes for the QLoRA
# check): installed into a scratch folder for this run only.
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    extra=$(mktemp -d)
    "$python" -m pip install --quiet --no-deps --no-index --target "$extra" .gpu-wheels/*.whl
    export PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$python" scripts/gpu_check.py "$@"
