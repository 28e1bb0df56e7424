"""``lookalike bench cluster``: seed events -> windows -> centroids.

Targets (issue 4): a clustering worker takes >= 100k seed events/s; a full
refresh of all items' centroids runs >= 10x faster than scikit-learn's
``MiniBatchKMeans.partial_fit`` item by item on the same windows, with
inertia within 1% of it; a window's memory is stated in bytes.

Data: the synthetic click stream at the RALM paper's catalogue (43,500 items,
Zipf popularity); each click's seed vector is its user's planted cluster
centre plus noise (128-d). Seeds are packed as the scoring worker sends them
(``S2`` packs of up to 960 seeds, 512 KB) and consumed a few packs per poll,
like ``ClusteringStage``. Figures:

- state path: ``decode_records`` + ``ItemClusters.apply_columns``, what
  ``ClusteringStage.handle`` runs, after a warm-up half that has seen the
  catalogue; its same-run baseline is the per-item path it replaced
  (one decoded batch and one ``kmeans.partial_fit`` per item);
- worker loop: the real ``ConsumerLoop`` on a broker (embedded unless
  ``--bootstrap-servers``), records produced beforehand, timed from partition
  assignment to the last batch committed (includes publishing centroids);
- refresh: ``ItemClusters.refresh_all`` (one batched Lloyd step from the
  current centroids) against a fresh ``MiniBatchKMeans(init=those
  centroids).partial_fit(window)`` per item: the same update, so equal
  inertia is expected;
- memory: ``seed_window.bytes_bound`` from the configuration, and bytes per
  full window measured with tracemalloc.
"""

from __future__ import annotations

import time
import tracemalloc
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from engine import kmeans
from engine.bench.ingest import bench_broker
from engine.bench.report import BenchOptions, BenchReport, compute_threads
from engine.clustering import ItemClusters, SeedColumns, decode_records
from engine.codec import SeedPack, decode_seed_message, encode_seed_pack, key_of
from engine.config import Settings, WindowConfig
from engine.seed_window import SeedWindow, bytes_bound
from engine.synthetic import SyntheticSpec, iter_chunks, planted_clusters

PAPER_ITEMS = 43_500
TARGET_RATE = 100_000.0
DIM = 128
POLL = 960  # seeds per S2 pack: what fits the scoring worker's 512 KB pack at 128-d
RECORDS_PER_POLL = 4  # packs per clustering poll (~1 MB per partition fetch)

Record = tuple[int | None, bytes]  # (item key or None for a pack, value)


@dataclass(frozen=True)
class ClusterSize:
    seeds: int  # stream length: a warm-up half, then the measured half
    baseline_seeds: int  # of the measured half, through the per-record baseline
    worker_seeds: int  # through the real worker loop
    refresh_items: int  # items with full windows, refreshed by ours
    sklearn_items: int  # of those, refreshed by scikit-learn too
    memory_items: int  # full windows measured with tracemalloc


def size_of(opts: BenchOptions) -> ClusterSize:
    if opts.quick:
        return ClusterSize(20_000, 3_000, 5_000, 64, 32, 16)
    return ClusterSize(600_000, 60_000, 100_000, 4_096, 1_024, 256)


# ---------------------------------------------------------------- data


def seed_stream(n: int, seed: int, items: int = PAPER_ITEMS) -> list[list[Record]]:
    """Clustering polls of ``S2`` packs, as scoring workers send them (one per poll)."""
    spec = SyntheticSpec(n_users=max(10_000, n // 2), n_items=items, n_clusters=50,
                         clicks_per_user=10.0, seed=seed)
    user, item, ts = next(iter_chunks(spec, chunk=n))
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(spec.n_clusters, DIM)).astype(np.float32)
    vec = centres[planted_clusters(spec)[user - 1]]
    vec += 0.5 * rng.normal(size=vec.shape).astype(np.float32)
    records: list[Record] = []
    for lo in tqdm(range(0, len(user), POLL), desc="encode seed events", unit="poll",
                   leave=False, mininterval=0.5):
        sl = slice(lo, lo + POLL)
        order = np.argsort(item[sl], kind="stable")  # grouped by item, click order kept
        its = item[sl][order]
        firsts = np.flatnonzero(np.r_[True, its[1:] != its[:-1]])
        pack = SeedPack(its[firsts].astype(np.int64), np.r_[firsts, len(its)].astype(np.int64),
                        user[sl][order], ts[sl][order], vec[sl][order], "bench")
        records.append((None, encode_seed_pack(pack)))
    return [records[i:i + RECORDS_PER_POLL] for i in range(0, len(records), RECORDS_PER_POLL)]


