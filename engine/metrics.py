"""Prometheus metrics of one worker, served over HTTP.

Each worker owns a registry (several workers may share a process in tests and
in ``lookalike run --threads``). Names follow the Prometheus conventions:
``lookalike_`` prefix, base units, counters end in ``_total``; labels are
bounded (stage, topic base name, reason, partition), never user or item ids.
Hot paths count per batch, with label children bound once.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

from engine import __version__

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


@dataclass
class WorkerMetrics:
    """Every metric a stage may set; a stage uses the ones that apply to it."""

    stage: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, s = self.registry, ["stage"]
        self.build_info = Info("lookalike_build", "Versions of this worker", s, registry=r)
        self.consumed = Counter(
            "lookalike_events_consumed_total", "Records read, by topic", s + ["topic"], registry=r
        )
        self.produced = Counter(
            "lookalike_events_produced_total",
            "Logical records written, by topic (internal topics pack several per message)",
            s + ["topic"], registry=r,
        )
        self.batches = Counter(
            "lookalike_batches_produced_total", "Record batches the broker acknowledged, by "
            "topic (rate: batches/s; a broker's cost per request grows with them, "
            "kafka.linger_ms bounds them)", s + ["topic"], registry=r,
        )
        self.dead_letters = Counter(
            "lookalike_dead_letters_total", "Records sent to <topic>.dlq, by reason",
            s + ["topic", "reason"], registry=r,
        )
        self.errors = Counter(
            "lookalike_errors_total", "Transient faults retried (broker unavailable...)",
            s + ["kind"], registry=r,
        )
        self.misrouted = Counter(
            "lookalike_misrouted_total", "Records read from a partition that is not their "
            "user's (another partitioner, a null or wrong key): forwarded to the right one",
            s + ["topic"], registry=r,
        )
        self.resent = Counter(
            "lookalike_records_resent_total", "Output records sent again because a record "
            "of their batch was not acknowledged (the batch's inputs stay uncommitted)",
            s, registry=r,
        )
        self.undelivered = Gauge(
            "lookalike_undelivered_records", "Output records sent and not yet acknowledged by "
            "the broker after the last flush (0 once a batch is delivered and committed)",
            s, registry=r,
        )
        self.broker_up = Gauge(
            "lookalike_broker_up", "1 if the worker reaches a Kafka broker, else 0 (checked "
            "with the lag, every few seconds)", s, registry=r,
        )
        self.lag = Gauge(
            "lookalike_consumer_lag_messages", "High watermark minus position",
            s + ["topic", "partition"], registry=r,
        )
        self.assigned = Gauge(
            "lookalike_assigned_partitions", "Partitions this group member owns", s, registry=r
        )
        self.restoring = Gauge(
            "lookalike_partitions_restoring", "Assigned partitions whose state is still being "
            "restored (snapshot or log replay): not yet polled, so their lag is not yet known",
            s, registry=r,
        )
        self.kept_partitions = Counter(
            "lookalike_partitions_kept_total", "Partitions a rebalance revoked and gave back "
            "to this member whose state was used as it was (no restore)", s, registry=r,
        )
        self.batch_seconds = Histogram(
            "lookalike_batch_seconds", "Time to process one poll batch", s,
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.window_items = Gauge(
            "lookalike_seed_window_items", "Items with a seed window on this worker", s, registry=r
        )
        self.window_seeds = Gauge(
            "lookalike_seed_window_seeds", "Seeds held in all windows of this worker", s,
            registry=r,
        )
        self.stale_seeds = Counter(
            "lookalike_stale_seeds_total", "Seeds of an older model version than their "
            "item's window, dropped (a rolling reload, or a worker that refused a new model)",
            s, registry=r,
        )
        self.window_bytes = Gauge(
            "lookalike_seed_window_bytes", "Bytes of seed embeddings held", s, registry=r
        )
        self.kmeans_seconds = Histogram(
            "lookalike_kmeans_refresh_seconds", "Centroid update time per batch of items", s,
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.seed_events = Counter(
            "lookalike_seed_events_total", "Seed events offered to the windows, a replayed one "
            "too (a seed-events record packs many: lookalike_events_consumed_total counts "
            "records)", s, registry=r,
        )
        self.refreshes = Counter(
            "lookalike_kmeans_refreshes_total", "Item centroid refreshes (Lloyd steps on the "
            "window) run by the clustering worker", s, registry=r,
        )
        self.refresh_backlog = Gauge(
            "lookalike_refresh_backlog_items",
            "Items due for a centroid refresh that wait for the refresh budget", s, registry=r,
        )
        self.centroids_published = Counter(
            "lookalike_centroids_published_total", "Item centroid tables published", s, registry=r
        )
        self.centroid_backlog = Gauge(
            "lookalike_centroid_backlog_items",
            "Items whose changed centroids wait for the publish budget", s, registry=r,
        )
        self.centroid_backlog_age = Gauge(
            "lookalike_centroid_backlog_age_seconds",
            "Seconds the oldest unpublished centroid change has waited", s, registry=r,
        )
        self.centroid_items = Gauge(
            "lookalike_centroid_table_items", "Items in the scoring worker's centroid table", s,
            registry=r,
        )
        self.centroid_age = Gauge(
            "lookalike_centroid_age_seconds",
            "Seconds since the newest centroid update this worker has seen", s, registry=r,
        )
        self.users = Gauge(
            "lookalike_user_states", "Users whose recent clicks this worker holds", s, registry=r
        )
        self.score_seconds = Histogram(
            "lookalike_scoring_latency_seconds",
            "Worker-side time from poll to recommendation, per request", s,
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.index_recall = Histogram(
            "lookalike_index_recall",
            "Share of the exact shortlist the approximate item index returned, on sampled "
            "requests (scoring.recall_sample_every)", s,
            buckets=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0), registry=r,
        )
        self.recommendations = Counter(
            "lookalike_recommendations_total", "Recommendation records emitted", s, registry=r
        )
        self.requests_first = Counter(
            "lookalike_requests_first_total",
            "Polls for which a scoring worker paused its clicks partitions because score "
            "requests were waiting (requests before clicks)", s, registry=r,
        )
        self.swap_wait = Gauge(
            "lookalike_model_swap_wait_seconds", "The last model swap: seconds from the new "
            "model loaded to it serving (its centroids covering scoring.reload_min_coverage)",
            s, registry=r,
        )
        self.model_reloads = Counter(
            "lookalike_model_reloads_total",
            "Model hot reloads, by outcome (loaded, rejected: the old model kept serving)",
            [*s, "outcome"], registry=r,
        )
        self.audiences = Counter(
            "lookalike_audiences_total", "Audience records emitted (kind: request or periodic)",
            [*s, "kind"], registry=r,
        )
        self.audience_seconds = Histogram(
            "lookalike_audience_seconds", "Time to compute one item's audience on this worker",
            s, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.freshness = Histogram(
            "lookalike_click_to_recommendation_seconds",
            "Click produced -> its seed reflected in centroids the scoring worker serves",
            s, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.build_info.labels(self.stage).info(
            {"version": __version__, "python": platform.python_version()}
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> tuple[WSGIServer, int]:
        """Start the /metrics HTTP endpoint; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server, int(server.server_port)
