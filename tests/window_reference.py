"""The seed window as first written, one seed at a time in Python: the reference
``engine.seed_window``'s compiled store is tested against (``tests/test_seed_window.py``,
``tests/test_clustering.py``). Same rules: the ``size`` distinct users with the newest
clicks, oldest first by click time (ties: the first admitted first), replays change
nothing."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class ReferenceWindow:
    """Most recent ``size`` distinct users of one item, oldest first."""

    __slots__ = ("size", "dtype", "_rows", "_ts", "_vecs", "_newest")

    def __init__(self, size: int, dtype: str = "float32"):
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self.dtype = np.dtype(dtype)
        self._rows: OrderedDict[int, int] = OrderedDict()  # user -> row, oldest first
        self._ts: list[float] = []  # by row (a list: compared per seed, faster than numpy)
        self._vecs: np.ndarray | None = None  # [cap, d] by row
        self._newest = float("-inf")  # the last seed's time (the window's newest)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, user: int) -> bool:
        return user in self._rows

    def users(self) -> list[int]:
        """Oldest first, newest last."""
        return list(self._rows)

    def vectors(self) -> np.ndarray:
        """[n, d] float32 embeddings in window order."""
        return self.ordered().astype(np.float32, copy=False)

    def ordered(self) -> np.ndarray:
        """[n, d] embeddings in window order, as stored (a snapshot keeps the dtype)."""
        if self._vecs is None or not self._rows:
            return np.empty((0, 0), self.dtype)
        return self._vecs[list(self._rows.values())]

    def stored(self) -> np.ndarray:
        """[n, d] stored vectors in row order (not window order): k-means needs no order."""
        n = len(self._rows)
        return self._vecs[:n] if self._vecs is not None else np.empty((0, 0), self.dtype)

    def oldest_ts(self) -> float:
        return self._ts[next(iter(self._rows.values()))] if self._rows else float("-inf")

    def newest_ts(self) -> float:
        return self._newest if self._rows else float("-inf")

    def admit(self, user: int, ts: float, dim: int) -> int:
        """Bookkeeping of one seed; the row its vector goes to, or -1 if nothing changes.

        The caller writes the vector (``write``), so a poll's vectors can be
        copied in one call per item.
        """
        rows = self._rows
        row = rows.get(user)
        if row is not None:
            if self._ts[row] >= ts:
                return -1  # duplicate or stale replay
            rows.move_to_end(user)
        elif len(rows) >= self.size:
            oldest = next(iter(rows.values()))
            if ts <= self._ts[oldest]:
                return -1  # would be evicted at once: a replay of an evicted seed
            rows.popitem(last=False)
            row = oldest
            rows[user] = row
        else:
            row = len(rows)
            if self._vecs is None or row == len(self._vecs):
                self._grow(dim)
            rows[user] = row
            self._ts.append(ts)
            self._place(ts)
            return row
        self._ts[row] = ts
        self._place(ts)
        return row

    def _place(self, ts: float) -> None:
        """Keep click-time order after the seed just put last. Seeds mostly arrive in
        time order: then it is newest already and nothing moves (no scan: the scan per
        seed was 15% of the clustering state path's time)."""
        if ts >= self._newest:
            self._newest = ts
        else:
            self._back_in_time(ts)

    def _back_in_time(self, ts: float) -> None:
        """The seed just put last is older than the ones before it: move those after it,
        so the order stays by click time (ties keep their arrival order)."""
        rows, times = self._rows, self._ts
        it = reversed(rows.items())
        next(it)  # the new seed
        newer = []
        for user, row in it:
            if times[row] <= ts:
                break
            newer.append(user)
        for user in reversed(newer):
            rows.move_to_end(user)

    def write(self, rows: list[int] | int, vectors: np.ndarray) -> None:
        """Vectors of admitted seeds (repeated rows: the last one wins)."""
        assert self._vecs is not None
        self._vecs[rows] = vectors

    def add(self, user: int, ts: float, vector: np.ndarray) -> bool:
        """Insert or refresh one seed; False if the event changes nothing.

        Returns True when the window changed (a new seed, or a newer click of a
        seed already there).
        """
        row = self.admit(user, ts, vector.shape[-1])
        if row < 0:
            return False
        self.write(row, vector)
        return True

    def load(self, users: list[int], ts: list[float], vectors: np.ndarray,
             rows: list[int] | None = None) -> None:
        """Become the window of distinct ``users`` (oldest first) at once, as a snapshot
        holds it: what ``add`` one seed at a time would build, without the per-seed work
        (the last ``size`` when there are more). ``rows``: the storage row of each seed
        (a permutation of 0..n-1; default in window order), so a restored window stores
        its vectors where the original did and sums over them come out the same."""
        users, ts, vectors = users[-self.size:], ts[-self.size:], vectors[-self.size:]
        n = len(users)
        rows = list(range(n)) if rows is None else [int(r) for r in rows][-n:]
        if sorted(rows) != list(range(n)):
            raise ValueError("a window's rows must be 0..n-1, each once")
        self._rows = OrderedDict(zip(users, rows))
        if len(self._rows) != n:
            raise ValueError("a window's users must be distinct")
        self._ts = [0.0] * n
        for r, t in zip(rows, ts):
            self._ts[r] = float(t)
        self._newest = max(self._ts, default=float("-inf"))
        cap = min(self.size, max(4, 1 << max(n - 1, 0).bit_length()))
        self._vecs = np.empty((cap, vectors.shape[1]), self.dtype)
        self._vecs[rows] = vectors

    def _grow(self, dim: int) -> None:
        """Room for one more row: doubling, capped at ``size``."""
        old = 0 if self._vecs is None else len(self._vecs)
        vecs = np.empty((min(self.size, max(4, 2 * old)), dim), self.dtype)
        if self._vecs is not None:
            vecs[:old] = self._vecs
        self._vecs = vecs
