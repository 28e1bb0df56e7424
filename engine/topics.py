"""Topic names and their creation: the layout of the dataflow in DESIGN.md."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.partitioner.default import murmur2

if TYPE_CHECKING:
    from engine.config import KafkaConfig


log = logging.getLogger(__name__)

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


def topic_specs(cfg: KafkaConfig) -> list[NewTopic]:
    """Every topic of the dataflow as ``create_topics`` makes it: the configured partition
    count, replication, ``min.insync.replicas`` and retention; ``seed-centroids``
    compacted (the latest record per item is the table); one partition per dead-letter
    topic."""
    topics = Topics(cfg.topic_prefix)
    common = ({"min.insync.replicas": str(cfg.min_insync_replicas)}
              if cfg.min_insync_replicas else {})
    out = []
    for base in ALL:
        configs = dict(common)
        if base in COMPACTED:
            configs["cleanup.policy"] = "compact"
        if base in cfg.retention_ms:
            configs["retention.ms"] = str(cfg.retention_ms[base])
        out.append(NewTopic(topics.name(base), cfg.partitions, cfg.replication_factor,
                            topic_configs=configs))
    for base in CONSUMED:
        out.append(NewTopic(topics.dlq(base), 1, cfg.replication_factor,
                            topic_configs=dict(common)))
    return out


def create_topics(cfg: KafkaConfig, timeout_s: float = 30.0) -> list[str]:
    """Create every topic of the dataflow; existing ones are left alone.

    User-keyed topics (clicks, score-requests, recommendations) share one
    partition count so a scoring worker owns the same users on all of them.
    """
    admin = KafkaAdminClient(
        **cfg.client_options(),
        client_id=f"{cfg.client_id}-admin",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        existing = set(admin.list_topics())
        wanted = topic_specs(cfg)
        new = [t for t in wanted if t.name not in existing]
        for t in new:  # one by one: a concurrent creator must not fail the rest
            try:
                admin.create_topics([t])
            except TopicAlreadyExistsError:
                pass
        log.info("topics ready (%d created, %d existed)", len(new), len(wanted) - len(new))
        return [t.name for t in new]
    finally:
        admin.close()


def create_topic(cfg: KafkaConfig, name: str, partitions: int = 1, timeout_s: float = 30.0) -> None:
    """One extra topic by its full name (benchmarks' probe topics); an existing one is kept."""
    admin = KafkaAdminClient(**cfg.client_options(),
                             client_id=f"{cfg.client_id}-admin",
                             request_timeout_ms=int(timeout_s * 1000))
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
