"""``lookalike bench ingest``: clicks -> user embedding -> seed-events, against raw consume.

Target (issue 4): the scoring stage's click path (consume, decode, user state,
RALM user embedding, seed-event emit, flush, commit) runs at >= 50% of the
rate at which plain kafka-python consumes the same messages in the same run.

Data: the synthetic stream at the RALM paper's catalogue size (43,500 items,
Zipf popularity, profiles on every click, as ``lookalike replay`` sends them).
Steady state: the clicks before the measured ones are applied to the stage's
user state first (untimed, as a restart restores it), so users arrive with
their histories, not as new users with one click.
Model: an untrained RALM at the default shape (``RalmModel.new``): throughput
does not depend on the weights. Each round consumes the whole topic twice:
once raw, once through the stage (a fresh consumer group each time, so no
round sees another's offsets); the figure is the median over rounds.

The helpers here (dataset, model, broker, settings) are shared with the
other benches.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch
from tqdm import tqdm

from consumers.kafka import assign_all, make_consumer, make_producer
from consumers.loop import ConsumerLoop, Event
from consumers.replay import replay
from consumers.scoring import ScoringStage
from consumers.topics_admin import create_topics
from engine import topics as T
from engine.codec import Click
from engine.config import Settings
from engine.data import Dataset, profiles_of
from engine.synthetic import SyntheticSpec, generate
from engine.topics import Topics
from lookalike.bench.report import BenchOptions, BenchReport
from lookalike.broker import EmbeddedBroker
from models.features import FeatureSpace
from models.ralm import RalmConfig, RalmModel

#: the RALM paper's production catalogue
PAPER_ITEMS = 43_500


@dataclass(frozen=True)
class IngestSize:
    clicks: int  # measured, through Kafka
    users: int
    items: int
    rounds: int
    clicks_per_user: float  # of the whole synthetic stream; the part before is warm-up


def size_of(opts: BenchOptions) -> IngestSize:
    if opts.quick:
        return IngestSize(clicks=3_000, users=1_000, items=2_000, rounds=1, clicks_per_user=5)
    return IngestSize(clicks=200_000, users=50_000, items=PAPER_ITEMS, rounds=3,
                      clicks_per_user=30)


# ---------------------------------------------------------------- shared helpers


def bench_dataset(users: int, items: int, seed: int, clicks_per_user: float = 10.0) -> Dataset:
    """Synthetic clicks with planted clusters, Zipf item popularity and profiles."""
    spec = SyntheticSpec(n_users=users, n_items=items, n_clusters=min(20, items),
                         clicks_per_user=clicks_per_user, seed=seed)
    return generate(spec)


def bench_model(ds: Dataset, seed: int) -> RalmModel:
    """An untrained RALM at the default shape (m = h = 128, k = 20) over ``ds``'s features."""
    torch.manual_seed(seed)
    cfg = RalmConfig(seed=seed)
    return RalmModel.new(cfg, FeatureSpace.build(ds, cfg.history_len), version="bench-untrained")


@contextmanager
def bench_broker(opts: BenchOptions, log_file: Path | None = None) -> Iterator[str]:
    """The given bootstrap servers, or an embedded broker we start and stop ourselves
    (its output in ``log_file``, if given)."""
    if opts.bootstrap_servers:
        yield opts.bootstrap_servers
        return
    with EmbeddedBroker(log_file=log_file) as broker:
        yield broker.bootstrap_servers


def bench_settings(opts: BenchOptions, bootstrap: str, name: str) -> Settings:
    """The user's settings on ``bootstrap`` with a fresh topic prefix; topics created."""
    prefix = f"bench-{name}-{uuid.uuid4().hex[:6]}-"
    kafka = opts.settings.kafka.model_copy(update={
        "bootstrap_servers": bootstrap, "topic_prefix": prefix})
    s = opts.settings.model_copy(update={"kafka": kafka})
    create_topics(s.kafka)
    return s


def assigned_reader(s: Settings, topic: str, **extra) -> tuple:
    """A group-less consumer assigned to every partition of ``topic``, from the beginning."""
    name = Topics(s.kafka.topic_prefix).name(topic)
    c = make_consumer(s.kafka, None, **extra)
    tps = assign_all(c, name, at="beginning")
    return c, tps


# ---------------------------------------------------------------- measurements


