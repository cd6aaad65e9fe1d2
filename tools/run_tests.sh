#!/usr/bin/env bash
# The test command (README and CI): pytest on a CPU mesh of 8 host devices, 2 worker processes
# (PYTEST_WORKERS=0 runs in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
exec python3 -m pytest -q -n "${PYTEST_WORKERS:-2}" -p no:benchmark "$@" tests
