"""Ending the processes we started, and only those (by their Popen handle, i.e. PID)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def terminate(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM (a clean stop: flush, commit, close), SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_bytes(pid: int) -> float:
    """Resident set size of a process, from ``/proc/<pid>/status`` (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from ``/proc/<pid>/stat`` (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


@dataclass
class CpuWatch:
    """A process's CPU use (cores) per ``every_s`` window, sampled on a daemon thread:
    the curve that shows a broker falling behind as it fills."""

    pid: int
    every_s: float = 10.0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (s since start, cores)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> CpuWatch:
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-watch")
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.every_s + 1)
        return self.samples

    def _run(self) -> None:
        t0 = was_t = time.monotonic()
        was = cpu_seconds(self.pid)
        while not self._stop.wait(self.every_s):
            now_t, now = time.monotonic(), cpu_seconds(self.pid)
            self.samples.append((now_t - t0, (now - was) / (now_t - was_t)))
            was_t, was = now_t, now
