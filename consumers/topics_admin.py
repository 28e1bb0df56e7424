"""Creating the dataflow's topics through Kafka's admin API (the names and the layout
are ``engine/topics.py``'s)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from engine.topics import ALL, COMPACTED, CONSUMED, Topics

if TYPE_CHECKING:
    from engine.config import KafkaConfig

log = logging.getLogger(__name__)


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
