"""Freshness: a click produced -> a recommendation that reflects it, on both serving
paths that learn from clicks without retraining.

RALM's production system refreshes its seed clusters every 5 minutes; the
target here is p99 <= 2 s on the embedded broker. The workers run as their own
processes (``lookalike worker``), as in ``lookalike run``.

RALM path (click -> seed -> centroids -> recommendation). One probe: a fresh
user A with profile P clicks H (ten popular items) and then a probe item X that
nobody has clicked yet; a twin B with the same profile clicks H only. A is then
X's only seed, so X's centroids are A's embedding, which is nearly B's: X
enters B's recommendations as soon as the scoring worker has X's centroids.
From the moment A's click on X is produced the bench reads ``seed-centroids``
(leg 1: X published) and asks for B's recommendations every ``ask_every_s``
(leg 2: the first answer listing X).

SASRec path (click -> the scoring worker's live user state -> a ``seq``
pipeline's answer). Why a second path: SASRec reads the user's recent clicks
from the worker's state, not from centroids, so its freshness is a different
chain of waits. A third user C of the same probe clicks H; the bench knows
what SASRec answers for H (the model's own top-K, scored here) and picks Y, an
item whose click changes that top-K *set* (not only by Y leaving as seen: Y
is outside it). It asks for C's ``seq`` recommendations until the answer is
the model's top-K for H (C's history is in the worker), clicks Y, and asks
until the answer's set differs from that one. A differing answer "reflects"
the click: SASRec's answer depends only on the history, and nothing but the
click changes C's history; a click the worker never applies times out. The
answers that reflect are also checked against the model's top-K for H + [Y].

The baseline measured in the same run is the raw kafka-python produce ->
consume round trip through the same broker; the ratio of each path's p99 to
it says how many broker round trips freshness costs.

Model swap. Last, a retrained model (the serving one with its user tower nudged,
under a newer version) is announced on ``models``. The scoring worker loads it,
re-sends its users' seeds embedded by it, and serves it once the clustering
worker's centroids of the new version cover ``scoring.reload_min_coverage`` of
the items the old one served (``lookalike_model_swap_wait_seconds``): the time
until the workers serve one model again, every score of one version meanwhile.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer
from tqdm.auto import tqdm

from consumers.kafka import assign_all, make_consumer, make_producer
from consumers.pipelines import load_zoo, top_unseen
from consumers.replay import replay
from consumers.topics_admin import create_topic, create_topics
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
from engine.data import Dataset, load_dataset, profiles_of
from engine.topics import Topics
from lookalike.bench.report import BenchOptions, BenchReport
from lookalike.broker import EmbeddedBroker
from lookalike.pipeline import (
    WorkerProcess,
    ensure_checkpoint,
    spawn_worker,
    wait_drained,
    wait_ready,
    worker_metric,
)
from lookalike.scrape import quantile_from_histogram, scrape

if TYPE_CHECKING:
    from models.recommender import Recommender

A_BASE, B_BASE, C_BASE = 70_000_000, 80_000_000, 90_000_000  # user ids no dataset uses
SEQ = "seq"  # the SASRec pipeline the bench declares for its scoring worker
PIPELINES = {"default": {}, SEQ: {"sources": ["sasrec"], "ranker": "sasrec"}}


@dataclass
class Sizes:
    warmup_clicks: int
    probes: int
    round_trips: int
    timeout_s: float = 10.0
    ask_every_s: float = 0.05
    history: int = 10
    seq_k: int = 10  # the SASRec answer's length: its set is what a click must change
    seq_tries: int = 50  # candidate clicks scored offline per probe to find one that moves it


FULL, QUICK = Sizes(50_000, 40, 200), Sizes(3_000, 4, 30)


@dataclass
class Probe:
    """RALM path: A's click on a cold item, its centroids, B's first answer listing it."""

    item: int
    clicked_at: float
    published_at: float | None = None
    reflected_at: float | None = None


@dataclass
class SeqProbe:
    """SASRec path: the model's top-K for C's history, without and with the click on ``item``."""

    item: int
    before: frozenset[int]
    after: frozenset[int]
    ready: bool = False  # the worker answered ``before`` for C before the click
    clicked_at: float | None = None
    reflected_at: float | None = None
    as_expected: bool = False  # the answer that reflected the click was ``after``


@dataclass
class Probes:
    ralm: list[Probe]
    seq: list[SeqProbe]


def run(opts: BenchOptions) -> BenchReport:
    sizes = QUICK if opts.quick else FULL
    s = opts.settings
    ds = load_dataset("ml-100k", s.data_dir)
    train, _ = ds.time_split(0.8)
    ckpt = _checkpoint(s, train, opts.quick)
    run_dir = opts.out_dir / "freshness-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    sasrec = _sasrec_checkpoint(s, ds, run_dir)
    report = BenchReport("freshness", settings={
        "sizes": sizes.__dict__, "checkpoint": ckpt.name, "sasrec": sasrec.name,
        "pipelines": PIPELINES, "linger_ms": s.kafka.linger_ms})
    broker = None
    workers: list[WorkerProcess] = []
    try:
        bootstrap = opts.bootstrap_servers
        if bootstrap is None:
            broker = EmbeddedBroker(log_file=run_dir / "broker.log").start()
            bootstrap = broker.bootstrap_servers
        s = _bench_settings(s, bootstrap)
        create_topics(s.kafka)
        workers = [spawn_worker(kind, s, ckpt, run_dir, 0, _worker_env(sasrec, run_dir / "models"))
                   for kind in ("clustering", "scoring")]
        wait_ready(workers)
        rep = replay(ds, s.kafka, limit=sizes.warmup_clicks, progress=False)
        wait_drained(workers[1:], workers[:1], rep.events, timeout_s=300)
        rtt = round_trips(s, sizes.round_trips)
        before = scrape(workers[1].metrics_url)
        probes = run_probes(s, ds, sizes, _load(sasrec))
        server = _minus(scrape(workers[1].metrics_url), before)  # the probes' share only
        swap_s = swap_seconds(s, ckpt, workers[1], run_dir / "models", opts.seed)
    finally:
        for w in workers:
            w.stop()
        if broker is not None:
            broker.stop()
    _figures(report, probes.ralm, rtt, server)
    _seq_figures(report, probes.seq, rtt)
    report.add("model swap: announced -> the new version serves, its centroids covering "
               f"{s.scoring.reload_min_coverage:.0%} of the items", swap_s, "s", "<= 30",
               f"after reload_max_wait_s ({s.scoring.reload_max_wait_s:g} s) it would serve "
               "uncovered")
    return report


def swap_seconds(s: Settings, ckpt: Path, scorer: WorkerProcess, folder: Path,
                 seed: int) -> float:
    """Announce a retrained copy of the serving model; the scorer's wait until it serves."""
    import torch

    from consumers.model_reload import announce
    from models.checkpoint import make_version
    from models.ralm import RalmModel

    model = RalmModel.load(ckpt)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.user_tower.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    model.version = make_version("ralm", model.user_tower.state_dict(), at=time.time() + 1)
    folder.mkdir(parents=True, exist_ok=True)
    announce(s, model.save(folder / f"{model.version}.pt"))
    deadline = time.monotonic() + s.scoring.reload_max_wait_s + 60
    while time.monotonic() < deadline:
        waited = worker_metric(scorer, "lookalike_model_swap_wait_seconds")
        if waited > 0:
            return waited
        if scorer.proc.poll() is not None:
            raise RuntimeError(f"the scoring worker exited; see {scorer.log_path}")
        time.sleep(0.25)
    raise TimeoutError("the scoring worker did not swap to the announced model")


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


