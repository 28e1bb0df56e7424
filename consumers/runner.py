"""Build a worker of a given kind and run it: the same path for the CLI, the demo and tests."""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from consumers.loop import ConsumerLoop, Stage
from engine.config import Settings

log = logging.getLogger(__name__)

KINDS = ("scoring", "clustering")


class NoCheckpointError(RuntimeError):
    """The scoring worker needs a trained model."""


def resolve_checkpoint(settings: Settings, checkpoint: Path | None) -> Path:
    from models.train_ralm import latest_checkpoint

    path = checkpoint or latest_checkpoint(settings.checkpoint_dir)
    if path is None:
        raise NoCheckpointError(
            f"no RALM checkpoint in {settings.checkpoint_dir}: run `lookalike train ralm` "
            "or pass --checkpoint"
        )
    return path


def build_stage(kind: str, settings: Settings, checkpoint: Path | None = None) -> Stage:
    if kind == "clustering":
        from consumers.clustering import ClusteringStage

        return ClusteringStage(settings)
    if kind == "scoring":
        from consumers.scoring import ScoringStage
        from models.ralm import RalmModel

        path = resolve_checkpoint(settings, checkpoint)
        model = RalmModel.load(path)
        log.info("scoring with %s (%s)", model.version, path)
        return ScoringStage(settings, model, path, explicit_checkpoint=checkpoint is not None)
    raise ValueError(f"unknown worker kind {kind!r}; expected one of {KINDS}")


def tune_gc_for_a_worker() -> None:
    """A worker process's long-lived state should not be re-scanned by the collector.

    A scoring worker holds up to ``max_users`` user objects: with CPython's
    default thresholds each new user pays ~3 µs of collections (measured: 8 vs
    5 µs per new user) and a full collection pauses the worker for the whole
    heap. What is loaded at start (model, tables) is frozen out of collection,
    and young collections run 100× less often (the state has no reference
    cycles to reclaim). Process-wide, so called by the ``worker`` command only.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 20, 100)


@dataclass
class RunningWorker:
    """A worker loop on a thread, with its metrics endpoint."""

    loop: ConsumerLoop
    thread: threading.Thread
    metrics_port: int
    _server: object

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stop(self, timeout_s: float = 30.0) -> None:
        self.loop.stop.set()
        self.thread.join(timeout_s)
        self._server.shutdown()  # type: ignore[attr-defined]


def start_worker(stage: Stage, metrics_port: int = 0, metrics_addr: str = "127.0.0.1",
                 stop: threading.Event | None = None) -> RunningWorker:
    """Serve metrics and run the stage's loop on a daemon thread."""
    server, port = stage.metrics.serve(metrics_port, metrics_addr)
    loop = ConsumerLoop(stage, stop)
    thread = threading.Thread(target=loop.run, name=f"lookalike-{stage.name}", daemon=True)
    thread.start()
    return RunningWorker(loop, thread, port, server)