def raw_consume(s: Settings, n: int, max_poll_records: int, decode: bool = False) -> float:
    """Messages/s plain kafka-python reads ``n`` clicks at (optionally orjson-decoding them)."""
    c, _ = assigned_reader(s, "clicks", fetch_max_wait_ms=ScoringStage.fetch_max_wait_ms,
                           max_poll_records=max_poll_records)
    try:
        got, t0 = 0, time.perf_counter()
        while got < n:
            for records in c.poll(timeout_ms=500).values():
                got += len(records)
                if decode:
                    for r in records:
                        orjson.loads(r.value)
        return got / (time.perf_counter() - t0)
    finally:
        c.close(autocommit=False)


def click_steps(s: Settings, model: RalmModel, n: int, warm: list[Click]) -> dict[str, float]:
    """µs per click of each step of the click path, each timed alone on ``n`` consumed
    records in polls of ``max_poll_records`` (where the stage's time goes)."""
    c, _ = assigned_reader(s, "clicks", max_poll_records=ScoringStage.max_poll_records)
    try:
        records: list = []
        while len(records) < n:
            for recs in c.poll(timeout_ms=500).values():
                records.extend(recs)
    finally:
        c.close(autocommit=False)
    stage = ScoringStage(s, model)
    for lo in range(0, len(warm), 10_000):
        stage._apply_clicks(warm[lo:lo + 10_000], [-1] * len(warm[lo:lo + 10_000]))
    loop = ConsumerLoop(stage)
    loop.producer = make_producer(s.kafka)
    took = dict.fromkeys(("decode", "user state", "user tower", "seed-events emit",
                          "seed-events send"), 0.0)
    try:
        for lo in range(0, len(records), ScoringStage.max_poll_records):
            part = records[lo:lo + ScoringStage.max_poll_records]
            t0 = time.perf_counter()
            events = [Event(T.CLICKS, r, stage.decode(T.CLICKS, r)) for r in part]
            t1 = time.perf_counter()
            last = stage._apply_clicks([ev.value for ev in events], [0] * len(events))
            t2 = time.perf_counter()
            states = list(last.values())
            vecs = stage._embed(states, [st.profile for st in states])
            t3 = time.perf_counter()
            stage._emit_click_seeds(events, last, vecs)
            t4 = time.perf_counter()
            loop._release()  # what kafka.linger_ms held back goes to the producer
            t5 = time.perf_counter()
            for step, dt in zip(took, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
                                strict=True):
                took[step] += dt
        loop.producer.flush()
    finally:
        loop.producer.close(timeout=10)
    return {k: v / len(records) * 1e6 for k, v in took.items()}


@dataclass
class StageRun:
    rate: float  # clicks/s, from partition assignment to the last batch committed
    seed_messages: int
    seeds: int


def warm_clicks(ds: Dataset, n: int) -> list[Click]:
    """The first ``n`` clicks of ``ds`` as the scoring stage decodes them."""
    profiles = profiles_of(ds)
    users, items = ds.users.ids[ds.user[:n]].tolist(), ds.items.ids[ds.item[:n]].tolist()
    return [Click(u, i, t, profiles[p]) for u, i, t, p in
            zip(users, items, ds.ts[:n].tolist(), ds.user[:n].tolist(), strict=True)]


def stage_consume(s: Settings, model: RalmModel, n: int, group: str, pack: bool,
                  warm: list[Click], progress: bool = True) -> StageRun:
    """Run the scoring stage's loop over the ``n`` clicks in a fresh group; its rate.

    ``pack``: seed-events as S2 packs per partition (else one S1 message per item);
    ``warm``: clicks applied to user state before (untimed).
    """
    stage = ScoringStage(s, model)
    stage.pack_seeds = pack
    for lo in range(0, len(warm), 10_000):
        part = warm[lo:lo + 10_000]
        stage._apply_clicks(part, [-1] * len(part))
    loop = ConsumerLoop(stage)
    loop.group_id = group  # a fresh group: starts at the beginning, nothing to restore
    assigned_at: list[float] = []
    on_assigned = stage.on_assigned

    def mark(partitions: set) -> None:
        assigned_at.append(time.perf_counter())
        on_assigned(partitions)

    stage.on_assigned = mark  # type: ignore[method-assign]
    loop.open()
    try:
        got = 0
        with tqdm(total=n, desc="scoring stage", unit="click", leave=False,
                  mininterval=0.5, disable=not progress) as bar:
            while got < n:
                k = loop.poll_once()
                got += k
                bar.update(k)
        seconds = time.perf_counter() - assigned_at[0]
    finally:
        loop.close()
    produced = stage.metrics.produced.labels(stage.name, "seed-events")._value.get()
    return StageRun(got / seconds, stage.seed_messages, int(produced))


