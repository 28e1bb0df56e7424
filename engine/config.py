"""Typed settings, one object per component.

Every setting has a default that works on a laptop. Values come, in rising
priority, from the defaults here, a TOML file (``--config``), environment
variables (``LOOKALIKE_<SECTION>__<FIELD>``, e.g. ``LOOKALIKE_KAFKA__PARTITIONS=4``)
and command-line options.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_TOML_FILE: ContextVar[Path | None] = ContextVar("lookalike_toml_file", default=None)


def default_cache_dir() -> Path:
    """Where fetched data, checkpoints and run artifacts live (never in git)."""
    env = os.environ.get("LOOKALIKE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lookalike"


#: ``kafka.linger_ms`` by default: internal topics and dead letters wait, answers do not
DEFAULT_LINGER_MS = {"seed-events": 50, "seed-centroids": 50, "dlq": 100}


class KafkaConfig(BaseModel):
    """Where the broker is and how the topics are laid out."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = Field("", description="prepended to every topic name (tests isolate runs)")
    partitions: int = Field(2, ge=1)
    client_id: str = "lookalike"
    max_message_bytes: int = Field(
        64 * 1024, description="larger external events are dead-lettered"
    )
    replication_factor: int = Field(
        1, ge=1, description="replicas of every topic the engine creates (3 on a production "
        "cluster; the embedded broker is one node)")
    min_insync_replicas: int | None = Field(
        None, ge=1, description="min.insync.replicas of the created topics (producers use "
        "acks=all); unset: the broker's default")
    retention_ms: dict[str, int] = Field(
        default_factory=dict, description="retention.ms by base topic name (-1: keep all); "
        "unset: the broker's default. Recovery re-reads clicks and seed-events "
        "(docs/operations.md, Recovery)")
    max_poll_interval_ms: int = Field(
        10_000, ge=1_000, description="a worker that does not poll for this long leaves its "
        "group; long work (a restore from the log) is spread over polls to stay within it. "
        "Also the join's rebalance timeout on the embedded broker")
    session_timeout_ms: int = Field(
        10_000, ge=1_000, description="a worker killed without leaving its group is "
        "evicted after this long, and its partitions move to the others (a broker may "
        "bound it: Kafka's group.min/max.session.timeout.ms, 6 s to 30 min by default). "
        "Heartbeats go every tenth of it")
    linger_ms: dict[str, int] = Field(
        default_factory=lambda: dict(DEFAULT_LINGER_MS),
        description="how long a worker holds its outputs to a topic (base name; \"dlq\" "
        "for every dead-letter topic) before it sends them, flushes and commits: one batch "
        "per partition per linger instead of one per poll, so at most 1000 / linger_ms "
        "batches a second per partition (the embedded broker's cost grows with the batches "
        "it holds). Topics not named go at once, with the producer's 5 ms linger. Internal "
        "topics wait inside the 2 s freshness budget; answers (recommendations, audiences) "
        "do not wait")
    batch_bytes: int = Field(
        960 * 1024, ge=16 * 1024, description="the workers' largest record batch per "
        "partition: a publish of many items' centroids (~5 KB each) goes in few batches. "
        "The default stays under Kafka's default message.max.bytes (1 MiB)")
    delivery_timeout_ms: int = Field(
        120_000, ge=1_000, description="a record the broker has not acknowledged by then "
        "fails; the worker sends its batch's outputs again and commits nothing meanwhile")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = Field(
        None, description="kept secret: masked in logs, reprs and dumps; given only to clients")
    ssl_cafile: Path | None = Field(None, description="CA bundle to verify the brokers")
    ssl_certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="the client certificate's key")
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _topic_settings(self) -> KafkaConfig:
        from engine.topics import ALL

        if self.min_insync_replicas and self.min_insync_replicas > self.replication_factor:
            raise ValueError(f"min_insync_replicas ({self.min_insync_replicas}) is more than "
                             f"replication_factor ({self.replication_factor}): no write could "
                             "succeed with acks=all")
        for name, known in (("retention_ms", ALL), ("linger_ms", (*ALL, "dlq"))):
            unknown = sorted(set(getattr(self, name)) - set(known))
            if unknown:
                raise ValueError(f"{name} names unknown topics {unknown}; topics: "
                                 f"{', '.join(known)}")
        negative = sorted(t for t, ms in self.linger_ms.items() if ms < 0)
        if negative:
            raise ValueError(f"linger_ms must be >= 0 (0: send at once); negative for {negative}")
        return self

    def client_options(self) -> dict[str, Any]:
        """What every Kafka client (producer, consumer, admin) is given: where the
        brokers are and how to authenticate. The one place the password is revealed."""
        opts: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers,
                                "security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            opts["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            opts["sasl_plain_username"] = self.sasl_plain_username
            opts["sasl_plain_password"] = (self.sasl_plain_password.get_secret_value()
                                           if self.sasl_plain_password else None)
        if self.security_protocol.endswith("SSL"):
            opts["ssl_check_hostname"] = self.ssl_check_hostname
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                value = getattr(self, name)
                if value is not None:
                    opts[name] = str(value)
        return opts


