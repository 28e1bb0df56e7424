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
  ``ClusteringStage.handle`` runs (the seeds' leave/join steps and the Lloyd
  refresh every ``window.refresh_every`` accepted seeds of an item), after a
  warm-up half that has seen the catalogue. The refresh runs within the
  worker's default budget: before each poll ``refresh_tokens`` is topped up
  as the worker does it (a token bucket at ``window.refresh_items_per_s``,
  1 s deep, by wall time). Its same-run baseline is the same stream through
  a state whose ``refresh_every`` exceeds the stream (no refresh): the ratio
  is what the refresh costs; refreshes run per 1k seed events and the items
  still due at the end are reported beside it. torch runs on the process's
  threads (the worker leaves torch's default);
- worker loop: the real ``ConsumerLoop`` and ``ClusteringStage`` on a broker
  (embedded unless ``--bootstrap-servers``), records produced beforehand,
  timed from partition assignment to the last batch committed (includes
  publishing centroids and the refresh at the stage's own budget), with the
  refreshes it ran and its refresh backlog at the end;
- refresh: ``ItemClusters.refresh_all(iters=1)`` (one batched Lloyd step, on
  one torch thread; a second row on two) against a fresh
  ``MiniBatchKMeans(init=those centroids).partial_fit(window)`` per item
  (one OpenMP thread), both from the centroids the streaming steps left (the
  windows are filled with the refresh off). The same update, except that a
  slot left without points empties in ours and keeps its centroid in
  scikit-learn's: equal inertia is expected, ours never lower;
- memory: ``seed_window.bytes_bound`` from the configuration, and bytes per
  full window measured with tracemalloc (a store of full windows).
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
from engine.clustering import ItemClusters, SeedColumns, decode_records
from engine.codec import SeedPack, encode_seed_pack, key_of
from engine.config import Settings, WindowConfig
from engine.seed_window import WindowStore, bytes_bound
from engine.synthetic import SyntheticSpec, iter_chunks, planted_clusters
from engine.token_bucket import TokenBucket
from lookalike.bench.ingest import bench_broker
from lookalike.bench.report import BenchOptions, BenchReport, compute_threads

PAPER_ITEMS = 43_500
TARGET_RATE = 100_000.0
DIM = 128
POLL = 960  # seeds per S2 pack: what fits the scoring worker's 512 KB pack at 128-d
RECORDS_PER_POLL = 4  # packs per clustering poll (~1 MB per partition fetch)

Record = tuple[int | None, bytes]  # (item key or None for a pack, value)


@dataclass(frozen=True)
class ClusterSize:
    seeds: int  # stream length: a warm-up half, then the measured half
    worker_seeds: int  # through the real worker loop
    refresh_items: int  # items with full windows, refreshed by ours
    sklearn_items: int  # of those, refreshed by scikit-learn too
    memory_items: int  # full windows measured with tracemalloc


def size_of(opts: BenchOptions) -> ClusterSize:
    if opts.quick:
        return ClusterSize(20_000, 5_000, 64, 32, 16)
    return ClusterSize(600_000, 100_000, 4_096, 1_024, 256)


def without_refresh(cfg: WindowConfig, seeds: int) -> WindowConfig:
    """``cfg`` with ``refresh_every`` beyond ``seeds``: no item of a stream that long is
    ever due, so only the leave/join steps run."""
    return cfg.model_copy(update={"refresh_every": seeds + 1})


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


def state_path(state: ItemClusters, polls: list[list[Record]], desc: str,
               budget: TokenBucket | None = None) -> float:
    """Seconds to take ``polls`` through decode_records + apply_columns (the worker's path);
    ``budget``: topped up before each poll, as the worker does (None: ``state``'s tokens
    as they are, unlimited unless set)."""
    t = 0.0
    for p in tqdm(polls, desc=desc, unit="poll", leave=False, mininterval=0.5):
        t0 = time.perf_counter()
        if budget is not None:
            state.refresh_tokens = budget.fill(state.refresh_tokens)
        runs, _ = decode_records([i for i, _ in p], [raw for _, raw in p])
        for cols, _idx in runs:
            state.apply_columns(cols)
        t += time.perf_counter() - t0
    return t


def _key(item: int | None) -> bytes | None:
    return None if item is None else key_of(item)


# ---------------------------------------------------------------- worker loop


@dataclass(frozen=True)
class WorkerRun:
    rate: float  # seed events/s, assignment to the last commit
    published: int  # centroid records published during the loop
    backlog: int  # changed items waiting for the publish budget at the end
    age: float  # seconds the oldest of them has waited
    refreshes: int  # item refreshes run during the loop
    due_before: int  # items due for a refresh when the loop started (after the warm-up)
    due_after: int  # and at the end


def worker_loop(opts: BenchOptions, polls: list[list[Record]],
                warm: list[list[Record]] = ()) -> WorkerRun:
    """The real clustering loop on a broker, from assignment to the last commit.

    ``warm``: polls applied to the worker's state first, untimed, with the
    refresh within its budget (a running worker's windows are not empty)."""
    from consumers.clustering import ClusteringStage
    from consumers.kafka import make_producer
    from consumers.loop import ConsumerLoop
    from consumers.topics_admin import create_topics
    from engine.topics import Topics

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
            state_path(stage.state, list(warm), "warm worker state",
                       TokenBucket(s.window.refresh_items_per_s))
        refreshes0, due0 = stage.state.refreshes, len(stage.state.due)
        loop = ConsumerLoop(stage)
        loop.open()
        try:
            rate = _drain(loop, stage, len(records))
            published = int(stage.metrics.centroids_published.labels(stage.name)._value.get())
            age = stage.metrics.centroid_backlog_age.labels(stage.name)._value.get()
            return WorkerRun(rate, published, len(stage._dirty), float(age),
                             stage.state.refreshes - refreshes0, due0, len(stage.state.due))
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
    """``n_items`` items whose windows are full, fed through the streaming path with the
    refresh off (``refresh_every`` beyond the window): their centroids are the
    leave/join steps' alone, the starting point of the refresh figures."""
    rng = np.random.default_rng(seed)
    state = ItemClusters(without_refresh(cfg, cfg.size))
    chunk = 32  # items per apply_columns call
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


def sklearn_refresh(state: ItemClusters, items: list[int],
                    models: dict | None = None) -> tuple[float, float]:
    """(seconds, inertia) of MiniBatchKMeans.partial_fit item by item from the current
    centroids; ``models``: filled with each item's fitted model (tests).

    One OpenMP thread: on a busy 2-core machine sklearn's 2-thread kernels
    spin and run ~30x slower per item, so one thread is its best here (the
    stronger baseline). Its inertia is over all its k centroids (a slot that
    got no point keeps its centroid there).
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
            if models is not None:
                models[i] = m
    return seconds, inertia


def our_inertia(state: ItemClusters, items: list[int]) -> float:
    """Inertia over each item's used slots (an emptied slot, count 0, is no centroid)."""
    return sum(kmeans.inertia(state.items[i].window.vectors(), state.items[i].centroids,
                              state.items[i].counts) for i in items)


_TABLE = ("centroids", "counts", "sqnorms", "labels", "since")


def _save(state: ItemClusters) -> list[dict[str, np.ndarray]]:
    return [{a: getattr(t, a).copy() for a in _TABLE} for t in state._tables.values()]


def _load(state: ItemClusters, saved: list[dict[str, np.ndarray]]) -> None:
    """Centroids, counts and labels back to ``_save``'s (a timing from the same start)."""
    for t, arrays in zip(state._tables.values(), saved, strict=True):
        for a, v in arrays.items():
            setattr(t, a, v.copy())


# ---------------------------------------------------------------- memory


def measured_window_bytes(cfg: WindowConfig, n_items: int) -> float:
    """Bytes per full window (vectors and bookkeeping) by tracemalloc: a store of
    ``n_items`` full windows, as the clustering worker holds them (the unused end of
    its last chunk of vectors included)."""
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((cfg.size, DIM), dtype=np.float32).astype(cfg.vector_dtype)
    users, ts = list(range(cfg.size)), [float(t) for t in range(cfg.size)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = WindowStore(cfg.size, DIM, cfg.vector_dtype, n_items)
        for row in range(n_items):
            store.load(row, users, ts, vecs)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert int(store.length.sum()) == n_items * cfg.size
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
    with compute_threads(1):  # as the clustering worker runs it (ClusteringStage)
        n_items = _state_figures(report, cfg, size, warm, measured)

    worker_polls = _first_seeds(measured, size.worker_seeds)
    w = worker_loop(opts, worker_polls, warm)
    report.add("worker loop seed events/s", w.rate, "events/s",
               note="ConsumerLoop + ClusteringStage on the broker, incl. publishing centroids "
               f"within window.publish_items_per_s = {cfg.publish_items_per_s:,.0f} and the "
               f"refresh within window.refresh_items_per_s = {cfg.refresh_items_per_s:,.0f}; "
               f"{seeds_in(worker_polls):,} events into the warm-up's {n_items:,} items")
    report.add("worker loop / 100k target", w.rate / TARGET_RATE, "x", ">= 1")
    report.add("worker loop refreshes run", w.refreshes, "refreshes",
               note=f"from the loop's start to its last commit, at window.refresh_items_per_s "
               f"= {cfg.refresh_items_per_s:,.0f} (stage.state.refreshes); "
               f"{w.refreshes / seeds_in(worker_polls) * 1000:.1f} per 1k seed events")
    report.add("worker loop refresh backlog at the end", w.due_after, "items",
               note=f"items due for a refresh, waiting for the budget (len(state.due)); "
               f"{w.due_before:,} when the loop started")
    report.add("centroid records published during the run", w.published, "records")
    report.add("items waiting for the publish budget at the end", w.backlog, "items",
               note=f"oldest change waiting {w.age:.1f} s; published within "
               f"~{w.backlog / cfg.publish_items_per_s:.1f} s more")
    return report


def _state_figures(report: BenchReport, cfg: WindowConfig, size: ClusterSize,
                   warm: list[list[Record]], measured: list[list[Record]]) -> int:
    """The state path with the refresh at the worker's budget, and without it; the number
    of items the warm-up left."""
    n = seeds_in(measured)
    base = ItemClusters(without_refresh(cfg, size.seeds))  # the baseline first, then ours
    state_path(base, warm, "warm-up, refresh off")
    base_s = state_path(base, measured, "state path, refresh off")
    assert base.refreshes == 0, "the baseline must not refresh"
    del base

    state = ItemClusters(cfg)
    budget = TokenBucket(cfg.refresh_items_per_s)  # as ClusteringStage spends it
    state_path(state, warm, "warm-up", budget)
    before = state.refreshes
    seconds = state_path(state, measured, "state path", budget)
    ran = state.refreshes - before
    rate, base_rate = n / seconds, n / base_s
    report.add("state path seed events/s", rate, "events/s",
               note=f"decode_records + apply_columns (S2 packs), the refresh every "
               f"window.refresh_every = {cfg.refresh_every} seeds within "
               f"window.refresh_items_per_s = {cfg.refresh_items_per_s:,.0f} (the worker's "
               f"token bucket, by wall time); warm state of {len(state):,} items, {n:,} events")
    report.add("state path / 100k target", rate / TARGET_RATE, "x", ">= 1")
    report.add("state path with refresh / without", rate / base_rate, "x",
               note=f"same run, same stream: without the refresh (refresh_every beyond the "
               f"stream) {base_rate:,.0f} events/s; below 1 is the refresh's cost, here "
               f"{(seconds - base_s) / max(ran, 1) * 1e3:.2f} ms per item refresh")
    report.add("state path refreshes per 1k seed events", ran / n * 1000, "refreshes",
               note=f"{ran:,} item refreshes in the measured {n:,} events "
               f"(refresh_iters = {cfg.refresh_iters})")
    report.add("state path refresh backlog at the end", len(state.due), "items",
               note="items due for a refresh, waiting for the budget (len(state.due))")
    return len(state)


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
    streamed = _save(state)
    with compute_threads(1):  # one thread against sklearn's one (torch's default is every core)
        t0 = time.perf_counter()
        n = state.refresh_all(iters=1)
        ours = n / (time.perf_counter() - t0)
    inertia = our_inertia(state, ref_items)
    emptied = sum(int((st.counts == 0).sum()) for st in state.items.values())
    sk_rate = len(ref_items) / sk_seconds
    report.add("refresh items/s (ours)", ours, "items/s",
               note=f"refresh_all: one batched Lloyd step from the streamed centroids "
               f"(windows filled with the refresh off), {n:,} full windows of "
               f"{cfg.size}x{DIM}, k={cfg.k}, 1 torch thread")
    report.add("refresh items/s (sklearn per item)", sk_rate, "items/s",
               note="MiniBatchKMeans(init=current).partial_fit(window), item by item, "
               "1 OpenMP thread (its fastest here)")
    report.add("refresh speed-up vs sklearn", ours / sk_rate, "x", ">= 10")
    _load(state, streamed)  # the same start again
    with compute_threads(2):  # what a second core buys (scikit-learn's two threads were slower)
        t0 = time.perf_counter()
        state.refresh_all(iters=1)
        two = n / (time.perf_counter() - t0)
    report.add("refresh speed-up vs sklearn, ours on 2 threads", two / sk_rate, "x",
               note=f"{two:,.0f} items/s, from the same streamed centroids; the target row "
               "above is one thread against one")
    report.add("refresh inertia / sklearn", inertia / sk_inertia, "x", "<= 1.01",
               note=f"same {len(ref_items):,} windows; ours over used slots ({emptied:,} of "
               f"{n * cfg.k:,} slots of the {n:,} items emptied by the step), sklearn's over all k")


def _memory_figures(report: BenchReport, cfg: WindowConfig, size: ClusterSize) -> None:
    bound = bytes_bound(cfg.size, DIM, cfg.vector_dtype)
    report.add("window bytes per item (bound)", bound, "bytes",
               note=f"size {cfg.size} x ({DIM} x {cfg.vector_dtype} + 32 bytes of bookkeeping) "
               "with the store's slack: a quarter more vector rows, twice the bookkeeping")
    report.add("window bytes per item (measured)", measured_window_bytes(cfg, size.memory_items),
               "bytes", note=f"tracemalloc, a store of {size.memory_items} full windows")
    report.add("window bytes per item (float16 bound)", bytes_bound(cfg.size, DIM, "float16"),
               "bytes", note="window.vector_dtype = float16")
