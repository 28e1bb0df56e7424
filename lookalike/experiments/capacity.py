"""The scoring worker's centroid table, whole or sharded by item: memory and request cost
by shard count, simulated at the largest catalogue this machine holds comfortably.

Today every scoring worker reads all of ``seed-centroids``, so each holds the whole
table (about 13 KB per item at k = 20, d = 128: centroids, their Gram matrix, the
global vector, the index's copy of it), and that is where the design stops scaling:
10M items would be ~130 GB in every scoring worker. The design that shards it: items
partitioned over S shards (murmur2 of the item id, as ``seed-centroids`` is keyed),
each holding its slice, and a request answered in two phases:

1. scatter: every shard returns its best ``n`` slots by the index's score (the unit
   user dotted with the item's global vector) with those scores; the gatherer keeps
   the best ``n`` of all (with exact search, the same ``n`` items one whole table
   returns);
2. each shard re-ranks its members of those ``n`` with RALM (``Ranking._ralm_over``,
   the serving code), and the gatherer takes the top ``k``.

Per request, S index searches over N / S items each, and one re-rank of ``n`` items in
all: the re-rank, the larger cost, does not grow with S. The simulation checks the
sharded answers against the whole table's (exact search: equal) and times each phase
per shard (``lookalike study capacity``; docs/capacity.md uses its figures).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from consumers.ranking import Ranking
from engine.centroid_table import CentroidTable
from engine.codec import ItemCentroids
from engine.synthetic import SyntheticSpec, generate
from engine.topics import KeyPartitions
from models.features import FeatureSpace
from models.ralm import RalmConfig, RalmModel

TABLE_ARRAYS = ("item_ids", "centroids", "counts", "global_vec", "gram", "n_seeds",
                "updated_at", "last_seed_ts", "in_ann", "version_ok")


class Shard(Ranking):
    """One scoring shard: its slice of the table and the serving model (the product's
    ranking code over them)."""

    def __init__(self, table: CentroidTable, model: RalmModel):
        self.table, self.model = table, model


@dataclass
class Answer:
    items: list[np.ndarray]  # per user, item ids best first
    scatter_s: list[float]  # per shard: search + cosines
    rerank_s: list[float]  # per shard: RALM over its members of the global shortlist
    gather_s: float


def model(seed: int = 0) -> RalmModel:
    """An untrained RALM at the default shape (cost does not depend on the weights)."""
    torch.manual_seed(seed)
    ds = generate(SyntheticSpec(n_users=200, n_items=200, clicks_per_user=5, seed=seed))
    cfg = RalmConfig(seed=seed)
    return RalmModel.new(cfg, FeatureSpace.build(ds, cfg.history_len), version="capacity")


def build(m: RalmModel, n_items: int, shards: int, exact: bool, seed: int,
          progress: bool) -> list[Shard]:
    """``shards`` tables holding ``n_items`` random items between them (item i on the
    shard murmur2 of its key picks), indexed as the worker indexes them."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n_items, dtype=np.int64)
    owner = KeyPartitions().of(ids, shards) if shards > 1 else np.zeros(n_items, np.int64)
    tables = [CentroidTable(m.k, m.dim, 1, capacity=int((owner == s).sum()) + 1,
                            ann_min_items=n_items + 1 if exact else 10_000)
              for s in range(shards)]
    chunk = 20_000
    for lo in tqdm(range(0, n_items, chunk), desc=f"{shards} shard(s)", disable=not progress):
        hi = min(lo + chunk, n_items)
        cent = rng.normal(size=(hi - lo, m.k, m.dim)).astype(np.float32)
        counts = rng.integers(0, 8, (hi - lo, m.k)).astype(np.float32)
        for j, item in enumerate(range(lo, hi)):
            tables[owner[item]].upsert(item, ItemCentroids(cent[j], counts[j], 10, 0.0))
        for t in tables:
            t.refresh(m.item_global)
    return [Shard(t, m) for t in tables]


