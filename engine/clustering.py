"""Item-side state: each item's seed window and its k centroids.

This is the state a clustering worker owns for the items of its partitions.
New seeds go into the window (idempotently) and, when accepted, into the
item's centroids by one mini-batch k-means step (``engine.kmeans``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import kmeans
from engine.codec import ItemCentroids, SeedBatch
from engine.config import WindowConfig
from engine.seed_window import SeedWindow


@dataclass
class ItemState:
    window: SeedWindow
    centroids: np.ndarray  # [k, d]
    counts: np.ndarray  # [k]
    last_seed_ts: float = 0.0
    model_version: str = ""


class ItemClusters:
    """Seed windows and centroids of many items."""

    def __init__(self, cfg: WindowConfig):
        self.cfg = cfg
        self.items: dict[int, ItemState] = {}
        self._held = 0  # seeds in all windows, kept current (read on every batch)

    def __len__(self) -> int:
        return len(self.items)

    def _state(self, item: int, dim: int, version: str) -> ItemState:
        st = self.items.get(item)
        if st is None or st.centroids.shape[1] != dim or st.model_version != version:
            # a new embedding space (model change) cannot be averaged into the old one
            if st is not None:
                self._held -= len(st.window)
            c, n = kmeans.empty(self.cfg.k, dim)
            st = ItemState(SeedWindow(self.cfg.size), c, n, model_version=version)
            self.items[item] = st
        return st

    def _add(self, st: ItemState, b: SeedBatch) -> list[int]:
        """Rows of ``b`` the window accepted (new seeds or newer clicks of held ones)."""
        before = len(st.window)
        keep = [i for i in range(len(b.users))
                if st.window.add(int(b.users[i]), float(b.ts[i]), b.vectors[i])]
        self._held += len(st.window) - before
        return keep

    def apply(self, item: int, batch: SeedBatch) -> bool:
        """Add one item's new seeds; True if its window (and centroids) changed."""
        st = self._state(item, batch.vectors.shape[1], batch.model_version)
        accepted = self._add(st, batch)
        if not accepted:
            return False
        st.centroids, st.counts = kmeans.partial_fit(
            st.centroids, st.counts, batch.vectors[accepted], self.cfg.count_cap
        )
        st.last_seed_ts = max(st.last_seed_ts, float(batch.ts[accepted].max()))
        return True

    def apply_many(self, batches: dict[int, list[SeedBatch]]) -> list[int]:
        """``apply`` for a whole poll batch: one vectorised k-means step for all items.

        Returns the items whose windows changed. Same result as ``apply`` item
        by item (windows identical, centroids equal up to float rounding).
        """
        changed: list[int] = []
        points: list[np.ndarray] = []
        for item, bs in batches.items():
            accepted = []
            for b in bs:
                st = self._state(item, b.vectors.shape[1], b.model_version)
                keep = self._add(st, b)
                if keep:
                    accepted.append(b.vectors[keep])
                    st.last_seed_ts = max(st.last_seed_ts, float(b.ts[keep].max()))
            if accepted:
                changed.append(item)
                points.append(np.concatenate(accepted))
        if not changed:
            return changed
        states = [self.items[i] for i in changed]
        if len({s.centroids.shape for s in states}) > 1:  # mixed dims: rare, go one by one
            for st, x in zip(states, points):
                st.centroids, st.counts = kmeans.partial_fit(
                    st.centroids, st.counts, x, self.cfg.count_cap)
            return changed
        owner = np.repeat(np.arange(len(changed)), [len(x) for x in points])
        cent, counts = kmeans.partial_fit_many(
            np.stack([s.centroids for s in states]), np.stack([s.counts for s in states]),
            np.concatenate(points), owner, self.cfg.count_cap)
        for j, st in enumerate(states):
            st.centroids, st.counts = cent[j], counts[j]
        return changed

    def refresh(self, item: int, seed: int = 0) -> None:
        """Full k-means of the item's current window (drops forgotten seeds' pull)."""
        st = self.items[item]
        if len(st.window):
            st.centroids, st.counts = kmeans.fit(st.window.vectors(), self.cfg.k, seed=seed)

    def record(self, item: int, now: float) -> ItemCentroids:
        st = self.items[item]
        return ItemCentroids(
            st.centroids, st.counts, len(st.window), now, st.last_seed_ts, st.model_version
        )

    def seeds_held(self) -> int:
        return self._held

    def drop(self, items: set[int]) -> None:
        """Forget items whose partition moved to another worker."""
        for i in items:
            st = self.items.pop(i, None)
            if st is not None:
                self._held -= len(st.window)