def _sasrec_checkpoint(s: Settings, ds: Dataset, run_dir: Path) -> Path:
    """The newest ``lookalike train sasrec`` checkpoint; none: a tiny one trained here in
    seconds (saved in the run folder, so the cache's newest stays a real one)."""
    found = sorted((s.checkpoint_dir / "sasrec").glob("sasrec-*.pt"))  # versions sort by time
    if found:
        return found[-1]
    from models.recommender import get_model
    from models.splits import make_split

    model = get_model("sasrec")(hidden=16, max_len=20, blocks=1, heads=1)
    model.fit(make_split(ds, "loo", seed=0), epochs=3, seed=0, threads=1, progress=False)
    return model.save(run_dir / "sasrec.pt")


def _load(path: Path) -> Recommender:
    """The checkpoint as the scoring worker loads it (``scoring.models``)."""
    return load_zoo({"sasrec": path})["sasrec"]


def _worker_env(sasrec: Path, models: Path) -> dict[str, str]:
    """The workers' settings beyond the defaults: one seed serves, and the SASRec pipeline."""
    return {"LOOKALIKE_SCORING__MIN_SEEDS": "1",
            "LOOKALIKE_SCORING__MODEL_DIRS": orjson.dumps([str(models)]).decode(),
            "LOOKALIKE_SCORING__MODELS": orjson.dumps({"sasrec": str(sasrec)}).decode(),
            "LOOKALIKE_SCORING__PIPELINES": orjson.dumps(PIPELINES).decode()}


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


