#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
.venv/bin/ruff check vllm_medusa tests benchmarks
.venv/bin/ruff format --check vllm_medusa tests benchmarks
exec .venv/bin/python -m pytest -q -m "slow or not slow" --durations=15 "$@"
