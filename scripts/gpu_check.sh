#!/usr/bin/env bash
# One prepared run of the GPU-only training paths (bf16 LoRA steps, SDPA / FlashAttention-2
# selection, packed-sequence isolation, the project's recipe through `python -m
# workers.training.run`, QLoRA where bitsandbytes is present).
# Usage: scripts/gpu_check.sh [--device cpu --preset tiny ...] [--only qlora,...]; see
# scripts/gpu_check.py --help.
# With $OUT set, the results are also written to $OUT/gpu_check.json.
# Wheels for a machine without network: `scripts/gpu_check.py --fetch-wheels .gpu-wheels` on a
# development machine, then carry .gpu-wheels along with the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
# $GPU_CHECK_PYTHON, else the project's venv where there is one (development machines), else the
# system python.
python=${GPU_CHECK_PYTHON:-python3}
if [[ -z ${GPU_CHECK_PYTHON:-} && -x .venv/bin/python ]]; then
    python=.venv/bin/python
fi
# Wheels brought along (trl, datasets and their dependencies; bitsandbytes): pip's resolver,
# in a dry run against this python's own packages, picks the carried wheels that this machine
# lacks or has at a version that does not fit; those are installed into a scratch folder for
# this run only. Should the dry run fail, every carried wheel is installed and the report says so.
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    # The folder's name must contain "site-packages": dill (under datasets' fingerprinting)
    # pickles by value, and fails on, any module whose file lies elsewhere.
    extra="$(mktemp -d)/site-packages"
    mkdir "$extra"
    # Every carried project by name, and the pins of requirements.txt (--fetch-wheels writes it).
    wanted=$(for w in .gpu-wheels/*.whl; do basename "$w" | cut -d- -f1; done | sort -u)
    pins=()
    if [[ -f .gpu-wheels/requirements.txt ]]; then
        pins=(-r .gpu-wheels/requirements.txt)
    fi
    # shellcheck disable=SC2086 # one name a word
    if "$python" -m pip install --quiet --dry-run --no-index --find-links .gpu-wheels \
        --report "$extra/.plan.json" "${pins[@]}" $wanted 2>"$extra/.plan.err"; then
        mapfile -t picked < <("$python" -c '
import json, sys, urllib.parse, urllib.request
for item in json.load(open(sys.argv[1]))["install"]:
    print(urllib.request.url2pathname(urllib.parse.urlparse(item["download_info"]["url"]).path))
' "$extra/.plan.json")
    else
        echo "pip's dry run over .gpu-wheels failed; installing every carried wheel:"
        sed 's/^/   | /' "$extra/.plan.err" | tail -8
        picked=(.gpu-wheels/*.whl)
    fi
    if ((${#picked[@]})); then
        "$python" -m pip install --quiet --no-deps --no-index --target "$extra" "${picked[@]}"
        export PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}"
    fi
    carried=""
    for w in "${picked[@]}"; do
        carried+="$(basename "$w" | cut -d- -f1-2 | sed 's/-/==/') "
    done
    export GPU_CHECK_CARRIED="${carried% }"
fi
exec "$python" scripts/gpu_check.py "$@"