def seq_probe(model: Recommender, history: list[int], candidates: np.ndarray,
              k: int) -> SeqProbe:
    """The candidate whose click changes SASRec's top-``k`` set for ``history`` most, by
    the model's own scores (candidates already in that set are passed over: their click
    would change it only by leaving it as seen)."""
    seen = set(history)
    before = frozenset(top_unseen(model.item_ids_, model.score([history])[0], seen, k))
    cands = [int(i) for i in candidates if int(i) not in before and int(i) not in seen]
    rows = model.score([[*history, c] for c in cands])
    afters = [frozenset(top_unseen(model.item_ids_, row, seen | {c}, k))
              for c, row in zip(cands, rows, strict=True)]
    best = int(np.argmax([len(a - before) for a in afters])) if cands else -1
    if best < 0 or not afters[best] - before:
        raise ValueError(f"none of {len(cands)} clicks changes SASRec's top-{k}; raise seq_tries")
    return SeqProbe(cands[best], before, afters[best])


@dataclass
class Asker:
    """Score requests for one user every ``every_s`` until an answer satisfies a test."""

    producer: KafkaProducer
    topic: str
    recs: KafkaConsumer
    every_s: float

    def until(self, user: int, body: dict, done: Callable[[list[int]], bool],
              deadline: float, between: Callable[[], None] | None = None,
              ) -> tuple[float, list[int]] | None:
        """(when, items) of the first answer to these requests that ``done`` accepts; None at
        ``deadline``. ``between`` runs once a loop (another topic's reader)."""
        asked: set[str] = set()
        next_ask = 0.0
        while time.time() < deadline:
            now = time.time()
            if now >= next_ask:
                rid = uuid.uuid4().hex[:12]
                asked.add(rid)
                self.producer.send(self.topic, key=key_of(user), value=encode_json(
                    {"user_id": user, "request_id": rid, **body}))
                self.producer.flush()
                next_ask = now + self.every_s
            if between is not None:
                between()
            for rs in self.recs.poll(timeout_ms=5).values():
                for r in rs:
                    obj = orjson.loads(r.value)
                    items = [it["item_id"] for it in obj["items"]]
                    if obj.get("request_id") in asked and done(items):
                        return time.time(), items
        return None


def run_probes(s: Settings, ds: Dataset, sizes: Sizes, sasrec: Recommender) -> Probes:
    names = Topics(s.kafka.topic_prefix)
    rng, seq_rng = np.random.default_rng(0), np.random.default_rng(1)  # RALM's draws as before
    items = probe_items(ds, sizes.warmup_clicks, sizes.probes, rng)
    popular = ds.items.ids[np.argsort(-np.bincount(ds.item[:sizes.warmup_clicks]))]
    # SASRec's probe clicks: known to it, never a RALM probe item (those must stay cold)
    seq_items = np.setdiff1d(np.intersect1d(sasrec.item_ids_, ds.items.ids), items)
    profiles = profiles_of(ds)
    producer = make_producer(s.kafka, linger_ms=0)
    # the probe's own click waits as the engine's replayed clicks do (kafka.linger_ms)
    clicker = make_producer(s.kafka, linger_ms=s.kafka.linger_ms.get("clicks", 0))
    centroids = _tail(s, names.seed_centroids)
    asker = Asker(producer, names.score_requests, _tail(s, names.recommendations),
                  sizes.ask_every_s)
    out = Probes([], [])
    try:
        for j, item in enumerate(tqdm(items, desc="freshness probes", leave=False)):
            profile = profiles[int(rng.integers(len(profiles)))]
            history = popular[rng.permutation(3 * sizes.history)[:sizes.history]]
            a, b, c = A_BASE + j, B_BASE + j, C_BASE + j
            for user in (a, b, c):
                for h in history:
                    _click(producer, names.clicks, user, int(h), profile)
            producer.flush()
            seq = seq_probe(sasrec, history.tolist(),
                            seq_rng.permutation(seq_items)[:sizes.seq_tries], sizes.seq_k)
            time.sleep(0.5)  # the probe users' histories are in the scoring worker's state
            out.ralm.append(_probe(clicker, names, centroids, asker, a, b, int(item), profile,
                                   sizes))
            _seq_probe(clicker, names, asker, c, seq, profile, sizes)
            out.seq.append(seq)
    finally:
        producer.close()
        clicker.close()
        centroids.close()
        asker.recs.close()
    return out


