"""``lookalike bench score``: recommendation latency and throughput of the scoring worker.

Targets (issue 4), with 43,500 items of 20 centroids each in the worker's
centroid table:

- worker-side latency per request at batch 1 (decode, user embedding, the
  default pipeline: Faiss shortlist and popular items, RALM re-rank, the blend;
  JSON, hand-off to the producer): p99 <= 2 ms;
- batched: >= 2,000 users/s;
- end to end (request produced -> recommendation consumed, through the
  broker and a running worker): p99 <= 2x the p99 of a raw kafka-python
  produce -> consume round trip measured in the same run, with the same
  client settings, while the worker runs.

Model: an untrained RALM at the default shape (latency does not depend on the
weights). Centroids: each item's 20 centroids are noisy mixes of real user
embeddings (the model's, of synthetic users), so cosines have realistic
spread; counts are random, a few slots empty.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from kafka.admin import KafkaAdminClient, NewTopic
from tqdm import tqdm

from consumers.kafka import assign_all, make_consumer, make_producer
from consumers.loop import ConsumerLoop, Event
from consumers.pipelines import Ranked
from consumers.runner import start_worker
from consumers.scoring import ScoringStage
from engine import topics as T
from engine.codec import ItemCentroids, encode_json, key_of
from engine.config import Settings
from engine.data import Dataset
from engine.topics import KeyPartitions
from lookalike.bench.clients import Setting, kafka_python_round_trips, round_trips
from lookalike.bench.ingest import (
    PAPER_ITEMS,
    bench_broker,
    bench_dataset,
    bench_model,
    bench_settings,
    warm_clicks,
)
from lookalike.bench.report import BenchOptions, BenchReport, compute_threads
from models.features import ClickLog
from models.ralm import RalmModel
from models.splits import Ragged
from models.train_ralm import train_user_tower


@dataclass(frozen=True)
class ScoreSize:
    items: int
    users: int
    requests: int  # batch-1 worker-side and end-to-end samples
    batch: int  # users per batched call
    batches: int
    round_trips: int


def size_of(opts: BenchOptions) -> ScoreSize:
    if opts.quick:
        return ScoreSize(items=2_000, users=500, requests=50, batch=32, batches=2, round_trips=30)
    return ScoreSize(items=PAPER_ITEMS, users=20_000, requests=2_000, batch=256, batches=8,
                     round_trips=1_000)


def geometry_model(ds: Dataset, seed: int, progress: bool) -> RalmModel:
    """The bench's RALM with one short epoch of its user tower on ``ds``.

    Why train at all: latency does not depend on the weights, but the recall of
    an approximate index does depend on the geometry. An untrained tower maps
    every user to nearly the same direction (mean cosine 0.997 between users),
    which no ANN index can tell apart; one epoch of the sampled softmax (~20 s
    at the full size) spreads users by taste (mean cosine ~0.66), as a trained
    model does. The look-alike transform stays untrained.
    """
    model = bench_model(ds, seed)
    cfg = model.config.model_copy(update={
        "user_epochs": 1, "positives_per_user": 10, "batch_size": 1024, "lr": 3e-3})
    train_user_tower(model.user_tower, ClickLog(ds, model.features), cfg,
                     np.random.default_rng(seed), progress=progress, log=lambda _: None)
    return model


def fill_table(stage: ScoringStage, model: RalmModel, ds: Dataset, n_items: int, seed: int,
               progress: bool) -> None:
    """Every item gets k centroids from the embeddings of the users who clicked it.

    Slot j of an item is the mean of a few of its clickers (at most 4, drawn
    at random), so an item's centroids sit where its audience is, as k-means
    over its seed window puts them; items nobody clicked take random users.
    Counts are random and a few slots are empty, as in a real window. Users'
    embeddings are stored as the worker's click path stores them (a known user's
    request reads it; ``ScoringStage._user_vectors``).
    """
    rng = np.random.default_rng(seed)
    states = list(stage.users.users.values())
    users = np.concatenate([stage._embed(states[lo:lo + 4096],
                                         [st.profile for st in states[lo:lo + 4096]])
                            for lo in range(0, len(states), 4096)])
    stage.users.set_vectors(states, users)  # as the click path leaves them
    row_of = {u: r for r, u in enumerate(stage.users.users)}
    user_rows = np.array([row_of[u] for u in ds.users.ids[ds.user].tolist()], np.int64)
    clickers = Ragged.from_groups(ds.item, user_rows, len(ds.items.ids))
    k, dim = stage.table.k, stage.table.dim
    for j, item in enumerate(tqdm(ds.items.ids[:n_items].tolist(), desc="centroid table",
                                  unit="item", disable=not progress, mininterval=0.5)):
        who = clickers[j] if len(clickers[j]) else rng.integers(0, len(users), 8)
        cent = users[who[rng.integers(0, len(who), (k, 4))]].mean(1)
        cent = (cent + rng.normal(0, 0.01, (k, dim))).astype(np.float32)
        counts = rng.integers(1, 30, k).astype(np.float32)
        counts[rng.random(k) < 0.1] = 0.0  # a few empty k-means slots
        stage.table.upsert(item, ItemCentroids(cent, counts, int(counts.sum()), time.time()))
    stage.table.refresh(model.item_global)


def request(user: int, i: int, k: int = 10) -> bytes:
    return encode_json({"user_id": user, "k": k, "request_id": f"r-{i}"})


class _Record:
    """Just what ``ScoringStage.decode``/``handle`` read of a ConsumerRecord."""

    __slots__ = ("value", "partition", "timestamp", "topic", "offset", "key", "headers")

    def __init__(self, value: bytes, key: bytes, partition: int):
        self.value, self.key, self.partition = value, key, partition  # the user's (murmur2)
        self.timestamp, self.topic, self.offset, self.headers = 0, T.SCORE_REQUESTS, 0, []


def worker_side(stage: ScoringStage, users: list[int], batch: int, progress: bool,
                desc: str, flushes: list[float] | None = None) -> np.ndarray:
    """Seconds per decode + ``handle`` call of ``batch`` requests (the producer is real).

    After each call the producer is flushed, untimed, as the worker's loop does
    after each poll (its step 5): the producer's IO thread then sends while the
    loop waits for the flush, not during the next request. (Flushing every 50
    calls instead, as this bench did, let the IO thread's pure-Python sends of
    earlier recommendations hold the GIL in the middle of later requests: 1 ms
    of the p50 and most of the p99, a cost the real loop does not pay there.)
    The flush times go to ``flushes``: the end-to-end figures include them.
    """
    assert stage.loop is not None and stage.loop.producer is not None
    parts = len(stage.loop.producer.partitions_for(stage.names.score_requests))
    home = dict(zip(users, KeyPartitions().of(np.array(users), parts).tolist(), strict=True))
    out = []
    n = len(users) // batch
    for b in tqdm(range(n), desc=desc, unit="call", disable=not progress, mininterval=0.5):
        chunk = users[b * batch:(b + 1) * batch]
        t0 = time.perf_counter()
        events = [Event(T.SCORE_REQUESTS, rec, stage.decode(T.SCORE_REQUESTS, rec))
                  for rec in (_Record(request(u, i), key_of(u), home[u])
                              for i, u in enumerate(chunk))]
        stage.handle(events)
        t1 = time.perf_counter()
        out.append(t1 - t0)
        stage.loop.producer.flush()
        if flushes is not None:
            flushes.append(time.perf_counter() - t1)
    return np.asarray(out)


def breakdown(stage: ScoringStage, users: list[int]) -> dict[str, float]:
    """Median µs of each step of a batch-1 request, each timed alone (where the time goes)."""
    cfg = stage.settings.scoring
    parts: dict[str, list[float]] = {k: [] for k in (
        "decode", "user vector", "user tower (a stale user)", "index search", "rank", "emit")}

    def timed(name: str, f):  # noqa: ANN001, ANN202 - a thunk
        t0 = time.perf_counter()
        out = f()
        parts[name].append((time.perf_counter() - t0) * 1e6)
        return out

    for i, u in enumerate(users):
        rec = _Record(request(u, i), key_of(u), 0)
        req = timed("decode", lambda: stage.decode(T.SCORE_REQUESTS, rec))  # noqa: B023
        st = stage.users.get(u)
        prof = req.profile or (st.profile if st else None)
        vec = timed("user vector", lambda: stage._user_vectors([st], [prof]))  # noqa: B023
        timed("user tower (a stale user)", lambda: stage._embed([st], [prof]))  # noqa: B023
        seen = len(st.seen) if st else 0
        timed("index search", lambda: stage.table.search(vec, cfg.candidates + seen))  # noqa: B023
        items = timed("rank", lambda: stage.rank(vec, [st], [req.k]))[0]  # noqa: B023
        timed("emit", lambda: stage._emit(req, st, Ranked(items), time.time(),  # noqa: B023
                                          "default"))
    med = {k: float(np.median(v)) for k, v in parts.items()}
    med["pool + re-rank (rank - search)"] = med.pop("rank") - med["index search"]
    return med


def raw_round_trips(s: Settings, n: int, progress: bool) -> np.ndarray:
    """Seconds from produce to consume of one small message, one at a time: the
    request itself, read back from a topic of its own."""
    name = s.kafka.topic_prefix + "bench-round-trip"
    admin = KafkaAdminClient(**s.kafka.client_options())
    try:
        admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        admin.close()
    return kafka_python_round_trips(s, _setting("raw"), [1] * n, progress, topics=(name, name))


def relay_round_trips(s: Settings, users: list[int], progress: bool) -> np.ndarray:
    """Seconds per request through a relay that does nothing: a consumer of the request
    topic that produces each record to the answer topic at once, with the worker's
    client settings. Why this baseline for the end-to-end figure: a request and its
    answer make two trips through the broker, each waiting for a consumer's fetch (the
    embedded broker answers a pending fetch a few ms after data arrives, not at once),
    where the raw round trip above is one trip to a consumer that fetches right after
    the send."""
    a, b = (s.kafka.topic_prefix + f"bench-relay-{x}" for x in ("in", "out"))
    admin = KafkaAdminClient(**s.kafka.client_options())
    try:
        admin.create_topics([NewTopic(a, 1, 1), NewTopic(b, 1, 1)])
    finally:
        admin.close()
    stop = threading.Event()
    relay_in = make_consumer(s.kafka, None, fetch_max_wait_ms=ScoringStage.fetch_max_wait_ms)
    relay_out = make_producer(s.kafka)
    assign_all(relay_in, a)

    def forward() -> None:
        while not stop.is_set():
            for records in relay_in.poll(timeout_ms=100).values():
                for r in records:
                    relay_out.send(b, key=r.key, value=r.value)
                relay_out.flush()  # as the worker's loop flushes after each poll

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        return kafka_python_round_trips(s, _setting("relay"), users, progress, topics=(a, b))
    finally:
        stop.set()
        thread.join(10)
        relay_in.close(autocommit=False)
        relay_out.close(timeout=5)


def end_to_end(s: Settings, users: list[int], progress: bool) -> np.ndarray:
    """Seconds from a score request produced to its own recommendation consumed (by
    request id: a reader placed at the end of ``recommendations`` on the embedded broker
    also gets the last batch written before it, and counting any record as the answer
    once timed those instead), with the worker's own client settings."""
    return kafka_python_round_trips(s, _setting("the worker's"), users, progress)


