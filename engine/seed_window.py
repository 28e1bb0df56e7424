"""Rolling window of an item's most recent distinct seed users.

A user who clicks again moves to the front with their newest embedding; they
are never in twice. Updates are idempotent: replaying events already applied
(after a crash, before the committed offset) changes nothing, because an event
no newer than what the window holds for that user, or no newer than
everything in a full window, is ignored. (A new user tied with the oldest
seed's timestamp in a full window is thus not admitted: idempotence wins.)
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class SeedWindow:
    """Most recent ``size`` distinct users of one item, oldest first."""

    __slots__ = ("size", "_seeds")

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self._seeds: OrderedDict[int, tuple[float, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seeds)

    def __contains__(self, user: int) -> bool:
        return user in self._seeds

    def users(self) -> list[int]:
        """Oldest first, newest last."""
        return list(self._seeds)

    def vectors(self) -> np.ndarray:
        """[n, d] embeddings in window order."""
        return np.stack([v for _, v in self._seeds.values()]) if self._seeds else np.empty((0, 0))

    def oldest_ts(self) -> float:
        return next(iter(self._seeds.values()))[0] if self._seeds else float("-inf")

    def newest_ts(self) -> float:
        return next(reversed(self._seeds.values()))[0] if self._seeds else float("-inf")

    def add(self, user: int, ts: float, vector: np.ndarray) -> bool:
        """Insert or refresh one seed; False if the event changes nothing.

        Returns True when the window changed (a new seed, or a newer click of a
        seed already there).
        """
        held = self._seeds.get(user)
        if held is not None:
            if held[0] >= ts:
                return False  # duplicate or stale replay
            self._seeds.move_to_end(user)
            self._seeds[user] = (ts, vector)
            return True
        if len(self._seeds) >= self.size and ts <= self.oldest_ts():
            return False  # would be evicted at once: a replay of an evicted seed
        self._seeds[user] = (ts, vector)
        if len(self._seeds) > self.size:
            self._seeds.popitem(last=False)
        return True

    def nbytes(self) -> int:
        """Payload bytes held (vectors and timestamps), for the memory budget."""
        return sum(v.nbytes + 8 + 8 for _, v in self._seeds.values())