def seeds_in(polls: list[list[Record]]) -> int:
    return sum(int.from_bytes(raw[6:10], "little") for p in polls for _, raw in p)


# ---------------------------------------------------------------- state path


def state_path(state: ItemClusters, polls: list[list[Record]], desc: str) -> float:
    """Seconds to take ``polls`` through decode_records + apply_columns (the worker's path)."""
    t = 0.0
    for p in tqdm(polls, desc=desc, unit="poll", leave=False, mininterval=0.5):
        t0 = time.perf_counter()
        runs, _ = decode_records([i for i, _ in p], [raw for _, raw in p])
        for cols, _idx in runs:
            state.apply_columns(cols)
        t += time.perf_counter() - t0
    return t


def per_record_baseline(cfg: WindowConfig, polls: list[list[Record]]) -> float:
    """Seconds of the path before this layout: decode and k-means step per record."""
    windows: dict[int, SeedWindow] = {}
    cents: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    t0 = time.perf_counter()
    for p in tqdm(polls, desc="per-record baseline", unit="poll", leave=False, mininterval=0.5):
        for item, b in [ib for key, raw in p for ib in decode_seed_message(_key(key), raw)]:
            w = windows.setdefault(item, SeedWindow(cfg.size))
            keep = [i for i in range(len(b.users))
                    if w.add(int(b.users[i]), float(b.ts[i]), b.vectors[i])]
            if keep:
                c, n = cents.get(item) or kmeans.empty(cfg.k, DIM)
                cents[item] = kmeans.partial_fit(c, n, b.vectors[keep], cfg.count_cap)
    return time.perf_counter() - t0


def _key(item: int | None) -> bytes | None:
    return None if item is None else key_of(item)


# ---------------------------------------------------------------- worker loop


def worker_loop(opts: BenchOptions, polls: list[list[Record]],
                warm: list[list[Record]] = ()) -> tuple[float, int, int, float]:
    """Seed events/s of the real clustering loop, from assignment to the last commit;
    centroid records it published, and the items still waiting for the publish budget
    at the end with the age of the oldest change. ``warm``: polls applied to the
    worker's state first, untimed (a running worker's windows are not empty)."""
    from consumers.clustering import ClusteringStage
    from consumers.kafka import make_producer
    from consumers.loop import ConsumerLoop
    from engine.topics import Topics, create_topics

    records = [r for p in polls for r in p]
    with bench_broker(opts) as bootstrap:
        prefix = f"bench-cluster-{uuid.uuid4().hex[:6]}-"
        kafka = opts.settings.kafka.model_copy(update={
            "bootstrap_servers": bootstrap, "topic_prefix": prefix})
        s: Settings = opts.settings.model_copy(update={"kafka": kafka})
        create_topics(s.kafka)
        topic = Topics(kafka.topic_prefix).seed_events
        producer = make_producer(s.kafka, linger_ms=5)
        for item, raw in tqdm(records, desc="produce seed events", unit="msg", leave=False,
                              mininterval=0.5):
            producer.send(topic, key=_key(item), value=raw)
        producer.flush()
        producer.close()
        stage = ClusteringStage(s)
        if warm:
            state_path(stage.state, list(warm), "warm worker state")
        loop = ConsumerLoop(stage)
        loop.open()
        try:
            rate = _drain(loop, stage, len(records))
            published = int(stage.metrics.centroids_published.labels(stage.name)._value.get())
            age = stage.metrics.centroid_backlog_age.labels(stage.name)._value.get()
            return rate, published, len(stage._dirty), float(age)
        finally:
            loop.close()