def table_bytes(t: CentroidTable) -> int:
    """The arrays one scoring worker holds for its table, and its index's vectors."""
    own = sum(getattr(t, name).nbytes for name in TABLE_ARRAYS)
    index = t._ann.ntotal * (t.dim * 4 + 8) if t._ann is not None else t._index_vecs.nbytes
    return own + index


def answer(shards: list[Shard], users: np.ndarray, n: int, k: int) -> Answer:
    """Two-phase answers for ``users`` (one request at a time, as at batch 1)."""
    items, scatter, rerank, gather = [], np.zeros(len(shards)), np.zeros(len(shards)), 0.0
    for u in users:
        q = u[None]
        unit = q / np.linalg.norm(q)
        found = []
        for s, shard in enumerate(shards):
            t0 = time.perf_counter()
            slots = shard.table.search(q, n)[0]
            slots = slots[slots >= 0]
            found.append((slots, shard.table.global_vec[slots] @ unit[0]))  # the index's IP
            scatter[s] += time.perf_counter() - t0
        t0 = time.perf_counter()
        cos_all = np.concatenate([c for _, c in found])
        owner = np.concatenate([np.full(len(sl), s) for s, (sl, _) in enumerate(found)])
        slot_all = np.concatenate([sl for sl, _ in found])
        keep = np.argsort(-cos_all, kind="stable")[:n]
        gather += time.perf_counter() - t0
        scored_items, scored = [], []
        for s, shard in enumerate(shards):
            mine = slot_all[keep[owner[keep] == s]]
            if not len(mine):
                continue
            t0 = time.perf_counter()
            sc, _ = shard._ralm_over(q, mine[None], False)
            rerank[s] += time.perf_counter() - t0
            scored_items.append(shard.table.item_ids[mine])
            scored.append(sc[0])
        t0 = time.perf_counter()
        all_items, all_scores = np.concatenate(scored_items), np.concatenate(scored)
        order = np.argsort(-all_scores, kind="stable")[:k]
        items.append(all_items[order])
        gather += time.perf_counter() - t0
    r = len(users)
    return Answer(items, (scatter / r).tolist(), (rerank / r).tolist(), gather / r)


def equal_answers(m: RalmModel, n_items: int, shards: int, users: np.ndarray, n: int,
                  k: int, seed: int) -> float:
    """Share of users whose sharded top ``k`` equals the whole table's (exact search)."""
    whole = answer(build(m, n_items, 1, True, seed, False), users, n, k)
    parts = answer(build(m, n_items, shards, True, seed, False), users, n, k)
    return float(np.mean([np.array_equal(a, b) for a, b in zip(whole.items, parts.items,
                                                               strict=True)]))


def run(n_items: int, shard_counts: tuple[int, ...], requests: int, n: int = 200,
        k: int = 10, seed: int = 0, progress: bool = True) -> dict:
    """Memory and per-phase cost by shard count at ``n_items``, and the exactness check."""
    m = model(seed)
    rng = np.random.default_rng(seed + 1)
    users = rng.normal(size=(requests, m.dim)).astype(np.float32)
    check_items = min(n_items, 20_000)
    out: dict = {"items": n_items, "n": n, "k": k, "requests": requests, "seed": seed,
                 "equal_to_whole_table": {}, "by_shards": {}}
    for s in shard_counts:
        if s > 1:
            out["equal_to_whole_table"][s] = equal_answers(m, check_items, s, users[:50], n,
                                                           k, seed)
        shards = build(m, n_items, s, False, seed, progress)
        answer(shards, users[:5], n, k)  # warm-up
        a = answer(shards, users, n, k)
        out["by_shards"][s] = {
            "bytes_per_shard": max(table_bytes(x.table) for x in shards),
            "bytes_per_item": sum(table_bytes(x.table) for x in shards) / n_items,
            "scatter_ms_max_shard": max(a.scatter_s) * 1e3,
            "rerank_ms_max_shard": max(a.rerank_s) * 1e3,
            "scatter_ms_all_shards": sum(a.scatter_s) * 1e3,
            "rerank_ms_all_shards": sum(a.rerank_s) * 1e3,
            "gather_ms": a.gather_s * 1e3,
        }
        del shards
    out["equal_to_whole_table_items"] = check_items
    return out