class WindowConfig(BaseModel):
    """Per-item seed window and its centroids."""

    size: int = Field(256, ge=1, description="most recent distinct seed users kept per item")
    k: int = Field(20, ge=1, le=1024, description="centroids per item")
    seeds_per_centroid: int = Field(
        1, ge=1, description="a seed opens a new centroid only while the item has fewer "
        "than ceil(seeds / this) of them (at most k): 1 opens one per seed until k; 5 keeps "
        "an item with 5 seeds at one centroid, its seed mean")
    refresh_every: int = Field(
        64, ge=1, description="an item's centroids get a Lloyd refresh (its seeds relabelled "
        "to their nearest centroid) after this many accepted seeds (engine/kmeans.py)")
    refresh_iters: int = Field(
        2, ge=1, description="Lloyd steps per refresh at most (fewer when no label changes)")
    refresh_items_per_s: float = Field(
        2_000, gt=0, description="most item refreshes a clustering worker runs per second "
        "(~9k full windows/s fit in one core). Beyond it, due items wait, oldest first, and "
        "lookalike_refresh_backlog_items shows them; an item refreshed late gets centroids "
        "that differ from the offline path's for the same seeds")
    vector_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="how window vectors are stored; float16 halves the biggest part of a "
        "clustering worker's memory (a full window: size x dim x 2 bytes, plus 32 bytes "
        "of bookkeeping per seed)",
    )
    centroid_wire_dtype: Literal["float32", "float16"] = Field(
        "float16", description="centroids on seed-centroids: float16 halves each record "
        "(kafka-python sends ~1.5x more of them per second); values are cosine inputs, "
        "float16's 3 digits are plenty")
    publish_interval_s: float = Field(
        0.2, ge=0, description="an item's centroids are published at most this often "
        "(changes in between are coalesced); adds at most this much to freshness",
    )
    max_items: int = Field(
        200_000, ge=1, description="items a clustering worker keeps windows for; beyond it "
        "the least recently seeded go (a tombstone on seed-centroids takes them out of "
        "serving). Item ids are open-ended (new items arrive in the stream): this bounds a "
        "worker's memory at max_items x the window bound")
    publish_items_per_s: float = Field(
        2_000, gt=0, description="most item centroid records a clustering worker publishes "
        "per second (~5 KB each at 20 x 128 float16). Beyond it, changed items wait, "
        "oldest change first, and lookalike_centroid_backlog_* show it: kafka-python's "
        "producer sends ~6k such records/s with a whole core, so without a budget "
        "publishing starves the seed windows under load")


#: candidate sources every worker has: Faiss over RALM's item vectors, and the items
#: with the most seeds now (for users with no clicks); zoo models come from scoring.models
BUILTIN_SOURCES = ("ralm", "popular")


class PipelineConfig(BaseModel):
    """One serving pipeline: where candidates come from, and what orders them.

    ``sources``: "ralm" (Faiss over RALM item vectors), "popular", or the name of
    a zoo model in ``scoring.models`` (e.g. a SASRec checkpoint: next items from
    the user's live click sequence). ``ranker``: "ralm" (the look-alike
    attention score; candidates without centroids are dropped), a source's own
    scores (its name), a CTR model of ``scoring.rankers`` (DLRM, FM, LR: P(click)
    from the user's id and profile and the item), or "blend" (``blend`` weights
    over standardised scores of any of these).
    """

    sources: list[str] = Field(default_factory=lambda: ["ralm"], min_length=1)
    ranker: str = "ralm"
    blend: dict[str, float] = Field(default_factory=dict)
    per_source: int = Field(200, ge=1, description="candidates each source proposes")


