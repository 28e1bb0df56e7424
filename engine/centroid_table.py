"""The scoring worker's copy of the whole centroid table, with its ANN index.

Every scoring worker reads all partitions of the compacted ``seed-centroids``
topic and keeps the latest record per item (the embedded broker never
compacts, so superseded values and tombstones arrive too: last write wins).
Items are retrieved by their global-attention embedding, which does not
depend on the user, with an exact Faiss inner-product index (at 43.5k items
exact search is as fast as HNSW at useful recall); the index is rebuilt from
the changed rows at most every ``index_refresh_s`` and swapped in whole.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import faiss
import numpy as np
import torch

from engine.codec import ItemCentroids

GlobalFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class CentroidTable:
    """Latest centroids per item, in dense slots, plus a Faiss index over them."""

    def __init__(self, k: int, dim: int, min_seeds: int = 1, capacity: int = 1024):
        self.k, self.dim, self.min_seeds = k, dim, min_seeds
        self.slot_of: dict[int, int] = {}
        self.item_ids = np.zeros(capacity, np.int64)
        self.centroids = np.zeros((capacity, k, dim), np.float32)
        self.counts = np.zeros((capacity, k), np.float32)
        self.global_vec = np.zeros((capacity, dim), np.float32)
        #: per item E Eᵀ of its centroids: RALM's local-attention norm without
        #: forming the user-dependent local embedding (``RalmModel.score_gram``)
        self.gram = np.zeros((capacity, k, k), np.float32)
        self.n_seeds = np.zeros(capacity, np.int64)
        self.updated_at = np.zeros(capacity, np.float64)
        self.last_seed_ts = np.zeros(capacity, np.float64)
        self.versions: dict[int, str] = {}
        self._dirty: set[int] = set()
        self._index: faiss.Index | None = None
        self._index_slots = np.zeros(0, np.int64)
        self._index_vecs = np.zeros((0, dim), np.float32)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int((self.n_seeds[: len(self.slot_of)] >= self.min_seeds).sum())

    def _grow(self) -> None:
        cap = len(self.item_ids) * 2
        for name in ("item_ids", "centroids", "counts", "global_vec", "gram", "n_seeds",
                     "updated_at", "last_seed_ts"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def upsert(self, item: int, rec: ItemCentroids | None) -> None:
        """Apply one record; ``None`` (tombstone) removes the item from serving."""
        slot = self.slot_of.get(item)
        if rec is None:
            if slot is not None:
                self.n_seeds[slot] = 0
                self._dirty.add(slot)
            return
        if rec.centroids.shape != (self.k, self.dim):
            raise ValueError(
                f"centroids of item {item} are {rec.centroids.shape}, table is {(self.k, self.dim)}"
            )
        if slot is None:
            slot = len(self.slot_of)
            if slot >= len(self.item_ids):
                self._grow()
            self.slot_of[item] = slot
            self.item_ids[slot] = item
        self.centroids[slot] = rec.centroids
        self.counts[slot] = rec.counts
        self.n_seeds[slot] = rec.n_seeds
        self.updated_at[slot] = rec.updated_at
        self.last_seed_ts[slot] = rec.last_seed_ts
        self.versions[slot] = rec.model_version
        self._dirty.add(slot)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def refresh(self, global_fn: GlobalFn) -> int:
        """Recompute global embeddings of changed rows and swap in a new index."""
        if not self._dirty:
            return 0
        rows = np.fromiter(self._dirty, np.int64)
        self._dirty.clear()
        self.global_vec[rows] = global_fn(self.centroids[rows], self.counts[rows])
        cent = self.centroids[rows]
        self.gram[rows] = cent @ cent.transpose(0, 2, 1)
        n = len(self.slot_of)
        live = np.flatnonzero(self.n_seeds[:n] >= self.min_seeds)
        vecs = np.ascontiguousarray(self.global_vec[live])
        index = faiss.IndexFlatIP(self.dim)
        if len(live):
            index.add(vecs)
        with self._lock:
            self._index, self._index_slots, self._index_vecs = index, live, vecs
        return len(rows)

    def search(self, users: np.ndarray, n: int) -> np.ndarray:
        """[B, n'] slots of the best items by cos(user, global); -1 pads."""
        with self._lock:
            index, slots, vecs = self._index, self._index_slots, self._index_vecs
        if index is None or index.ntotal == 0:
            return np.full((len(users), 0), -1, np.int64)
        q = users / np.maximum(np.linalg.norm(users, axis=1, keepdims=True), 1e-12)
        q = np.ascontiguousarray(q, np.float32)
        n = min(n, index.ntotal)
        if len(q) < self.blas_batch:
            _, idx = index.search(q, n)
            return np.where(idx >= 0, slots[np.maximum(idx, 0)], -1)
        return slots[_top_n(q @ vecs.T, n)]

    #: from this many queries on, one BLAS product + top-k: measured 3-10x
    #: faster than Faiss's flat search with n ~ 250 results (its heaps dominate)
    blas_batch = 16

    def newest_update(self) -> float:
        n = len(self.slot_of)
        return float(self.updated_at[:n].max()) if n else 0.0


def _top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Column indices of each row's n largest scores, best first (torch's top-k
    measured 1.5-4x faster than numpy's argpartition + argsort here)."""
    return torch.topk(torch.from_numpy(scores), n, dim=1, sorted=True).indices.numpy()
