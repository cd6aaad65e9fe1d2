#!/usr/bin/env bash
# D-DiT (JAX) against the PyTorch anchor on one H100 / H200, same machine, same sitting (issue 7).
#
#   launch/bench_gpu.sh [OUTDIR]        # from the repository root; OUTDIR defaults to bench_out
#
# Environment:
#   ANCHOR   path of torch_anchor.py (default ../shared/bench/torch_anchor.py)
#   WHEELS   optional folder of wheels for an offline machine, installed with --target $SITE (default
#            /tmp/site). The JAX side needs what the GPU image may lack: ml_collections, grain,
#            array_record, portpicker; the anchor needs diffusers and importlib_metadata. Fetch them
#            where pip works, for the machine's Python (3.12 here), e.g.
#              python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#                -d wheels ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker \
#                diffusers==0.42.1 importlib_metadata==8.7.0
#            On a machine with internet, `pip install -e . diffusers` does instead.
#   PYTHON   interpreter holding torch and jax[cuda] (default python3)
#   ITERS    timed train steps (default 8, as the anchor); samplers use 3
#   PARTS    what to run, in order (default "anchor train t2i caption summary"); "extra" adds our train
#            step at batch 8 and 16 (the anchor runs out of memory at 8), remat / scan / unfused-loss
#            variants and the confidence sampler. Split the parts over several calls where one command
#            has a time limit (each of ours takes a few minutes: init, compile, timing).
# Output (appended, so parts can run in separate calls): OUTDIR/machine.txt, OUTDIR/anchor.jsonl,
# OUTDIR/jax.jsonl (one JSON line per measurement), OUTDIR/summary.md (side by side, the latest rows,
# with the issue's targets).
set -euo pipefail
out=${1:-bench_out}
anchor=${ANCHOR:-../shared/bench/torch_anchor.py}
py=${PYTHON:-python3}
iters=${ITERS:-8}
parts=${PARTS:-anchor train t2i caption summary}
mkdir -p "$out"
has() { [[ " $parts " == *" $1 "* ]]; }

if [[ -n "${WHEELS:-}" ]]; then
  site=${SITE:-/tmp/site}
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project and configs/, without installing
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU, as the anchor
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONUNBUFFERED=1

{ date -u; nvidia-smi -L || true; "$py" -c 'import jax, torch; print("jax", jax.__version__, jax.devices()); print("torch", torch.__version__)'; } \
  | tee -a "$out/machine.txt"

# 1. The anchor: train (batch 4, $iters steps), VAE, t2i at 1 and 4 images, captions at 1 and 8.
if has anchor; then "$py" "$anchor" --batch 4 --iters "$iters" | tee -a "$out/anchor.jsonl"; fi

# 2. Ours at the same sizes, one process per measurement (peak memory is per process).
bench() { "$py" -m dual_diffusion.benchmark --config=configs/stage2.py "$@" | tee -a "$out/jax.jsonl"; }
if has train; then bench --what=train --batch=4 --iters="$iters"; fi
if has t2i; then bench --what=t2i --batch=1,4 --iters=3; fi
if has caption; then bench --what=caption --batch=1,8 --iters=3 --sampler=ancestral; fi
if has extra; then  # tagged by their config facts in each JSON line; a failure (e.g. out of memory) goes on
  bench --what=train --batch=8 --iters="$iters" || echo "train batch 8 failed" >&2
  bench --what=train --batch=16 --iters="$iters" || echo "train batch 16 failed" >&2
  for remat in none dots full; do
    bench --what=train --batch=4 --iters="$iters" --config.runtime.remat_policy=$remat || echo "remat $remat failed" >&2
  done
  bench --what=train --batch=4 --iters="$iters" --config.runtime.scan_layers=False || echo "no scan failed" >&2
  bench --what=train --batch=4 --iters="$iters" --config.loss.fused=False || echo "unfused failed" >&2
  bench --what=caption --batch=1,8 --iters=3 --sampler=confidence
fi

# 3. Side by side (the latest default-config rows).
has summary || exit 0
"$py" - "$out" <<'EOF' | tee "$out/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
load = lambda name: [json.loads(l) for l in (out / name).read_text().splitlines() if l.startswith("{")]
anchor, ours = load("anchor.jsonl"), load("jax.jsonl")
default = lambda r: (r.get("remat_policy") == "dots_no_batch" and r.get("scan_layers") and r.get("loss_fused")
                     and r.get("sampler", "ancestral") == "ancestral")
a = lambda what, key, val: next((r for r in reversed(anchor) if r["what"] == what and r.get(key) == val), None)
o = lambda what, batch: next((r for r in reversed(ours) if r["what"] == what and r["batch"] == batch
                              and default(r)), None)
rows = [("train step, batch 4 (samples/s)", a("train_step", "batch", 4), "samples_per_sec", o("train", 4), "samples_per_sec", ">= 3x"),
        ("t2i 28 steps CFG, 1 image (images/s)", a("t2i_28steps_cfg", "images", 1), "images_per_sec", o("t2i", 1), "images_per_sec", ""),
        ("t2i 28 steps CFG, 4 images (images/s)", a("t2i_28steps_cfg", "images", 4), "images_per_sec", o("t2i", 4), "images_per_sec", ">= 1.5x"),
        ("caption 128 tok, batch 1 (tokens/s)", a("i2t_64steps_128tok", "captions", 1), "tokens_per_sec", o("caption", 1), "tokens_per_sec", ">= 5x (latency <= 1/5)"),
        ("caption 128 tok, batch 8 (tokens/s)", a("i2t_64steps_128tok", "captions", 8), "tokens_per_sec", o("caption", 8), "tokens_per_sec", ">= 3x")]
print("| measurement | anchor | ours | ratio | target |\n| --- | --- | --- | --- | --- |")
for name, ar, ak, orow, ok, target in rows:
    av, ov = (ar or {}).get(ak), (orow or {}).get(ok)
    ratio = f"{ov / av:.2f}x" if av and ov else ""
    print(f"| {name} | {av if av is None else f'{av:.3g}'} | {ov if ov is None else f'{ov:.3g}'} | {ratio} | {target} |")
tr = o("train", 4)
if tr:
    print(f"\ntrain step: {tr['achieved_tflops']:.1f} TFLOP/s, MFU {100 * tr['mfu_vs_989']:.1f}% "
          f"(anchor {100 * ((a('train_step', 'batch', 4) or {}).get('mfu_vs_989') or 0):.1f}%), "
          f"compile {tr['compile_sec']:.0f} s (target < 120 s), peak {tr['peak_mem_gib']} GiB")
EOF