#: what requests naming no pipeline get: RALM's candidates and popular items, ranked by a
#: blend of standardised RALM score and log(1 + seeds), popularity weighted 8 (chosen on a
#: validation split of ml-100k's training period; `lookalike evaluate default-pipeline`)
DEFAULT_PIPELINE = PipelineConfig(sources=["ralm", "popular"], ranker="blend",
                                  blend={"ralm": 1.0, "popular": 8.0})


class ScoringConfig(BaseModel):
    """Scoring worker: user state, retrieval and ranking."""

    history_len: int = Field(50, ge=1, description="recent clicks kept per user")
    max_users: int = Field(1_000_000, ge=1, description="users held per worker (LRU beyond)")
    max_seen: int = Field(
        500, ge=1, description="a user's last N clicked items are never re-recommended "
        "(8 bytes each per user: with max_users this bounds the user state)")
    top_k: int = Field(10, ge=1)
    max_k: int = Field(500, ge=1, description="largest K a request may ask for")
    candidates: int = Field(200, ge=1, description="Faiss candidates ranked by RALM attention")
    max_click_pause_s: float = Field(
        0.5, ge=0, description="while score requests wait, clicks are paused (requests "
        "first), but never longer than this in a row: a steady request stream cannot "
        "starve the clicks (and freshness)")
    index_refresh_s: float = Field(
        0.1, gt=0, description="apply received centroids to the item index at most this "
        "often (adds at most this much to freshness; the IVF index updates in place, the "
        "exact one below ann_min_items is rebuilt: ~2 ms at 10k items)")
    ann_min_items: int = Field(
        10_000, ge=1, description="from this many servable items on, retrieval uses an IVF "
        "index (approximate, ~10x faster at 43.5k items) instead of exact search")
    ann_nprobe: int = Field(32, ge=1, description="IVF lists scanned per query (recall vs speed)")
    recall_sample_every: int = Field(
        200, ge=0, description="one request in this many is also searched exactly, and the "
        "approximate index's recall goes to lookalike_index_recall (0: never)")
    ann_lists: int | None = Field(
        None, ge=1, description="IVF lists (None: 4 x sqrt(servable items) when it is built)")
    min_seeds: int = Field(
        5, ge=1, description="an item needs this many seeds to be recommended "
        "(1-seed items score high on one look-alike; 5 lifts prec@10 on ml-100k)"
    )
    threads: int = Field(1, ge=1, description="torch/Faiss threads (1 is fastest at batch 1 here)")
    models: dict[str, Path] = Field(
        default_factory=dict, description="zoo checkpoints the worker serves besides RALM, by "
        "the name pipelines use (e.g. sasrec = \"~/.cache/lookalike/zoo/sasrec/model.pt\")")
    rankers: dict[str, Path] = Field(
        default_factory=dict, description="CTR checkpoints (`lookalike train dlrm|fm|lr`) that "
        "order a pipeline's candidates by P(click | user, profile, item), by the name "
        "pipelines use as ranker or blend term (e.g. dlrm = \"~/.cache/lookalike/.../x.pt\")")
    pipelines: dict[str, PipelineConfig] = Field(
        default_factory=lambda: {"default": DEFAULT_PIPELINE.model_copy(deep=True),
                                 "ralm": PipelineConfig()},
        description="named serving pipelines; a request picks one with \"pipeline\". "
        "The default blends RALM with popularity (measured: `lookalike evaluate "
        "default-pipeline`, README); \"ralm\" is RALM alone")
    default_pipeline: str = Field("default", description="the pipeline of requests naming none")
    model_dirs: list[Path] = Field(
        default_factory=list, description="folders a `models` topic announcement may point "
        "into (besides <cache_dir>/checkpoints and the folder of the worker's --checkpoint): "
        "anyone who can write the topic must not make the workers read any file they can")
    reload_check_s: float = Field(
        2.0, ge=0, description="re-check the checkpoint file (or checkpoint_dir's latest) this "
        "often and hot-reload a new one (0: only on a `models` topic announcement)")
    reload_min_coverage: float = Field(
        0.95, ge=0, le=1, description="a reloaded model serves once the centroid table has "
        "its version's centroids for this share of the items the serving model serves; until "
        "then the old model serves with its own (0: swap at once)")
    reload_max_wait_s: float = Field(
        120.0, ge=0, description="a reloaded model serves after this long whatever its "
        "coverage (items whose seeds no held user can re-send never move over)")
    audience_k: int = Field(100, ge=1, description="users per audience when a request gives no k")
    audience_max_k: int = Field(10_000, ge=1, description="largest k an audience request may ask")
    audience_candidates: int = Field(
        2000, ge=1, description="users shortlisted by cosine to the item's global vector, then "
        "re-ranked by the full RALM score (the item's seeds are dropped in between)")
    audience_every_s: float = Field(
        0.0, ge=0, description="periodic mode: every this many seconds, publish the audiences of "
        "items whose centroids changed (0: only on request)")
    audience_items_per_s: float = Field(
        20.0, gt=0, description="periodic mode's budget: items whose audience is published per "
        "second at most (the first changed go first; the rest wait)")
    pack_seeds: bool = Field(
        True, description="seed-events as one S2 message per partition and poll, not one S1 "
        "message per item: kafka-python's producer sends ~15k messages/s at best, and a poll "
        "touches nearly one item per click (clustering workers read both)")

    @model_validator(mode="after")
    def _pipelines_refer_to_known_parts(self) -> ScoringConfig:
        known = {*BUILTIN_SOURCES, *self.models}
        both = sorted((set(self.models) | set(BUILTIN_SOURCES)) & set(self.rankers))
        if both:
            raise ValueError(f"scoring.rankers reuses the name(s) {both} of a source or zoo "
                             "model: give the CTR ranker another name")
        for name, p in self.pipelines.items():
            bad = [s for s in p.sources if s not in known]
            if bad:
                raise ValueError(f"pipeline {name!r}: unknown source(s) {bad}; sources are "
                                 f"{sorted(known)} (zoo models come from scoring.models)")
            terms = {"ralm", *p.sources, *self.models, *self.rankers}
            if p.ranker not in {"blend", *terms}:
                raise ValueError(f"pipeline {name!r}: ranker {p.ranker!r} must be 'ralm', "
                                 f"'blend', one of its sources {p.sources}, a zoo model "
                                 f"{sorted(self.models)} or a CTR ranker of scoring.rankers "
                                 f"{sorted(self.rankers)}")
            if p.ranker == "blend" and (not p.blend or set(p.blend) - terms):
                raise ValueError(f"pipeline {name!r}: a blend needs weights over 'ralm', "
                                 f"its sources {p.sources}, zoo models {sorted(self.models)} "
                                 f"or CTR rankers {sorted(self.rankers)}, got {p.blend}")
        if self.default_pipeline not in self.pipelines:
            raise ValueError(f"default_pipeline {self.default_pipeline!r} is not among the "
                             f"pipelines {sorted(self.pipelines)}")
        return self