def _click(producer: KafkaProducer, topic: str, user: int, item: int, profile: Profile) -> float:
    now = time.time()
    producer.send(topic, key=key_of(user), value=encode_click(Click(user, item, now, profile)))
    return now


def _probe(producer: KafkaProducer, names: Topics, centroids: KafkaConsumer, asker: Asker, a: int,
           b: int, item: int, profile: Profile, sizes: Sizes) -> Probe:
    p = Probe(item, _click(producer, names.clicks, a, item, profile))  # sent after its linger

    def published() -> None:
        for rs in centroids.poll(timeout_ms=5).values():
            for r in rs:
                if p.published_at is None and decode_key(r.key) == item and decode_centroids(
                        r.value) is not None:
                    p.published_at = time.time()

    got = asker.until(b, {"k": 50}, lambda got: item in got, p.clicked_at + sizes.timeout_s,
                      published)
    p.reflected_at = None if got is None else got[0]
    return p


def _seq_probe(producer: KafkaProducer, names: Topics, asker: Asker, c: int, p: SeqProbe,
               profile: Profile, sizes: Sizes) -> None:
    """C's answer is SASRec's top-K for its history; then the click; then a changed answer."""
    body = {"k": sizes.seq_k, "pipeline": SEQ}
    ready = asker.until(c, body, lambda got: frozenset(got) == p.before,
                        time.time() + sizes.timeout_s)
    p.ready = ready is not None
    if not p.ready:
        return  # the worker never answered from C's history: no baseline to differ from
    p.clicked_at = _click(producer, names.clicks, c, p.item, profile)
    got = asker.until(c, body, lambda got: frozenset(got) != p.before,
                      p.clicked_at + sizes.timeout_s)
    if got is not None:
        p.reflected_at, p.as_expected = got[0], frozenset(got[1]) == p.after


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
    _reflected(report, "", reflected, n, rtt, "RALM in production: 300 s")
    worker_p99 = quantile_from_histogram(server, "lookalike_click_to_recommendation_seconds", 0.99)
    report.add("worker-side freshness p99 (histogram bucket bound)", worker_p99, "s",
               note="click produced -> centroid table refreshed, scraped over HTTP")


def _seq_figures(report: BenchReport, probes: list[SeqProbe], rtt: np.ndarray) -> None:
    n = len(probes)
    done = [p for p in probes if p.reflected_at is not None and p.clicked_at is not None]
    reflected = np.array([p.reflected_at - p.clicked_at for p in done])
    report.add("SASRec: probes answered from their history before the click",
               sum(p.ready for p in probes) / max(n, 1), "fraction", ">= 0.95",
               "the answer was the model's own top-K for the history")
    _reflected(report, "SASRec: ", reflected, n, rtt, "click -> live user state -> seq pipeline")
    report.add("SASRec: reflecting answers equal to the model's top-K with the click",
               sum(p.as_expected for p in done) / max(len(done), 1), "fraction", ">= 0.95",
               "checked offline with the same checkpoint")


def _reflected(report: BenchReport, path: str, reflected: np.ndarray, n: int,
               rtt: np.ndarray, note: str) -> None:
    """One path's share of probes reflected, its p50 and p99 (<= 2 s), and its p99 in raw
    round trips."""
    report.add(f"{path}probes reflected in a recommendation", len(reflected) / max(n, 1),
               "fraction", ">= 0.95", "the rest timed out")
    report.add(f"{path}click -> a recommendation that reflects it, p50", _pct(reflected, 50), "s")
    report.add(f"{path}click -> a recommendation that reflects it, p99", _pct(reflected, 99), "s",
               "<= 2.0", note)
    report.add(f"{path}freshness p99 / raw round trip p99",
               _pct(reflected, 99) / np.percentile(rtt, 99), "ratio",
               note="broker round trips freshness costs")


def _minus(after: dict, before: dict) -> dict:
    """Counter and bucket samples accumulated between two scrapes."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")
