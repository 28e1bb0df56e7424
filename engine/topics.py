"""Topic names, their layout in the dataflow and the key partitioner; created by
``consumers/topics_admin.py``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from kafka.partitioner.default import murmur2

CLICKS = "clicks"
SEED_EVENTS = "seed-events"
SEED_CENTROIDS = "seed-centroids"
SCORE_REQUESTS = "score-requests"
RECOMMENDATIONS = "recommendations"
AUDIENCE_REQUESTS = "audience-requests"  # item id, K: who looks like its seeds
AUDIENCES = "audiences"  # the answers (one partial per scoring worker), keyed by item
MODELS = "models"  # announcements of new checkpoints (hot reload), keyed by model kind
ALL = (CLICKS, SEED_EVENTS, SEED_CENTROIDS, SCORE_REQUESTS, RECOMMENDATIONS,
       AUDIENCE_REQUESTS, AUDIENCES, MODELS)
#: topics whose bad records are dead-lettered to ``<topic>.dlq``
CONSUMED = (CLICKS, SEED_EVENTS, SEED_CENTROIDS, SCORE_REQUESTS, AUDIENCE_REQUESTS, MODELS)
COMPACTED = (SEED_CENTROIDS,)


class KeyPartitions:
    """The partition each id's key (``codec.key_of``) goes to: murmur2, as Kafka's Java
    clients and kafka-python place keyed records (librdkafka: ``partitioner=
    murmur2_random``). Cached per id (kafka-python's murmur2 is pure Python)."""

    def __init__(self, max_cached: int = 1_000_000):
        self.max_cached = max_cached
        self._n = 0
        self._cache: dict[int, int] = {}

    def of(self, ids: np.ndarray, n: int) -> np.ndarray:
        """[len(ids)] partitions of ``n`` for the ids."""
        if n != self._n:
            self._cache.clear()
            self._n = n
        cache = self._cache
        uniq, inverse = np.unique(np.asarray(ids, np.int64), return_inverse=True)
        out = np.empty(len(uniq), np.int64)
        for j, key in enumerate(uniq.tolist()):
            p = cache.get(key)
            if p is None:
                if len(cache) >= self.max_cached:
                    cache.clear()
                p = cache[key] = (murmur2(str(key).encode()) & 0x7FFFFFFF) % n
            out[j] = p
        return out[inverse]


@dataclass(frozen=True)
class Topics:
    """Resolved topic names (with the configured prefix)."""

    prefix: str = ""

    def name(self, base: str) -> str:
        return f"{self.prefix}{base}"

    def dlq(self, base: str) -> str:
        return f"{self.prefix}{base}.dlq"

    @property
    def clicks(self) -> str:
        return self.name(CLICKS)

    @property
    def seed_events(self) -> str:
        return self.name(SEED_EVENTS)

    @property
    def seed_centroids(self) -> str:
        return self.name(SEED_CENTROIDS)

    @property
    def score_requests(self) -> str:
        return self.name(SCORE_REQUESTS)

    @property
    def recommendations(self) -> str:
        return self.name(RECOMMENDATIONS)

    @property
    def audience_requests(self) -> str:
        return self.name(AUDIENCE_REQUESTS)

    def all(self) -> list[str]:
        return [self.name(t) for t in ALL] + [self.dlq(t) for t in CONSUMED]

    def base(self, full: str) -> str:
        """Strip the prefix (metric labels use base names: bounded cardinality)."""
        return full[len(self.prefix):] if full.startswith(self.prefix) else full