class SnapshotConfig(BaseModel):
    """State snapshots of the stateful workers (consumers/snapshots.py)."""

    every_s: float = Field(
        30.0, ge=0, description="write each assigned partition's state (with the offset it "
        "reflects) this often, and on a clean stop; a restarted or newly assigned worker then "
        "re-reads only what came after it (0: no snapshots, state rebuilt from the log)")
    dir: Path | None = Field(
        None, description="where (default: <cache_dir>/snapshots); a volume every worker of a "
        "stage mounts lets a partition's new owner start from its old owner's snapshot")


class MetricsConfig(BaseModel):
    port: int = Field(0, ge=0, description="Prometheus HTTP port; 0 picks a free one")
    addr: str = Field("127.0.0.1", description="address /metrics binds to: loopback unless "
                      "you mean to expose it (0.0.0.0 in a container)")


class Settings(BaseSettings):
    """All settings of one process."""

    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", env_nested_delimiter="__")

    cache_dir: Path = Field(default_factory=default_cache_dir)
    kafka: KafkaConfig = KafkaConfig()
    window: WindowConfig = WindowConfig()
    scoring: ScoringConfig = ScoringConfig()
    snapshots: SnapshotConfig = SnapshotConfig()
    metrics: MetricsConfig = MetricsConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        toml = _TOML_FILE.get()
        if toml is not None:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=toml),)
        return sources

    @property
    def checkpoint_dir(self) -> Path:
        return self.cache_dir / "checkpoints"

    @property
    def data_dir(self) -> Path:
        return self.cache_dir / "data"


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Defaults < TOML file < environment < explicit overrides (dotted keys, from the CLI)."""
    if path is not None and not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    token = _TOML_FILE.set(path)
    try:
        merged = Settings().model_dump()
    finally:
        _TOML_FILE.reset(token)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = merged
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return Settings.model_validate(merged)
