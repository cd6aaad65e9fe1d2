#!/usr/bin/env bash
# One sitting on one H100 / H200: the PyTorch anchor and this project's benchmark side by side, and the
# demo's GPU variant trained in the gaps and scored (launch/gpu_sitting.py says what runs, in what order).
#
#   launch/bench_gpu.sh OUTDIR [gpu_sitting.py flags, e.g. --budget 560 --no_demo]
#
# Environment:
#   WHEELS   optional folder of wheels for an offline machine, installed with --target $SITE (default
#            /tmp/site). What a GPU image may lack: ml_collections, grain, array_record, portpicker,
#            tensorboardX for this project; diffusers and importlib_metadata for the anchor. Fetch them where
#            pip works, for the machine's Python (3.12 here):
#              python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels \
#                ml_collections==1.1.0 grain==0.2.18 array_record==0.8.3 portpicker tensorboardX==2.6.5 \
#                diffusers==0.42.1 importlib_metadata
#            On a machine with internet, `pip install -e . diffusers` does instead.
#   ANCHOR   folder of torch_anchor.py and ref_ddit.py (default ../shared/bench)
#   PYTHON   interpreter holding torch and jax[cuda] (default python3)
# Output: OUTDIR/summary.md (side by side with ratios and targets, the demo's scores, top ops per trace),
# OUTDIR/anchor.jsonl and jax.jsonl (one JSON line per measurement), every log, the traces, the demo's workdir.
set -euo pipefail
out=${1:?usage: launch/bench_gpu.sh OUTDIR [gpu_sitting.py flags]}
shift
py=${PYTHON:-python3}
if [[ -n "${WHEELS:-}" ]]; then
  site=${SITE:-/tmp/site}
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU, as the anchor
exec "$py" "$(dirname "$0")/gpu_sitting.py" --out "$out" --anchor "${ANCHOR:-../shared/bench}" "$@"
