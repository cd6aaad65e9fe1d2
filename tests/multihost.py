"""Several JAX processes on this machine as one cluster (not a test module).

`run_processes(["-m", "dual_diffusion.train", ...])` starts `python ARGS` N times, each a
JAX process of one CPU cluster: it joins through dual_diffusion.distributed (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID on a free localhost port), holds `devices_per_process` host
devices and runs its collectives over gloo. Every process ends: when one fails the others are
killed after `grace` seconds (they would otherwise wait for it in a collective), and all are
killed at `timeout`.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int  # -9 when it was killed
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    xla = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f)
    env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=f"{xla} --xla_force_host_platform_device_count={devices_per_process}".strip(),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p))
    env.update(extra or {})
    return env


def run_processes(args: Sequence[str], *, num_processes: int = 2, devices_per_process: int = 4,
                  env: Mapping[str, str] | None = None, cwd: str | os.PathLike = ROOT, timeout: float = 600,
                  grace: float = 20) -> list[ProcessResult]:
    """Runs `python ARGS` as processes 0..N-1 of one cluster; their results in process order."""
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="multihost_"))
    procs, files = [], []
    for i in range(num_processes):
        out, err = open(logs / f"{i}.out", "w+"), open(logs / f"{i}.err", "w+")
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=out, stderr=err,
                                      env=cluster_env(i, num_processes, port, devices_per_process, env),
                                      start_new_session=True))
    deadline, failed_at = time.monotonic() + timeout, None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
        time.sleep(0.2)
    results = []
    for i, (p, (out, err)) in enumerate(zip(procs, files)):
        p.wait()
        out.seek(0), err.seek(0)
        results.append(ProcessResult(i, p.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def describe(results: Sequence[ProcessResult], tail: int = 3000) -> str:
    """Each process's exit status and the end of its stderr, for an assertion message."""
    return "\n".join(f"--- process {r.process_id}: exit {r.returncode}\n{r.stderr[-tail:]}" for r in results)
