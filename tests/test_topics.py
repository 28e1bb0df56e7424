"""Topic settings from config: what ``create_topics`` asks the broker for."""

from __future__ import annotations

import pytest
from kafka import KafkaAdminClient
from pydantic import ValidationError

from consumers.topics_admin import create_topics, topic_specs
from engine.config import KafkaConfig, load_settings
from engine.topics import ALL, Topics


def test_topics_carry_the_configured_replication_and_retention():
    cfg = KafkaConfig(topic_prefix="p-", partitions=3, replication_factor=3,
                      min_insync_replicas=2,
                      retention_ms={"clicks": -1, "seed-events": 604_800_000})
    specs = {t.name: t for t in topic_specs(cfg)}
    assert set(Topics("p-").all()) <= set(specs)
    for t in specs.values():
        assert t.replication_factor == 3
        assert t.topic_configs["min.insync.replicas"] == "2"
    assert specs["p-clicks"].topic_configs["retention.ms"] == "-1"
    assert specs["p-seed-events"].topic_configs["retention.ms"] == "604800000"
    assert "retention.ms" not in specs["p-recommendations"].topic_configs
    assert specs["p-seed-centroids"].topic_configs["cleanup.policy"] == "compact"
    assert specs["p-clicks"].num_partitions == 3 and specs["p-clicks.dlq"].num_partitions == 1


def test_defaults_leave_retention_and_min_insync_to_the_broker():
    specs = topic_specs(KafkaConfig())
    assert all(t.replication_factor == 1 for t in specs)
    assert all(set(t.topic_configs) <= {"cleanup.policy"} for t in specs)


def test_impossible_topic_settings_are_refused_with_the_reason():
    with pytest.raises(ValidationError, match="no write could succeed"):
        KafkaConfig(replication_factor=1, min_insync_replicas=2)
    with pytest.raises(ValidationError, match="unknown topics"):
        KafkaConfig(retention_ms={"click": 1000})


def test_retention_is_set_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOOKALIKE_KAFKA__RETENTION_MS", '{"clicks": -1}')
    assert load_settings(None).kafka.retention_ms == {"clicks": -1}


def test_the_embedded_broker_takes_topics_with_settings(settings):
    cfg = settings.kafka.model_copy(update={"topic_prefix": "ret-",
                                            "retention_ms": {b: -1 for b in ALL[:2]}})
    created = create_topics(cfg)
    assert set(Topics("ret-").all()) <= set(created)
    admin = KafkaAdminClient(**cfg.client_options())
    try:
        assert set(Topics("ret-").all()) <= set(admin.list_topics())
    finally:
        admin.close()