# ---------------------------------------------------------------- the bench


def run(opts: BenchOptions) -> BenchReport:
    size = size_of(opts)
    report = BenchReport("ingest")
    ds = bench_dataset(size.users, size.items, opts.seed, size.clicks_per_user)
    model = bench_model(ds, opts.seed)
    torch.set_num_threads(opts.settings.scoring.threads)
    n_warm = max(0, len(ds) - size.clicks)
    warm = warm_clicks(ds, n_warm)
    measured = ds.subset(np.arange(len(ds)) >= n_warm)
    with bench_broker(opts) as bootstrap:
        s = bench_settings(opts, bootstrap, "ingest")
        loaded = replay(measured, s.kafka, limit=size.clicks, progress=not opts.quick)
        raws, decoded, stages = [], [], []
        for _ in range(size.rounds):
            raws.append(raw_consume(s, size.clicks, ScoringStage.max_poll_records))
            decoded.append(raw_consume(s, size.clicks, ScoringStage.max_poll_records, True))
            group = f"bench-ingest-{uuid.uuid4().hex}"
            stages.append(stage_consume(s, model, size.clicks, group, True, warm,
                                        not opts.quick))
        steps = click_steps(s, model, min(size.clicks, 20_000), warm)
    raw = statistics.median(raws)
    stage = statistics.median(st.rate for st in stages)
    last = stages[-1]
    report.settings = {
        "clicks": size.clicks, "users": size.users, "items": size.items,
        "warm_up_clicks": n_warm,
        "rounds": size.rounds, "partitions": s.kafka.partitions,
        "max_poll_records": ScoringStage.max_poll_records,
        "threads": opts.settings.scoring.threads, "model": model.version,
        "model_shape": {"embed_dim": model.config.embed_dim, "dim": model.dim, "k": model.k,
                        "history_len": model.config.history_len},
        "broker": "given" if opts.bootstrap_servers else "embedded (Tansu)",
    }
    report.add("stage / raw consume", stage / raw, "ratio", ">= 0.5",
               "median over rounds of the scoring stage's click path vs plain kafka-python")
    report.add("scoring stage click path", stage, "clicks/s", "",
               "consume + decode + user state + embed + seed-events emit, flush, commit")
    report.add("raw kafka-python consume", raw, "msgs/s", "", "same messages, same run")
    report.add("raw consume + orjson decode", statistics.median(decoded), "msgs/s")
    report.add("producer (replay) load rate", loaded.rate, "msgs/s",
               note="kafka-python producer, for scale")
    report.add("seeds per seed-events message", last.seeds / max(last.seed_messages, 1),
               "seeds/msg")
    for step, us in steps.items():
        report.add(f"click path step: {step}", us, "µs/click", note="timed alone, a poll at a time")
    report.add("kafka-python record unpacking (1 / raw rate)", 1e6 / raw, "µs/click",
               note="the raw consume pays it too")
    tower = tower_seconds_per_user(model, opts.seed)
    report.add("user tower per click (batch 1,024)", tower * 1e6, "µs",
               note="each click's seed carries the user's new embedding")
    report.add("ratio bound: raw consume + tower only", (1 / raw) / (1 / raw + tower), "ratio",
               note="if decoding, user state and seeds cost nothing: the tower alone sets "
               "this ceiling on one core")
    return report


def tower_seconds_per_user(model: RalmModel, seed: int, batch: int = 1024,
                           rounds: int = 5) -> float:
    """The RALM user tower's time per user on full histories, in batches as the click
    path embeds a poll's users (``embed_rows``, the path it serves on)."""
    fs, rng = model.features, np.random.default_rng(seed)
    rows = rng.integers(1, len(fs.catalog_ids), (batch, fs.history_len))
    cat = np.zeros((batch, 3), np.int64)
    cont = fs.continuous(np.full(batch, 30.0, np.float32), np.full(batch, 50))
    model.embed_rows(cat, cont, rows)  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        model.embed_rows(cat, cont, rows)
    return (time.perf_counter() - t0) / (rounds * batch)
