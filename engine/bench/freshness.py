"""Freshness: a click produced -> its seed in the item's published centroids -> a
recommendation that reflects it.

RALM's production system refreshes its seed clusters every 5 minutes; the
target here is p99 <= 2 s on the embedded broker. The workers run as their own
processes (``lookalike worker``), as in ``lookalike run``.

One probe: a fresh user A with profile P clicks H (ten popular items) and then
a probe item X that nobody has clicked yet; a twin B with the same profile
clicks H only. A is then X's only seed, so X's centroids are A's embedding,
which is nearly B's: X enters B's recommendations as soon as the scoring
worker has X's centroids. From the moment A's click on X is produced the bench
reads ``seed-centroids`` (leg 1: X published) and asks for B's
recommendations every ``ask_every_s`` (leg 2: the first answer listing X).
The baseline measured in the same run is the raw kafka-python produce ->
consume round trip through the same broker; the ratio of the two p99s says
how many broker round trips freshness costs.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from kafka import KafkaConsumer
from tqdm.auto import tqdm

from consumers.kafka import assign_all, make_consumer, make_producer
from consumers.replay import profiles_of, replay
from engine.bench.report import BenchOptions, BenchReport
from engine.broker import EmbeddedBroker
from engine.codec import (
    Click,
    Profile,
    decode_centroids,
    decode_key,
    encode_click,
    encode_json,
    key_of,
)
from engine.config import Settings
from engine.data import Dataset, load_dataset
from engine.pipeline import WorkerProcess, ensure_checkpoint, spawn_worker, wait_drained, wait_ready
from engine.scrape import quantile_from_histogram, scrape
from engine.topics import Topics, create_topic, create_topics

A_BASE, B_BASE = 70_000_000, 80_000_000  # user ids no dataset uses


@dataclass
class Sizes:
    warmup_clicks: int
    probes: int
    round_trips: int
    timeout_s: float = 10.0
    ask_every_s: float = 0.05
    history: int = 10


FULL, QUICK = Sizes(50_000, 40, 200), Sizes(3_000, 4, 30)


@dataclass
class Probe:
    item: int
    clicked_at: float
    published_at: float | None = None
    reflected_at: float | None = None
    asked: dict[str, float] = field(default_factory=dict)


def run(opts: BenchOptions) -> BenchReport:
    sizes = QUICK if opts.quick else FULL
    s = opts.settings
    ds = load_dataset("ml-100k", s.data_dir)
    train, _ = ds.time_split(0.8)
    ckpt = _checkpoint(s, train, opts.quick)
    run_dir = opts.out_dir / "freshness-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    report = BenchReport("freshness", settings={"sizes": sizes.__dict__, "checkpoint": ckpt.name})
    broker = None
    workers: list[WorkerProcess] = []
    try:
        bootstrap = opts.bootstrap_servers
        if bootstrap is None:
            broker = EmbeddedBroker(log_file=run_dir / "broker.log").start()
            bootstrap = broker.bootstrap_servers
        s = _bench_settings(s, bootstrap)
        create_topics(s.kafka)
        env = {"LOOKALIKE_SCORING__MIN_SEEDS": "1"}
        workers = [spawn_worker(kind, s, ckpt, run_dir, 0, env)
                   for kind in ("clustering", "scoring")]
        wait_ready(workers)
        rep = replay(ds, s.kafka, limit=sizes.warmup_clicks, progress=False)
        wait_drained(workers[1:], workers[:1], rep.events, timeout_s=300)
        rtt = round_trips(s, sizes.round_trips)
        before = scrape(workers[1].metrics_url)
        probes = run_probes(s, ds, sizes)
        server = _minus(scrape(workers[1].metrics_url), before)  # the probes' share only
    finally:
        for w in workers:
            w.stop()
        if broker is not None:
            broker.stop()
    _figures(report, probes, rtt, server)
    return report


def _checkpoint(s: Settings, train: Dataset, quick: bool) -> Path:
    """The latest checkpoint; quick runs train a tiny one in seconds when there is none."""
    if not quick:
        return ensure_checkpoint(s, train, retrain=False)
    from models.ralm import RalmConfig
    from models.train_ralm import latest_checkpoint, train_ralm

    found = latest_checkpoint(s.checkpoint_dir)
    if found is not None:
        return found
    return train_ralm(train, RalmConfig.tiny(), s.checkpoint_dir, progress=False,
                      log=lambda *_: None)


def _bench_settings(s: Settings, bootstrap: str) -> Settings:
    prefix = f"bench-fresh-{uuid.uuid4().hex[:6]}-"
    return s.model_copy(update={"kafka": s.kafka.model_copy(
        update={"bootstrap_servers": bootstrap, "topic_prefix": prefix})})


# ---------------------------------------------------------------- the baseline


def round_trips(s: Settings, n: int) -> np.ndarray:
    """[n] seconds of a raw kafka-python produce -> consume round trip, one at a time."""
    topic = Topics(s.kafka.topic_prefix).name("bench-rtt")
    create_topic(s.kafka, topic)
    consumer = _tail(s, topic)
    producer = make_producer(s.kafka, linger_ms=0)
    out = np.empty(n)
    for i in tqdm(range(n), desc="raw round trips", leave=False):
        sent = time.perf_counter()
        producer.send(topic, value=str(i).encode())
        producer.flush()
        while not any(r.value == str(i).encode() for recs in consumer.poll(timeout_ms=100).values()
                      for r in recs):
            pass
        out[i] = time.perf_counter() - sent
    producer.close()
    consumer.close()
    return out


def _tail(s: Settings, topic: str) -> KafkaConsumer:
    """A group-less consumer at the end of every partition of ``topic``."""
    c = make_consumer(s.kafka, None, fetch_max_wait_ms=10)
    assign_all(c, topic)
    return c


# ---------------------------------------------------------------- the probes


def probe_items(ds: Dataset, warmup: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Catalogue items nobody clicked in the warm-up: their first seed is the probe's."""
    clicked = np.unique(ds.item[:warmup])
    cold = np.setdiff1d(np.arange(len(ds.items.ids)), clicked)
    if len(cold) < n:
        raise ValueError(f"only {len(cold)} unclicked items for {n} probes; warm up less")
    return ds.items.ids[rng.choice(cold, size=n, replace=False)]


