"""Per-partition state snapshots, each with the input offset it reflects.

Why: without them a worker rebuilds its state by re-reading its input
partitions from the beginning, which grows with the topic's retention. With
them it loads the newest snapshot of each partition it is assigned and
re-reads only what came after the snapshot's offset.

The order, written once here and followed by ``ConsumerLoop``:

1. a worker handles a batch, flushes its outputs (durable) and commits the
   input offsets (the loop's steps 5 and 6);
2. then, every ``snapshots.every_s``, it writes each assigned partition's state
   with ``offset`` = the consumer's position there: every record before it is
   in the state, and every output those records made is already in Kafka (so
   a snapshot never holds a change whose output could still be lost; changes
   whose output is deliberately delayed, like centroids waiting for their
   publish interval, are in the snapshot as pending and published after a
   restore);
3. on assignment, the worker pauses the partition, loads its snapshot if it
   is valid, seeks to its offset (or to the beginning without one), resumes.

A snapshot is valid only if its offset is at most the group's committed
offset for that partition: a broker that lost its storage (the embedded one
keeps topics in memory) has no committed offsets for a fresh topic, so a
snapshot of an earlier run is never loaded into a new one. Replaying records
between the snapshot's offset and the committed one is safe because every
stage's state update is idempotent (seed windows ignore replays; the scoring
worker re-applies clicks up to the committed offset without emitting them).

Files: ``<snapshots.dir>/<group id>/<topic>-<partition>.npz``, written to a
temporary name and renamed (atomic on one file system); numpy archives loaded
with ``allow_pickle=False`` (no code runs on load). A file that does not load
is logged and ignored: the partition is rebuilt from the log instead.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kafka import TopicPartition

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class Snapshot:
    """One partition's state: named arrays, small JSON metadata, the offset it reflects."""

    offset: int
    arrays: dict[str, np.ndarray]
    meta: dict


class SnapshotStore:
    """Reads and writes the snapshots of one consumer group's partitions."""

    def __init__(self, folder: Path, group_id: str, every_s: float):
        self.folder = Path(folder).expanduser() / group_id
        self.every_s = every_s
        self._next = time.monotonic() + every_s

    @property
    def enabled(self) -> bool:
        return self.every_s > 0

    def due(self, now: float | None = None) -> bool:
        """True once per ``every_s`` (and moves the next due time on)."""
        now = time.monotonic() if now is None else now
        if not self.enabled or now < self._next:
            return False
        self._next = now + self.every_s
        return True

    def path(self, tp: TopicPartition) -> Path:
        return self.folder / f"{tp.topic}-{tp.partition}.npz"

    def save(self, tp: TopicPartition, snap: Snapshot) -> Path:
        """Write atomically: a crash mid-write leaves the previous snapshot in place."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(tp)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        header = {"format": FORMAT, "offset": int(snap.offset), "written_at": time.time(),
                  "meta": snap.meta}
        with open(tmp, "wb") as f:
            np.savez(f, __header__=np.array(json.dumps(header)), **snap.arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    def load(self, tp: TopicPartition, committed: int | None) -> Snapshot | None:
        """The partition's snapshot if there is one and it is valid (module docstring)."""
        path = self.path(tp)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["__header__"]))
                arrays = {k: z[k] for k in z.files if k != "__header__"}
        except (OSError, ValueError, KeyError) as e:
            log.warning("snapshot %s unreadable (%s): rebuilding %s from the log", path, e, tp)
            return None
        if header.get("format") != FORMAT:
            log.warning("snapshot %s has format %s, not %s: ignored", path,
                        header.get("format"), FORMAT)
            return None
        offset = int(header["offset"])
        if committed is None or offset > committed:
            log.warning("snapshot %s reflects offset %d but the group committed %s there (a "
                        "new topic or an earlier run?): ignored", path, offset, committed)
            return None
        return Snapshot(offset, arrays, header.get("meta", {}))
