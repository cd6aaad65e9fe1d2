"""Ahead-of-time compilation for TPU slices from any host: Cloud TPU names -> libtpu devices
(topology.py), per-chip memory / collectives / FLOPs of a compiled program (compile_report.py,
hlo_collectives.py). Used by `train --dry_run --topology=...` (the train step) and
`sample --dry_run --topology=...` (a sampling call: inference_report.py)."""
