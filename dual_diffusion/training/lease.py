"""The workdir lease: one training run per workdir.

WORKDIR/lease.json = {host, pid, start_time, run_id, heartbeat}. A run takes it
at start and deletes it at a clean end; while it runs a daemon thread refreshes
`heartbeat` every `heartbeat_s`. A lease is live when its process is: on the same
host the pid is alive and started no later than the lease (a reused pid is not
the holder); from another host the heartbeat is younger than `stale_after_s`.
A live lease refuses a second run (LeaseHeld, one line); a stale one (a crashed
or killed run) is taken over with a warning; `force=True` (--force_takeover)
takes a live one too. The file goes through etils.epath, so gs:// workdirs work
the same way as local ones. On a multi-host run process 0 holds it for the run.

Taking it is a create-exclusive (a hard link of the written file) on local disks; where that does not exist (object
stores) or when a stale lease is replaced, the run writes its lease, waits
`settle_s` and reads it back: of two runs racing, only the last writer keeps it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath

from dual_diffusion.cli import UsageError

LEASE_FILE = "lease.json"


class LeaseHeld(UsageError):
    """Another live run holds the workdir (or took it over from this one)."""


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    host: str
    pid: int
    start_time: float  # seconds since the epoch
    run_id: str
    heartbeat: float

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.start_time))
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, started {started}, "
                f"last heartbeat {now - self.heartbeat:.0f}s ago)")


def _process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of a local process from /proc; None where /proc is unavailable."""
    try:
        fields = epath.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5): starttime, in clock ticks since boot
        btime = next(int(line.split()[1]) for line in epath.Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_live(info: LeaseInfo, now: float, stale_after_s: float) -> bool:
    if info.host != socket.gethostname():
        return now - info.heartbeat < stale_after_s
    if not _pid_alive(info.pid):
        return False
    started = _process_start_time(info.pid)
    # A process that started after the lease was written reuses a dead holder's pid (2 s for clock rounding).
    return started is None or started <= info.start_time + 2.0


class Lease:
    """The lease of one run on WORKDIR/lease.json; `acquire` takes it or raises LeaseHeld."""

    def __init__(self, workdir, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0,
                 settle_s: float = 1.0):
        self.path = epath.Path(workdir) / LEASE_FILE
        self.heartbeat_s, self.stale_after_s, self.settle_s = heartbeat_s, stale_after_s, settle_s
        now = time.time()
        self.info = LeaseInfo(host=socket.gethostname(), pid=os.getpid(), start_time=now,
                              run_id=uuid.uuid4().hex[:12], heartbeat=now)
        self.lost_to: LeaseInfo | None = None  # set by the heartbeat when another run took the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ file
    def read(self) -> LeaseInfo | None:
        """The lease on disk; None when absent. An unreadable file counts as stale (a torn write)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return LeaseInfo(**json.loads(text))
        except (ValueError, TypeError):
            logging.warning("%s is unreadable; treating it as stale", self.path)
            return LeaseInfo(host="?", pid=-1, start_time=0.0, run_id="?", heartbeat=0.0)

    def _write(self, *, exclusive: bool) -> bool:
        """Writes this run's lease; with `exclusive`, only if no file exists (False if one does)."""
        tmp = self.path.parent / f"{LEASE_FILE}.{self.info.run_id}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self.info)))
        if exclusive:  # a hard link appears complete and atomically, and fails if the lease exists
            try:
                os.link(os.fspath(tmp), os.fspath(self.path))
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
        tmp.replace(self.path)
        return True

    @property
    def _local(self) -> bool:
        return "://" not in os.fspath(self.path)

    # ------------------------------------------------------------------ taking and holding
    def acquire(self, force: bool = False) -> "Lease":
        """Takes the lease (see the module docstring); starts the heartbeat."""
        for _ in range(5):
            now = time.time()
            held = self.read()
            if held is not None and held.run_id != self.info.run_id:
                live = is_live(held, now, self.stale_after_s)
                if live and not force:
                    raise LeaseHeld(f"--workdir={self.path.parent} is in use by {held.describe(now)}; wait for "
                                    "it to end, use another --workdir, or pass --force_takeover if that run is "
                                    "gone")
                logging.warning("taking over the workdir lease of %s %s", "live" if live else "stale",
                                held.describe(now))
            if held is None and self._local:
                if self._write(exclusive=True):
                    break
                continue  # another run created it in between: look again
            self._write(exclusive=False)
            time.sleep(self.settle_s)  # a racing writer's rename lands within this
            now_held = self.read()
            if now_held is None or now_held.run_id != self.info.run_id:
                other = now_held.describe(time.time()) if now_held else "another run"
                raise LeaseHeld(f"--workdir={self.path.parent}: {other} took the workdir lease at the same time")
            break
        else:
            raise LeaseHeld(f"--workdir={self.path.parent}: could not take {self.path} (other runs keep taking it)")
        self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.refresh():
                return

    def refresh(self) -> bool:
        """Rewrites the heartbeat; False (and `lost_to` set) when another run holds the lease now."""
        held = self.read()
        if held is None or held.run_id != self.info.run_id:
            self.lost_to = held or self.lost_to or LeaseInfo("?", -1, 0.0, "(lease file deleted)", 0.0)
            return False
        self.info = dataclasses.replace(self.info, heartbeat=time.time())
        try:
            self._write(exclusive=False)
        except OSError as e:  # a transient store error: the next beat retries
            logging.warning("could not refresh %s: %s", self.path, e)
        return True

    def ensure_held(self) -> None:
        """Raises LeaseHeld when another run took the lease: this run must not write any more."""
        if self.lost_to is None:
            held = self.read()
            if held is None or held.run_id != self.info.run_id:
                self.lost_to = held or LeaseInfo("?", -1, 0.0, "(lease file deleted)", 0.0)
        if self.lost_to is not None:
            raise LeaseHeld(f"--workdir={self.path.parent}: the workdir lease was taken over by "
                            f"{self.lost_to.describe(time.time())}; this run stops without writing")

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self.read()
        if held is not None and held.run_id == self.info.run_id:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