def run_probes(s: Settings, ds: Dataset, sizes: Sizes) -> list[Probe]:
    names = Topics(s.kafka.topic_prefix)
    rng = np.random.default_rng(0)
    items = probe_items(ds, sizes.warmup_clicks, sizes.probes, rng)
    popular = ds.items.ids[np.argsort(-np.bincount(ds.item[:sizes.warmup_clicks]))]
    profiles = profiles_of(ds)
    producer = make_producer(s.kafka, linger_ms=0)
    centroids = _tail(s, names.seed_centroids)
    recs = _tail(s, names.recommendations)
    probes = []
    try:
        for j, item in enumerate(tqdm(items, desc="freshness probes", leave=False)):
            profile = profiles[int(rng.integers(len(profiles)))]
            history = popular[rng.permutation(3 * sizes.history)[:sizes.history]]
            a, b = A_BASE + j, B_BASE + j
            for user in (a, b):
                for h in history:
                    _click(producer, names.clicks, user, int(h), profile)
            producer.flush()
            time.sleep(0.5)  # the twins' histories are in the scoring worker's state
            probes.append(_probe(producer, names, centroids, recs, a, b, int(item), profile, sizes))
    finally:
        producer.close()
        centroids.close()
        recs.close()
    return probes


def _click(producer, topic: str, user: int, item: int, profile: Profile) -> float:
    now = time.time()
    producer.send(topic, key=key_of(user), value=encode_click(Click(user, item, now, profile)))
    return now


def _probe(producer, names: Topics, centroids: KafkaConsumer, recs: KafkaConsumer, a: int,
           b: int, item: int, profile: Profile, sizes: Sizes) -> Probe:
    p = Probe(item, _click(producer, names.clicks, a, item, profile))
    producer.flush()
    next_ask = 0.0
    deadline = p.clicked_at + sizes.timeout_s
    while p.reflected_at is None and time.time() < deadline:
        now = time.time()
        if now >= next_ask:
            rid = uuid.uuid4().hex[:12]
            p.asked[rid] = now
            producer.send(names.score_requests, key=key_of(b),
                          value=encode_json({"user_id": b, "k": 50, "request_id": rid}))
            producer.flush()
            next_ask = now + sizes.ask_every_s
        for rs in centroids.poll(timeout_ms=5).values():
            for r in rs:
                if p.published_at is None and decode_key(r.key) == item and decode_centroids(
                        r.value) is not None:
                    p.published_at = time.time()
        for rs in recs.poll(timeout_ms=5).values():
            for r in rs:
                obj = orjson.loads(r.value)
                if obj.get("request_id") in p.asked and any(
                        it["item_id"] == item for it in obj["items"]):
                    p.reflected_at = time.time()
    return p


# ---------------------------------------------------------------- the figures


def _figures(report: BenchReport, probes: list[Probe], rtt: np.ndarray, server: dict) -> None:
    published = np.array([p.published_at - p.clicked_at for p in probes
                          if p.published_at is not None])
    reflected = np.array([p.reflected_at - p.clicked_at for p in probes
                          if p.reflected_at is not None])
    n = len(probes)
    report.add("raw kafka-python round trip p50", 1000 * np.percentile(rtt, 50), "ms")
    report.add("raw kafka-python round trip p99", 1000 * np.percentile(rtt, 99), "ms")
    report.add("probes", n, "clicks")
    report.add("click -> item's centroids published, p50", _pct(published, 50), "s")
    report.add("click -> item's centroids published, p99", _pct(published, 99), "s")
    report.add("probes reflected in a recommendation", len(reflected) / max(n, 1), "fraction",
               ">= 0.95", "the rest timed out")
    report.add("click -> a recommendation that reflects it, p50", _pct(reflected, 50), "s")
    report.add("click -> a recommendation that reflects it, p99", _pct(reflected, 99), "s",
               "<= 2.0", "RALM in production: 300 s")
    report.add("freshness p99 / raw round trip p99", _pct(reflected, 99) / np.percentile(rtt, 99),
               "ratio", note="broker round trips freshness costs")
    worker_p99 = quantile_from_histogram(server, "lookalike_click_to_recommendation_seconds", 0.99)
    report.add("worker-side freshness p99 (histogram bucket bound)", worker_p99, "s",
               note="click produced -> centroid table refreshed, scraped over HTTP")


def _minus(after: dict, before: dict) -> dict:
    """Counter and bucket samples accumulated between two scrapes."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")
