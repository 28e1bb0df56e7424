"""An item's seeds clustered as the clustering worker clusters them, for training.

``window_config`` is the worker's window for a model's seeds; ``cluster_seeds`` runs
the worker's own k-means (``engine.clustering.cluster_clicks``) over a click log;
``SeedClusters`` keeps each seed's slot so that centroids become a differentiable
function of the seed embeddings during an epoch (RALM's stage 2 and its episodes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.clustering import cluster_clicks
from engine.config import WindowConfig

if TYPE_CHECKING:
    from models.ralm import RalmConfig


def window_config(cfg: RalmConfig, k: int | None = None) -> WindowConfig:
    """The clustering worker's window for this model's seeds: ``max_seeds``, ``k`` and
    ``seeds_per_centroid``."""
    return WindowConfig(size=cfg.max_seeds, k=k or cfg.k,
                        seeds_per_centroid=cfg.seeds_per_centroid)


def cluster_seeds(
    cfg: RalmConfig, user: np.ndarray, item: np.ndarray, ts: np.ndarray,
    embeddings: np.ndarray, items: np.ndarray, k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids [len(items), k, h] and counts [len(items), k] of ``items`` after the click
    log (user, item, ts), every click a seed embedded as ``embeddings[user]``: the
    clustering worker's own code (``engine.clustering.cluster_clicks``) on the same seeds
    in time order. Items without seeds keep k empty slots (count 0)."""
    state = cluster_clicks(window_config(cfg, k), item, user, ts, embeddings[user])
    return state.stack(items, embeddings.shape[1])


# ---------------------------------------------------------------- stage 1


class SeedClusters:
    """Every item's seeds with their k-means slot: centroids as a differentiable function.

    k-means itself is not differentiable, but once each seed has its slot
    the centroid is a plain mean of transformed seed embeddings. Keeping the
    assignment fixed for an epoch and taking the means through the
    transforming layer lets the gradient reach it from the seed side too, so
    what the layer learns survives the next re-clustering (with constant
    centroids it only moved the users, and each re-clustering undid that).
    Seeds are stored CSR: ``indptr`` [N+1] into ``users`` and ``slots``.
    """

    def __init__(self, user: np.ndarray, item: np.ndarray, ts: np.ndarray, n_items: int,
                 n_users: int, window: WindowConfig):
        self.k, self.n_users, self.n_items, self.window = window.k, n_users, n_items, window
        self._log = (np.asarray(user, np.int64), np.asarray(item, np.int64), np.asarray(ts))
        self.indptr = np.zeros(n_items + 1, np.int64)
        self.users = np.zeros(0, np.int64)
        self.slots = np.zeros(0, np.int64)

    def recluster(self, z: np.ndarray) -> None:
        """Each item's seeds and their slots after the clicks, embedded as z [n_users, h]:
        the clustering worker's windowed k-means (``engine.clustering``) on the log."""
        user, item, ts = self._log
        state = cluster_clicks(self.window, item, user, ts, z[user])
        users, slots = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        lengths = np.zeros(self.n_items, np.int64)
        for i, st in state.items.items():
            users.append(np.array(st.window.users(), np.int64))
            slots.append(st.labels())
            lengths[i] = len(st.window)
        order = np.argsort(list(state.items), kind="stable")  # CSR by item
        users = [users[0]] + [users[1 + j] for j in order]
        slots = [slots[0]] + [slots[1 + j] for j in order]
        np.cumsum(lengths, out=self.indptr[1:])
        self.users, self.slots = np.concatenate(users), np.concatenate(slots)

    def centroids(
        self, z: torch.Tensor, items: np.ndarray, exclude: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster means of z [n_users, h] for ``items`` [U] -> centroids [U, k, h], mask [U, k].

        ``exclude`` [U]: a user left out of row r's seeds (leave-one-out
        examples: the clicker being predicted is not their own seed).
        """
        lo, hi = self.indptr[items], self.indptr[items + 1]
        lens = hi - lo
        pairs = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        row_of = np.repeat(np.arange(len(items)), lens)
        if exclude is not None:
            keep = self.users[pairs] != np.asarray(exclude)[row_of]
            pairs, row_of = pairs[keep], row_of[keep]
        rows = row_of * self.k + self.slots[pairs]
        counts = np.bincount(rows, minlength=len(items) * self.k)
        avg = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, self.users[pairs]])),
            torch.from_numpy(1.0 / counts[rows]).float(),
            (len(items) * self.k, self.n_users),
            check_invariants=False,  # indices are in range by construction
        )
        cent = torch.sparse.mm(avg, z).view(len(items), self.k, -1)
        return cent, torch.from_numpy(counts.reshape(len(items), self.k) > 0)