def _drain(loop, stage, n: int) -> float:
    """Seed events/s from the start of the first poll that returns records (group join
    excluded) to the last batch committed.

    Counted from the stage's ``lookalike_seed_events_total``, not from the seeds its
    windows hold: a seed into a full window replaces one and holds no more (counting
    held seeds missed a third of the events on the bench's warm Zipf state)."""
    applied = stage.metrics.seed_events.labels(stage.name)._value
    got, t0, seeds0 = 0, 0.0, 0.0
    with tqdm(total=n, desc="clustering worker", unit="msg", leave=False,
              mininterval=0.5) as bar:
        while got < n:
            started, before = time.perf_counter(), applied.get()
            k = loop.poll_once()
            if k and not t0:
                t0, seeds0 = started, before
            got += k
            bar.update(k)
    return (applied.get() - seeds0) / (time.perf_counter() - t0)


# ---------------------------------------------------------------- refresh


def full_windows(cfg: WindowConfig, n_items: int, seed: int) -> ItemClusters:
    """``n_items`` items whose windows are full, fed through the streaming path."""
    rng = np.random.default_rng(seed)
    state = ItemClusters(cfg)
    chunk = 32  # items per step: the step copies k x d centroids per point
    for lo in tqdm(range(0, n_items, chunk), desc="fill windows", unit="chunk", leave=False):
        items = list(range(lo, min(n_items, lo + chunk)))
        per = cfg.size
        centres = rng.normal(size=(len(items), cfg.k, DIM)).astype(np.float32)
        which = rng.integers(cfg.k, size=(len(items), per))
        vecs = centres[np.arange(len(items))[:, None], which]
        vecs += rng.normal(size=vecs.shape).astype(np.float32)
        users = np.arange(len(items) * per, dtype=np.int64)
        ts = np.tile(np.arange(per, dtype=np.float64), len(items))
        starts = list(range(0, len(items) * per + 1, per))
        state.apply_columns(SeedColumns(items, starts, users, ts, vecs.reshape(-1, DIM), "bench"))
    return state


def sklearn_refresh(state: ItemClusters, items: list[int]) -> tuple[float, float]:
    """(seconds, inertia) of MiniBatchKMeans.partial_fit item by item from the current centroids.

    One OpenMP thread: on a busy 2-core machine sklearn's 2-thread kernels
    spin and run ~30x slower per item, so one thread is its best here (the
    stronger baseline).
    """
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    k = state.cfg.k
    inertia, seconds = 0.0, 0.0
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        for i in tqdm(items, desc="sklearn refresh", unit="item", leave=False, mininterval=0.5):
            st = state.items[i]
            x, init = st.window.vectors(), st.centroids.copy()
            t0 = time.perf_counter()
            m = MiniBatchKMeans(n_clusters=k, init=init, n_init=1, batch_size=len(x),
                                reassignment_ratio=0.0)
            m.partial_fit(x)
            seconds += time.perf_counter() - t0
            inertia += kmeans.inertia(x, m.cluster_centers_.astype(np.float32))
    return seconds, inertia


def our_inertia(state: ItemClusters, items: list[int]) -> float:
    return sum(kmeans.inertia(state.items[i].window.vectors(), state.items[i].centroids,
                              state.items[i].counts) for i in items)


# ---------------------------------------------------------------- memory


def measured_window_bytes(cfg: WindowConfig, n_items: int) -> float:
    """Bytes per full window (vectors, timestamps, bookkeeping), by tracemalloc."""
    vec = np.ones((1, DIM), np.float32)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        windows = [SeedWindow(cfg.size, cfg.vector_dtype) for _ in range(n_items)]
        for w in windows:
            for u in range(cfg.size):
                w.add(1_000_000 + u, float(u), vec[0])
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return used / n_items


# ---------------------------------------------------------------- the bench


