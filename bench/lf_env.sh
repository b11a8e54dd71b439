#!/usr/bin/env bash
# Create (idempotently) the side-by-side LLaMA-Factory venv the training benchmark compares against.
#
#   bench/lf_env.sh [VENV_DIR]        # default: .venv-llamafactory in the repository root
#
# LLaMA-Factory is a peer here, never a dependency: it lives in its own venv (git-ignored by the
# `.venv-*/` rule), and nothing of it is copied into this repository.
#
# Pins: llamafactory 0.9.5 and torch 2.13.0 (the CPU build; any other torch spec pulls a CUDA
# build). torchvision/torchaudio from the registry are CUDA builds that break `import
# transformers`, so they are removed; LLaMA-Factory imports torchaudio only in its audio plugin,
# and an empty stub package of that name lets it import without it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-llamafactory}"
LF_VERSION="0.9.5"
TORCH_VERSION="2.13.0"
MARKER="$VENV/.loraplex-bench-ready"
STAMP="llamafactory==$LF_VERSION torch==$TORCH_VERSION stub-torchaudio=1"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" && -x "$VENV/bin/llamafactory-cli" ]]; then
    exit 0
fi

PYTHON="${PYTHON:-python3}"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "llamafactory==$LF_VERSION" "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$SITE/torchaudio"
cat >"$SITE/torchaudio/__init__.py" <<'EOF'
"""Empty stand-in for torchaudio (loraplex benchmark venv): the registry's build needs CUDA."""
EOF

# Fail here, not in the middle of a benchmark, if the peer does not import.
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c 'import llamafactory, torch, transformers, peft; print("llamafactory", llamafactory.__version__, "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
echo "$STAMP" >"$MARKER"