def _setting(label: str) -> Setting:
    """kafka-python with the scoring worker's own fetch wait, no linger."""
    return Setting("kafka-python", label, {"linger_ms": 0},
                   {"fetch_max_wait_ms": ScoringStage.fetch_max_wait_ms})


def _pcts(x: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(x, 50) * 1e3), float(np.percentile(x, 99) * 1e3)


def run(opts: BenchOptions) -> BenchReport:
    size = size_of(opts)
    progress = not opts.quick
    ds = bench_dataset(size.users, size.items, opts.seed, clicks_per_user=20)
    model = geometry_model(ds, opts.seed, progress)
    torch.set_num_threads(opts.settings.scoring.threads)
    with bench_broker(opts) as bootstrap:
        s = bench_settings(opts, bootstrap, "score")
        s = s.model_copy(update={"window": s.window.model_copy(update={"k": model.k})})
        stage = ScoringStage(s, model)
        warm = warm_clicks(ds, len(ds))
        stage._apply_clicks(warm, [-1] * len(warm))
        fill_table(stage, model, ds, size.items, opts.seed, progress)
        rng = np.random.default_rng(opts.seed)
        known = np.fromiter(stage.users.users, np.int64)
        picks = rng.choice(known, size.requests + size.batch * size.batches).tolist()
        recall = ann_recall(stage, picks[:500], s.scoring.candidates)
        # worker side: the stage alone with a real producer, before its loop runs
        loop = ConsumerLoop(stage)
        loop.producer = make_producer(s.kafka)
        try:
            worker_side(stage, picks[:50], 1, False, "warm-up")
            flushes: list[float] = []
            one = worker_side(stage, picks[:size.requests], 1, progress, "batch 1", flushes)
            many = worker_side(stage, picks[size.requests:], size.batch, progress,
                               f"batch {size.batch}")
            steps = breakdown(stage, picks[:min(300, size.requests)])
            other = 2 if s.scoring.threads == 1 else 1  # thread settings chosen by measurement
            ratios = thread_ratios(stage, picks[:size.requests // 4], picks[size.requests:],
                                   size.batch, other)
        finally:
            loop.producer.close(timeout=10)
        worker = start_worker(stage)
        try:
            if not worker.loop.ready.wait(60):
                raise RuntimeError("the scoring worker did not join its group in time")
            e2e = end_to_end(s, picks[:size.round_trips], progress)
            raw = raw_round_trips(s, size.round_trips, progress)
            relay = relay_round_trips(s, picks[:size.round_trips], progress)
            clients = round_trips(s, picks[:min(100, size.round_trips // 4)], progress)
        finally:
            worker.stop()
    report = _report(size, s, model, one, many, e2e, raw, relay, recall,
                     stage.table.approximate, bool(opts.bootstrap_servers))
    report.add("producer flush after a batch-1 call, p50", float(np.median(flushes)) * 1e3, "ms",
               note="untimed above: the loop's step 5, paid once per poll; in the end-to-end "
               "figures")
    for step, us in steps.items():
        report.add(f"batch-1 step: {step}", us, "µs", note="median, timed alone")
    for setting, secs in clients:
        p50, p99 = _pcts(secs)
        report.add(f"client round trip p50, {setting.client}: {setting.label}", p50, "ms",
                   note=f"p99 {p99:.1f} ms; request produced -> its answer consumed, one in "
                   "flight (lookalike/bench/clients.py)")
    on_path = sum(us for step, us in steps.items() if step != "user tower (a stale user)")
    report.add("batch-1 steps, sum / measured p50", on_path / 1e3
               / float(np.median(one)) / 1e3, "x",
               note="below 1: the rest is the handle loop and waiting for the GIL (the "
               "producer's IO thread)")
    for name, ratio, note in ratios:
        report.add(name, ratio, "x", note=note)
    return report


def thread_ratios(stage: ScoringStage, one_users: list[int], many_users: list[int],
                  batch: int, other: int) -> list[tuple[str, float, str]]:
    """(figure, ratio, note): time on ``other`` threads / on the stage's own, at batch 1
    (p50) and batched (mean), each pair measured back to back: with the machine otherwise
    idle, and with one core kept busy (a worker shares its cores with the broker and the
    other stage)."""
    own = stage.settings.scoring.threads
    conditions = (
        ("", nullcontext, "the machine otherwise idle"),
        (", one core busy", busy_core, "one core kept busy by a spinning process, as a "
         "deployment's broker and other stage keep it: scoring.threads is chosen by these rows"))
    out = []
    for suffix, load, note in conditions:
        with load():
            one = worker_side(stage, one_users, 1, False, "threads")
            many = worker_side(stage, many_users, batch, False, "threads")
            with compute_threads(other):
                one_alt = worker_side(stage, one_users, 1, False, "threads")
                many_alt = worker_side(stage, many_users, batch, False, "threads")
        out += [(f"batch-1 p50, {other} threads / {own}{suffix}",
                 float(np.median(one_alt) / np.median(one)), note),
                (f"batched time per user, {other} threads / {own}{suffix}",
                 float(many_alt.mean() / many.mean()), note)]
    return out


@contextmanager
def busy_core() -> Iterator[None]:
    """One process spinning on a core for the block (ours: started and ended by PID)."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # scheduled before the timing starts
        yield
    finally:
        spin.kill()
        spin.wait(10)


def ann_recall(stage: ScoringStage, users: list[int], n: int) -> float:
    """Share of the exact top-``n`` items by global cosine that the index returns."""
    states = [stage.users.get(u) for u in users]
    vecs = stage._embed(states, [st.profile if st else None for st in states])
    got, exact = stage.table.search(vecs, n), stage.table.search_exact(vecs, n)
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b)
                          for a, b in zip(got, exact, strict=True)]))


def _report(size: ScoreSize, s: Settings, model: RalmModel, one: np.ndarray, many: np.ndarray,
            e2e: np.ndarray, raw: np.ndarray, relay: np.ndarray, recall: float,
            approximate: bool, given_broker: bool) -> BenchReport:
    report = BenchReport("score")
    p50, p99 = _pcts(one)
    e50, e99 = _pcts(e2e)
    r50, r99 = _pcts(raw)
    y50, y99 = _pcts(relay)
    report.settings = {
        "items": size.items, "k": model.k, "dim": model.dim, "users": size.users,
        "candidates": s.scoring.candidates, "top_k": s.scoring.top_k,
        "threads": s.scoring.threads, "model": model.version,
        "ann_min_items": s.scoring.ann_min_items, "ann_nprobe": s.scoring.ann_nprobe,
        "requests_batch_1": size.requests, "batch": size.batch, "batches": size.batches,
        "round_trips": size.round_trips, "fetch_max_wait_ms": ScoringStage.fetch_max_wait_ms,
        "broker": "given" if given_broker else "embedded (Tansu)",
    }
    report.add("worker-side p99, batch 1", p99, "ms", "<= 2",
               "decode + embed + the default pipeline (Faiss shortlist + popular items, RALM "
               "re-rank, blend) + JSON + producer hand-off")
    report.add("worker-side p50, batch 1", p50, "ms")
    index = (f"IVF, {s.scoring.ann_nprobe} lists probed" if approximate
             else "exact (table below scoring.ann_min_items)")
    report.add(f"index recall@{s.scoring.candidates} vs exact search", recall, "fraction",
               note=f"{index}; the user model is one epoch trained so that users spread")
    report.add(f"batched throughput (batch {size.batch})", size.batch * len(many) / many.sum(),
               "users/s", ">= 2000")
    report.add("end-to-end p99 / relay round-trip p99", e99 / y99, "ratio", "<= 2",
               "request produced -> its recommendation consumed, vs the same through a "
               "relay that forwards each request at once (two trips through the broker)")
    report.add("end-to-end p50", e50, "ms")
    report.add("end-to-end p99", e99, "ms")
    report.add("relay round trip p50", y50, "ms", note="same client settings, same run")
    report.add("relay round trip p99", y99, "ms")
    report.add("end-to-end p99 / raw round-trip p99", e99 / r99, "ratio",
               note="one trip to a consumer that fetches right after the send: the "
               "broker's floor, not the engine's")
    report.add("raw kafka-python round trip p50", r50, "ms",
               note="same client settings, same run, worker running")
    report.add("raw kafka-python round trip p99", r99, "ms")
    return report
