"""Hot reload of the scoring worker's model, without dropping or failing a request.

Two ways a new RALM checkpoint reaches a running worker:

- **the checkpoint file**: the worker re-checks every ``scoring.reload_check_s``
  the file it was started with (``--checkpoint``), or, when it took the latest
  checkpoint of ``checkpoint_dir``, which one is latest now; a changed file or
  a newer latest is loaded;
- **the ``models`` topic**: ``{"kind": "ralm", "path": "...", "version": "..."}``
  (``lookalike announce PATH`` writes one) tells every worker to load ``path``.
  Workers read it from the beginning when they start, so a restarted worker
  serves the last announced model, not the one it was started with.

Loading runs on a background thread (a checkpoint takes ~0.1-1 s to read);
the worker's loop keeps serving with the old model meanwhile and swaps
between two polls, so no request sees half a model. A checkpoint that fails to
load or to validate (wrong kind or format, weights-only refusal, an embedding
size other than the centroid table's, non-finite output on a probe user) is
rejected with the reason in the log and ``lookalike_model_reloads_total
{outcome="rejected"}``, and the old model keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from consumers.kafka import make_consumer
from engine.codec import BadEvent, ModelAnnouncement, decode_model_announcement
from engine.config import Settings
from engine.topics import MODELS, Topics
from models.checkpoint import CheckpointError
from models.ralm import RalmModel

log = logging.getLogger(__name__)


class RejectedModel(RuntimeError):
    """A checkpoint that loaded but must not serve."""


def validate(model: RalmModel, dim: int) -> None:
    """Refuse a model the worker cannot serve with its centroid table.

    The table's vectors are ``dim``-wide (the clustering workers' seeds); a
    model of another size would fail every request. A probe user (no profile,
    no clicks) and a probe item must come out finite.
    """
    if model.dim != dim:
        raise RejectedModel(f"embedding size {model.dim}, the centroid table's is {dim}")
    fs = model.features
    probe = model.embed_batch(fs.batch(np.zeros((1, 3), np.int64),
                                       fs.continuous(np.full(1, np.nan, np.float32),
                                                     np.zeros(1)),
                                       np.zeros((1, fs.history_len), np.int64)))
    item = model.item_global(np.ones((1, 2, dim), np.float32), np.ones((1, 2), np.float32))
    if not (np.isfinite(probe).all() and np.isfinite(item).all()):
        raise RejectedModel("non-finite embeddings on a probe user or item")


def load_validated(path: Path, dim: int) -> RalmModel:
    model = RalmModel.load(path)
    model.user_tower.eval()
    model.lookalike.eval()
    validate(model, dim)
    return model


@dataclass
class _Watched:
    path: Path | None
    mtime: float


class ModelReloader:
    """Watches the checkpoint file and the ``models`` topic; hands the loop a new model."""

    def __init__(self, settings: Settings, dim: int, checkpoint: Path | None,
                 explicit: bool, on_reject: Callable[[], None] = lambda: None,
                 loader: Callable[[Path, int], RalmModel] = load_validated):
        self.settings, self.dim, self.loader, self.on_reject = settings, dim, loader, on_reject
        self.explicit = explicit  # a --checkpoint path: watch it, not the directory
        self._watched = _Watched(checkpoint, _mtime(checkpoint))
        self._next_check = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="model-reload")
        self._loading: tuple[Path, str, Future[RalmModel]] | None = None
        self._queued: tuple[Path, str] | None = None  # the newest source while one loads
        self.reader: KafkaConsumer | None = None
        self.rejected: list[tuple[str, str]] = []  # (path, reason), newest last

    def start(self) -> None:
        """Read the ``models`` topic from the beginning: the last announcement wins."""
        topic = Topics(self.settings.kafka.topic_prefix).name(MODELS)
        self.reader = make_consumer(self.settings.kafka, None, fetch_max_wait_ms=10,
                                    max_poll_records=100)
        parts = self.reader.partitions_for_topic(topic)
        if not parts:
            log.warning("no topic %r: models are reloaded from the checkpoint file only", topic)
            self.reader.close(autocommit=False)
            self.reader = None
            return
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.reader.assign(tps)
        self.reader.seek_to_beginning(*tps)

    def poll(self, now: float, dead_letter: Callable[[object, BadEvent], None]) -> RalmModel | None:
        """A validated new model when one is ready, else None (never raises)."""
        self._read_announcements(dead_letter)
        if now >= self._next_check and self.settings.scoring.reload_check_s > 0:
            self._next_check = now + self.settings.scoring.reload_check_s
            self._check_file()
        return self._collect()

    def _read_announcements(self, dead_letter: Callable[[object, BadEvent], None]) -> None:
        if self.reader is None:
            return
        limit = self.settings.kafka.max_message_bytes
        for records in self.reader.poll(timeout_ms=0).values():
            for rec in records:
                try:
                    ann = decode_model_announcement(rec.value, limit)
                except BadEvent as e:
                    dead_letter(rec, e)
                    continue
                if ann.kind != "ralm":
                    continue
                path = Path(ann.path)
                if not self.allowed(path):
                    dead_letter(rec, BadEvent("schema", f"path {ann.path[:200]!r} is outside "
                                              "the model folders (scoring.model_dirs)"))
                    continue
                self._want(path, f"announced as {ann.version or '-'}")

    def allowed(self, path: Path) -> bool:
        """Whether an announced path lies in a model folder (links resolved first, so a
        link inside cannot point outside)."""
        roots = [self.settings.checkpoint_dir, *self.settings.scoring.model_dirs]
        if self._watched.path is not None:
            roots.append(self._watched.path.parent)
        real = path.expanduser().resolve()
        return any(real.is_relative_to(Path(r).expanduser().resolve()) for r in roots)

    def _check_file(self) -> None:
        from models.train_ralm import latest_checkpoint

        if self._watched.path is None:  # a model built in code: no file to follow
            return
        path = self._watched.path if self.explicit else latest_checkpoint(
            self.settings.checkpoint_dir)
        if path is None:
            return
        mtime = _mtime(path)
        if path != self._watched.path or mtime != self._watched.mtime:
            self._watched = _Watched(path, mtime)
            self._want(path, "checkpoint file changed")

    def _want(self, path: Path, why: str) -> None:
        if self._loading is not None:
            self._queued = (path, why)  # load the newest after this one
            return
        log.info("loading model %s (%s)", path, why)
        self._loading = (path, why, self._pool.submit(self.loader, path, self.dim))

    def _collect(self) -> RalmModel | None:
        if self._loading is None or not self._loading[2].done():
            return None
        path, why, fut = self._loading
        self._loading = None
        if self._queued is not None:
            self._want(*self._queued)
            self._queued = None
        try:
            return fut.result()
        except (CheckpointError, RejectedModel, OSError, ValueError, RuntimeError) as e:
            reason = f"{type(e).__name__}: {e}"
            log.error("model %s rejected, the current model keeps serving: %s", path, reason)
            self.rejected.append((str(path), reason))
            del self.rejected[:-20]
            self.on_reject()
            return None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close(autocommit=False)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _mtime(path: Path | None) -> float:
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0


def announce(s: Settings, path: Path, version: str | None = None) -> ModelAnnouncement:
    """Tell every scoring worker to load ``path`` (checked here first: a bad file is
    refused before any worker sees it)."""
    from consumers.kafka import make_producer
    from engine.codec import encode_json

    model = RalmModel.load(path)
    ann = ModelAnnouncement("ralm", str(Path(path).resolve()), version or model.version)
    producer = make_producer(s.kafka, linger_ms=0)
    try:
        producer.send(Topics(s.kafka.topic_prefix).name(MODELS), key=b"ralm",
                      value=encode_json({"kind": ann.kind, "path": ann.path,
                                         "version": ann.version, "announced_at": time.time()}))
        producer.flush()
    finally:
        producer.close(timeout=5)
    return ann
