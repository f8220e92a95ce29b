#!/usr/bin/env bash
# benchmarks/gpu.py on a GPU machine that has torch but no network: installs fmkit from this
# checkout without fetching anything (and any wheels in $FMKIT_WHEELS, e.g. webdataset,
# torch-fidelity and scipy (the coupling stage) where they are missing), then runs every GPU
# path once.
#   bash benchmarks/gpu.sh [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${FMKIT_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fmkit-site "$FMKIT_WHEELS"/*.whl
    export PYTHONPATH="/tmp/fmkit-site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py "$@"
