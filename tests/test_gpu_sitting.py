"""The GPU sitting's pieces that run anywhere: the trace summary, the side-by-side ratios, pausing a job
while timing (launch/gpu_sitting.py, tools/trace_summary.py, benchmark.Timing)."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "launch"))
import gpu_sitting  # noqa: E402
import trace_summary  # noqa: E402


def _write_trace(folder: Path, ops: dict[str, list[float]], host: dict[str, float]) -> None:
    """A perfetto trace as jax.profiler writes it: a device process with an "XLA Ops" line and a host."""
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "XLA Ops"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "Stream #13"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    t = 0.0
    for name, durations in ops.items():
        for dur in durations:
            events.append({"ph": "X", "pid": 1, "tid": 7, "name": name, "ts": t, "dur": dur})
            events.append({"ph": "X", "pid": 1, "tid": 8, "name": f"kernel_of_{name}", "ts": t, "dur": dur})
            t += dur
    events += [{"ph": "X", "pid": 2, "tid": 1, "name": n, "ts": 0.0, "dur": d} for n, d in host.items()]
    run = folder / "plugins" / "profile" / "2026_12_04"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_trace_summary_ranks_device_ops_and_sorts_them_by_kind(tmp_path):
    _write_trace(tmp_path, {"fusion.12": [300.0, 300.0], "cudnn-flash-attention.3": [1000.0, 1000.0],
                            "sm90_xmma_gemm_bf16": [2500.0, 2500.0], "copy.4": [200.0, 200.0]},
                 host={"PjitFunction(step)": 1e6})  # host events are not device time
    s = trace_summary.summarize(tmp_path, top=3, calls=2)
    assert s["busy_ms_per_call"] == pytest.approx(4.0)  # (300 + 1000 + 2500 + 200) us per call, XLA Ops only
    assert [r["op"] for r in s["top"]] == ["sm90_xmma_gemm_bf16", "cudnn-flash-attention.3", "fusion.12"]
    assert [r["kind"] for r in s["top"]] == ["matmul", "attention", "other fusion"]
    assert s["top"][0]["share"] == pytest.approx(0.625) and s["top"][0]["count"] == 1
    assert s["by_kind"] == pytest.approx({"matmul": 0.625, "attention": 0.25, "other fusion": 0.075,
                                          "copy/transpose": 0.05})
    assert "| `sm90_xmma_gemm_bf16` | matmul | 2.50 | 62.5% | 1 |" in trace_summary.markdown(s)


def test_trace_summary_command_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "trace_summary.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}: no perfetto_trace.json.gz below it "
                                                "(benchmark --profile_dir writes one)"]


def test_comparison_takes_the_best_fitting_train_batch_and_caption_latency():
    anchor = [{"what": "train_step", "batch": 4, "samples_per_sec": 8.0},
              {"what": "t2i_28steps_cfg", "images": 4, "images_per_sec": 2.0},
              {"what": "i2t_64steps_128tok", "captions": 1, "sec": 6.0}]
    ours = [{"what": "train", "batch": 4, "sec": 0.2, "samples_per_sec": 20.0},
            {"what": "train", "batch": 8, "sec": 0.32, "samples_per_sec": 25.0},
            {"what": "train", "batch": 16, "fits": False, "xla_mem_gib": 200.0},  # not run: never the best
            {"what": "t2i", "batch": 4, "sec": 1.0, "images_per_sec": 4.0},
            {"what": "caption", "batch": 1, "sec": 0.5, "sampler": "threshold"},
            {"what": "caption", "batch": 1, "sec": 2.0, "sampler": "ancestral"}]
    rows = {r["measurement"]: r for r in gpu_sitting.comparison(anchor, ours)}
    assert rows["train step, batch 4 (samples/s)"]["ratio"] == pytest.approx(2.5)
    best = rows["train step, ours at batch 8 vs anchor at 4 (samples/s)"]
    assert best["ratio"] == pytest.approx(25.0 / 8.0) and best["target"] == ">= 3x"
    assert rows["t2i 28 steps + CFG, 4 images (images/s)"]["ratio"] == pytest.approx(2.0)
    assert rows["caption 128 tokens, batch 1, ours threshold (s per call)"]["ratio"] == pytest.approx(12.0)
    assert rows["caption 128 tokens, batch 1, ours ancestral (s per call)"]["ratio"] == pytest.approx(3.0)
    assert rows["caption 128 tokens, batch 8, ours threshold (s per call)"]["ratio"] is None  # not measured


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_timing_stops_the_paused_job_only_inside_the_timed_window():
    from dual_diffusion.benchmark import Timing

    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        states = []
        timing = Timing(iters=2, warmup=1, pause_pgid=job.pid)
        sec, out = timing.measure("probe", lambda: states.append(_state(job.pid)) or len(states))
        assert states == ["T", "T", "T"] and out == 3 and sec >= 0  # stopped in warmup and every timed call
        time.sleep(0.2)
        assert _state(job.pid) in ("S", "R")  # continued after
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
