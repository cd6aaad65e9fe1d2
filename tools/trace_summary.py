#!/usr/bin/env python3
"""Top ops by time in a jax.profiler trace (the perfetto JSON that `benchmark --profile_dir` writes).

    python tools/trace_summary.py TRACE_DIR [--top 15] [--calls 2]

TRACE_DIR is searched for `perfetto_trace.json.gz`. Device work is read from the
processes named like a device (/device:GPU:0, TPU, ...; the host's process when there is
none): on the "XLA Ops" line when the trace has one (one event per HLO op), else every
line of the device (kernels per stream). Prints a markdown table of the top ops (total ms
per traced call, share of the device's busy time, count) and the time by kind (matmul,
attention, collective, copy/transpose, other fusion), then one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

KINDS = (  # first match wins; matched against the lower-cased op or kernel name
    ("attention", re.compile(r"flash|fmha|sdpa|cudnn|attention|splash")),
    ("matmul", re.compile(r"gemm|cublas|xmma|cutlass|wgmma|matmul|dot|convolution|\bconv")),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|collective|nccl|all-to-all")),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|dynamic-update-slice|dynamic-slice")),
)
DEVICE = re.compile(r"device|gpu|tpu", re.IGNORECASE)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if pattern.search(low)), "other fusion")


def load_events(trace_dir: Path) -> list[dict]:
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz below it (benchmark --profile_dir writes one)")
    data = json.loads(gzip.open(files[-1]).read())
    return data["traceEvents"] if isinstance(data, dict) else data


def device_durations(events: list[dict]) -> tuple[collections.Counter, collections.Counter, str]:
    """(total microseconds by op name, count by op name, which lines were read)."""
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"].get("name", "")
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"].get("name", "")
    device_pids = {pid for pid, name in procs.items() if DEVICE.search(name)} or set(procs)
    ops_lines = {key for key, name in threads.items() if key[0] in device_pids and name == "XLA Ops"}
    lines = ops_lines or {key for key in threads if key[0] in device_pids} or None
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        if lines is not None and (e["pid"], e.get("tid")) not in lines:
            continue
        total[e["name"]] += float(e.get("dur", 0.0))
        count[e["name"]] += 1
    where = "XLA Ops" if ops_lines else "all device lines"
    return total, count, f"{where} of {sorted(procs[p] for p in device_pids)}"


def summarize(trace_dir: Path, top: int = 15, calls: int = 2) -> dict:
    total, count, where = device_durations(load_events(trace_dir))
    busy = sum(total.values())
    if not busy:
        raise ValueError(f"{trace_dir}: the trace holds no device events ({where})")
    by_kind = collections.Counter()
    for name, us in total.items():
        by_kind[kind_of(name)] += us
    return dict(trace=str(trace_dir), lines=where, calls=calls, busy_ms_per_call=busy / 1e3 / calls,
                top=[dict(op=name, kind=kind_of(name), ms_per_call=us / 1e3 / calls, share=us / busy,
                          count=count[name] // max(calls, 1)) for name, us in total.most_common(top)],
                by_kind={k: v / busy for k, v in by_kind.most_common()})


def markdown(summary: dict) -> str:
    rows = [f"device busy {summary['busy_ms_per_call']:.1f} ms per call ({summary['lines']})", "",
            "| op | kind | ms per call | share | count per call |", "| --- | --- | --- | --- | --- |"]
    rows += [f"| `{r['op'][:70]}` | {r['kind']} | {r['ms_per_call']:.2f} | {100 * r['share']:.1f}% | {r['count']} |"
             for r in summary["top"]]
    rows += ["", "by kind: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["by_kind"].items())]
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2, help="calls in the trace (benchmark traces 2)")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.trace_dir, args.top, args.calls)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
