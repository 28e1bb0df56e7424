"""Ending the processes we started, and only those (by their Popen handle, i.e. PID)."""

from __future__ import annotations

import signal
import subprocess


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