def run(opts: BenchOptions) -> BenchReport:
    size = size_of(opts)
    cfg = opts.settings.window
    report = BenchReport("cluster", settings={
        "quick": opts.quick, "seeds": size.seeds, "items": PAPER_ITEMS, "dim": DIM,
        "window": cfg.model_dump(), "poll_records": POLL, "refresh_items": size.refresh_items,
        "sklearn_items": size.sklearn_items})

    _refresh_figures(report, cfg, size, opts.seed)  # first: compute-bound, before Kafka threads
    _memory_figures(report, cfg, size)
    polls = seed_stream(size.seeds, opts.seed)
    half = len(polls) // 2
    warm, measured = polls[:half], polls[half:]
    state = ItemClusters(cfg)
    state_path(state, warm, "warm-up")
    n_measured = seeds_in(measured)
    rate = n_measured / state_path(state, measured, "state path")
    base_polls = _first_seeds(measured, size.baseline_seeds)
    report.add("state path seed events/s", rate, "events/s",
               note=f"decode_records + apply_columns (S2 packs), warm state of "
               f"{len(state):,} items, {n_measured:,} events")
    report.add("state path / 100k target", rate / TARGET_RATE, "x", ">= 1")
    base_rate = seeds_in(base_polls) / per_record_baseline(cfg, base_polls)
    report.add("state path / per-record path", rate / base_rate, "x",
               note=f"same run: per-record decode + partial_fit at {base_rate:,.0f} events/s "
               f"({seeds_in(base_polls):,} events, windows starting empty)")

    worker_polls = _first_seeds(measured, size.worker_seeds)
    wrate, published, backlog, age = worker_loop(opts, worker_polls, warm)
    report.add("worker loop seed events/s", wrate, "events/s",
               note="ConsumerLoop on the broker, incl. publishing centroids within "
               f"window.publish_items_per_s = {cfg.publish_items_per_s:,.0f}; "
               f"{seeds_in(worker_polls):,} events into the warm-up's {len(state):,} items")
    report.add("worker loop / 100k target", wrate / TARGET_RATE, "x", ">= 1")
    report.add("centroid records published during the run", published, "records")
    report.add("items waiting for the publish budget at the end", backlog, "items",
               note=f"oldest change waiting {age:.1f} s; published within "
               f"~{backlog / cfg.publish_items_per_s:.1f} s more")
    return report


def _first_seeds(polls: list[list[Record]], n: int) -> list[list[Record]]:
    out, got = [], 0
    for p in polls:
        if got >= n:
            break
        out.append(p)
        got += seeds_in([p])
    return out


def _refresh_figures(report: BenchReport, cfg: WindowConfig, size: ClusterSize,
                     seed: int) -> None:
    state = full_windows(cfg, size.refresh_items, seed)
    ref_items = list(range(size.sklearn_items))
    sklearn_refresh(state, [size.refresh_items - 1])  # warm-up: imports, thread pools
    sk_seconds, sk_inertia = sklearn_refresh(state, ref_items)
    full_windows(cfg, 2, seed + 1).refresh_all(iters=1)  # warm-up: torch's first call
    t0 = time.perf_counter()
    n = state.refresh_all(iters=1)
    ours = n / (time.perf_counter() - t0)
    sk_rate = len(ref_items) / sk_seconds
    report.add("refresh items/s (ours)", ours, "items/s",
               note=f"refresh_all: one batched Lloyd step, {n:,} full windows of "
               f"{cfg.size}x{DIM}, k={cfg.k}")
    report.add("refresh items/s (sklearn per item)", sk_rate, "items/s",
               note="MiniBatchKMeans(init=current).partial_fit(window), item by item, "
               "1 OpenMP thread (its fastest here)")
    report.add("refresh speed-up vs sklearn", ours / sk_rate, "x", ">= 10")
    with compute_threads(2):  # what a second core buys (scikit-learn's two threads were slower)
        t0 = time.perf_counter()
        state.refresh_all(iters=1)
        two = n / (time.perf_counter() - t0)
    report.add("refresh speed-up vs sklearn, ours on 2 threads", two / sk_rate, "x",
               note=f"{two:,.0f} items/s; the target row above is one thread against one")
    report.add("refresh inertia / sklearn", our_inertia(state, ref_items) / sk_inertia, "x",
               "<= 1.01", note=f"same {len(ref_items):,} windows")


def _memory_figures(report: BenchReport, cfg: WindowConfig, size: ClusterSize) -> None:
    bound = bytes_bound(cfg.size, DIM, cfg.vector_dtype)
    report.add("window bytes per item (bound)", bound, "bytes",
               note=f"size {cfg.size} x ({DIM} x {cfg.vector_dtype} + timestamp + bookkeeping)")
    report.add("window bytes per item (measured)", measured_window_bytes(cfg, size.memory_items),
               "bytes", note=f"tracemalloc, {size.memory_items} full windows")
    report.add("window bytes per item (float16 bound)", bytes_bound(cfg.size, DIM, "float16"),
               "bytes", note="window.vector_dtype = float16")
