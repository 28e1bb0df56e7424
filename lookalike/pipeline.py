"""``lookalike run``: the whole dataflow in one command, on real data.

Fetch MovieLens-100k, train RALM once (the checkpoint is reused), start the
embedded broker, start the clustering and scoring workers as processes of
their consumer groups, replay every click, wait until the pipeline has drained
(judged from the workers' own Prometheus metrics, scraped over HTTP), then ask
for recommendations for a few known users and for one brand-new user who
clicked three films a moment ago, print them with titles, and stop everything
this command started (by PID).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from consumers.kafka import make_producer
from consumers.recommend import request_recommendations
from consumers.replay import replay
from consumers.topics_admin import create_topics
from engine.codec import Click, Profile, encode_click, key_of
from engine.config import Settings
from engine.data import Dataset, load_dataset, profiles_of
from engine.topics import Topics
from lookalike.broker import EmbeddedBroker, free_port, long_run_settings
from lookalike.processes import CpuWatch, terminate
from lookalike.scrape import quantile_from_histogram, scrape, total

log = logging.getLogger(__name__)

#: the new user of the demo: three Star Wars films, no history before
NEW_USER_ID = 10_000_001
NEW_USER_TITLES = ("Star Wars", "Empire Strikes Back, The", "Return of the Jedi")


@dataclass(frozen=True)
class DemoOptions:
    rate: float | None = None
    limit: int | None = None
    scoring_workers: int = 1
    clustering_workers: int = 1
    show_users: int = 4
    retrain: bool = False
    bootstrap_servers: str | None = None
    drain_timeout_s: float = 300.0


@dataclass
class WorkerProcess:
    kind: str
    proc: subprocess.Popen
    metrics_url: str
    log_path: Path

    def stop(self, timeout_s: float = 20.0) -> None:
        terminate(self.proc, timeout_s)


def ensure_checkpoint(s: Settings, train: Dataset, retrain: bool) -> Path:
    """The latest RALM checkpoint if it was trained with today's default settings; else
    a new one (an upgrade changes the defaults: the demo serves what was evaluated)."""
    from models.checkpoint import CheckpointError
    from models.ralm import RalmConfig, RalmModel
    from models.train_ralm import latest_checkpoint, train_ralm

    path = None if retrain else latest_checkpoint(s.checkpoint_dir)
    if path is not None:
        try:
            old = RalmModel.load(path).config.model_dump()
        except CheckpointError as e:
            old = {"unreadable": str(e)}
        changed = sorted(k for k, v in RalmConfig().model_dump().items() if old.get(k) != v)
        if not changed:
            print(f"using checkpoint {path.name}", flush=True)
            return path
        print(f"checkpoint {path.name} was trained with other settings ({', '.join(changed)})",
              flush=True)
    print("training RALM on the time-split training part of ml-100k ...", flush=True)
    return train_ralm(train, RalmConfig(), s.checkpoint_dir)


def spawn_worker(kind: str, s: Settings, ckpt: Path, run_dir: Path, i: int,
                 env: dict[str, str] | None = None) -> WorkerProcess:
    port = free_port()
    log_path = run_dir / f"{kind}-{i}.log"
    cmd = [sys.executable, "-m", "lookalike.cli", "worker", kind,
           "--bootstrap-servers", s.kafka.bootstrap_servers, "--metrics-port", str(port),
           "--cache-dir", str(s.cache_dir), "--checkpoint", str(ckpt)]
    if s.kafka.topic_prefix:
        cmd += ["--topic-prefix", s.kafka.topic_prefix]
    env = {**os.environ, "LOOKALIKE_KAFKA__PARTITIONS": str(s.kafka.partitions),
           "LOOKALIKE_KAFKA__LINGER_MS": json.dumps(s.kafka.linger_ms),
           "LOOKALIKE_KAFKA__BATCH_BYTES": str(s.kafka.batch_bytes), **(env or {})}
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return WorkerProcess(kind, proc, f"http://127.0.0.1:{port}/metrics", log_path)


def worker_metric(w: WorkerProcess, name: str, **labels: str) -> float:
    """A metric of a worker process, summed over its other labels (NaN: unreachable)."""
    try:
        return total(scrape(w.metrics_url), name, **labels)
    except OSError:
        return float("nan")


def wait_ready(workers: list[WorkerProcess], timeout_s: float = 120.0) -> None:
    """Every group member has partitions (the groups are formed)."""
    deadline = time.monotonic() + timeout_s
    for w in workers:
        while not worker_metric(w, "lookalike_assigned_partitions") > 0:
            if w.proc.poll() is not None:
                raise RuntimeError(f"{w.kind} worker exited; see {w.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{w.kind} worker not ready; see {w.log_path}")
            time.sleep(0.25)


def wait_drained(scoring: list[WorkerProcess], clustering: list[WorkerProcess], n_clicks: int,
                 timeout_s: float) -> float:
    """Until every click became a seed and every seed reached a window; returns when."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        clicks = sum(worker_metric(w, "lookalike_events_consumed_total", topic="clicks")
                     for w in scoring)
        dead = sum(worker_metric(w, "lookalike_dead_letters_total", topic="clicks")
                   for w in scoring)
        seeds_out = sum(worker_metric(w, "lookalike_events_produced_total", topic="seed-events")
                        for w in scoring)
        msgs_out = sum(worker_metric(w, "lookalike_events_produced_total", topic="seed-centroids")
                       for w in clustering)
        lag = sum(worker_metric(w, "lookalike_consumer_lag_messages") for w in scoring + clustering)
        if clicks >= n_clicks and seeds_out + dead >= n_clicks and msgs_out > 0 and lag == 0:
            return time.monotonic()
        for w in scoring + clustering:
            if w.proc.poll() is not None:
                raise RuntimeError(f"{w.kind} worker exited; see {w.log_path}")
        time.sleep(0.25)
    raise TimeoutError("the pipeline did not drain in time")


def _title_index(ds: Dataset) -> dict[int, str]:
    return {int(i): t for i, t in zip(ds.items.ids, ds.items.title)}


def _find_items(ds: Dataset, titles: tuple[str, ...]) -> list[int]:
    out = []
    for t in titles:
        hits = [int(i) for i, title in zip(ds.items.ids, ds.items.title) if title.startswith(t)]
        if hits:
            out.append(hits[0])
    return out


def _describe(p: Profile) -> str:
    bits = [f"{p.age:.0f}" if p.age is not None else "", p.gender or "", p.occupation or ""]
    return " ".join(b for b in bits if b)


def run_demo(s: Settings, o: DemoOptions) -> int:
    t_start = time.monotonic()
    ds = load_dataset("ml-100k", s.data_dir)
    print(ds.summary(), flush=True)
    train, _ = ds.time_split(0.8)
    ckpt = ensure_checkpoint(s, train, o.retrain)
    run_dir = s.cache_dir / "runs" / time.strftime("%Y%m%dT%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    broker, watch = None, None
    workers: list[WorkerProcess] = []
    try:
        if o.bootstrap_servers:
            s = s.model_copy(update={"kafka": s.kafka.model_copy(
                update={"bootstrap_servers": o.bootstrap_servers})})
        else:
            broker = EmbeddedBroker(log_file=run_dir / "broker.log").start()
            s = long_run_settings(s.model_copy(update={"kafka": s.kafka.model_copy(
                update={"bootstrap_servers": broker.bootstrap_servers})}))
            print(f"embedded broker on {broker.bootstrap_servers}", flush=True)
            assert broker.proc is not None
            watch = CpuWatch(broker.proc.pid, every_s=10.0).start()
        create_topics(s.kafka)
        clustering = [spawn_worker("clustering", s, ckpt, run_dir, i)
                      for i in range(o.clustering_workers)]
        scoring = [spawn_worker("scoring", s, ckpt, run_dir, i) for i in range(o.scoring_workers)]
        workers = clustering + scoring
        wait_ready(workers)
        print(f"workers ready: {len(scoring)} scoring, {len(clustering)} clustering "
              f"(logs in {run_dir})", flush=True)

        rep = replay(ds, s.kafka, rate=o.rate, limit=o.limit)
        t_replayed = time.monotonic()
        t_drained = wait_drained(scoring, clustering, rep.events, o.drain_timeout_s)
        pipeline_s = t_drained - (t_replayed - rep.seconds)
        print(f"replayed {rep.events:,} clicks in {rep.seconds:.1f} s; pipeline drained "
              f"{t_drained - t_replayed:.1f} s later", flush=True)

        results = show_recommendations(s, ds, o.show_users)
        latencies = [r["received_at"] - r["sent_at"] for r in results.values()]
        items = sum(worker_metric(w, "lookalike_centroid_table_items") for w in scoring[:1])
        dlq = sum(worker_metric(w, "lookalike_dead_letters_total") for w in workers)
        print(freshness_line(scoring), flush=True)
        print(
            f"summary: {rep.events:,} clicks through every stage in {pipeline_s:.1f} s "
            f"({rep.events / pipeline_s:,.0f} clicks/s end to end; replay {rep.rate:,.0f}/s); "
            f"{items:,.0f} items with live centroids; {len(results)} recommendation lists, "
            f"request->recommendation max {1000 * max(latencies, default=0):.0f} ms; "
            f"{dlq:.0f} dead letters; demo wall time {time.monotonic() - t_start:.0f} s",
            flush=True,
        )
        return 0
    finally:
        if watch is not None:
            broker_curve(watch.stop(), run_dir)
        for w in workers:
            w.stop()
        if broker is not None:
            broker.stop()


def freshness_line(scoring: list[WorkerProcess]) -> str:
    """Click produced -> its seed in the centroids a scoring worker serves, over the run,
    from the workers' histogram (the p99 is its bucket's upper bound)."""
    name = "lookalike_click_to_recommendation_seconds"
    merged: dict = {}
    for w in scoring:
        try:
            for key, v in scrape(w.metrics_url).items():
                merged[key] = merged.get(key, 0.0) + v
        except OSError:
            continue
    n = total(merged, f"{name}_count")
    if not n:
        return "freshness: no click reached served centroids while the workers counted"
    return (f"freshness (click -> served centroids, {n:,.0f} clicks): mean "
            f"{total(merged, f'{name}_sum') / n:.2f} s, p99 <= "
            f"{quantile_from_histogram(merged, name, 0.99):g} s (histogram bucket)")


def broker_curve(samples: list[tuple[float, float]], run_dir: Path) -> None:
    """The embedded broker's CPU over the run: ``broker_cpu.json`` (and ``.png`` where
    matplotlib is installed) in the run's folder, and a line comparing its start and end.
    Why: the broker's cost grows with the batches it holds (docs/operations.md)."""
    if not samples:
        return
    (run_dir / "broker_cpu.json").write_text(json.dumps(
        [{"t_s": round(t, 1), "cores": round(c, 4)} for t, c in samples]))
    span = max(1, len(samples) // 6)  # the first and last sixth of the run
    first = float(np.mean([c for _, c in samples[:span]]))
    last = float(np.mean([c for _, c in samples[-span:]]))
    minutes = samples[-1][0] / 60
    print(f"embedded broker CPU: {first:.3f} cores in the first sixth of the run, {last:.3f} "
          f"in the last ({minutes:.1f} min; curve: {run_dir / 'broker_cpu.json'})", flush=True)
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot([t / 60 for t, _ in samples], [c for _, c in samples])
    ax.set_xlabel("minutes into the run")
    ax.set_ylabel("broker CPU (cores)")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(run_dir / "broker_cpu.png", dpi=100)
    plt.close(fig)


def show_recommendations(s: Settings, ds: Dataset, n_users: int) -> dict[str, dict]:
    """Known users (most active first) and one new user; prints titles."""
    names = Topics(s.kafka.topic_prefix)
    titles = _title_index(ds)
    profiles = profiles_of(ds)
    counts = np.bincount(ds.user, minlength=len(ds.users))
    rng = np.random.default_rng(0)
    known = rng.choice(np.flatnonzero(counts >= 20), size=n_users, replace=False)

    # the new user clicks now; their clicks go through the same stages
    new_items = _find_items(ds, NEW_USER_TITLES)
    new_profile = Profile(age=25, gender="F", occupation="student", zip_code="94110")
    producer = make_producer(s.kafka, linger_ms=0)
    for item in new_items:
        click = Click(NEW_USER_ID, item, time.time(), new_profile)
        producer.send(names.clicks, key=key_of(NEW_USER_ID), value=encode_click(click))
    producer.flush()
    producer.close()
    time.sleep(0.5)  # the scoring worker sees the clicks before the request

    requests = [{"user_id": int(ds.users.ids[u]), "k": 5, "request_id": f"demo-{i}",
                 "sent_at": time.time()} for i, u in enumerate(known)]
    requests.append({"user_id": NEW_USER_ID, "k": 5, "request_id": "demo-new",
                     "sent_at": time.time()})
    got = request_recommendations(s, requests)
    for r in requests:
        rec = got.get(r["request_id"])
        if r["user_id"] == NEW_USER_ID:
            who = f"new user {NEW_USER_ID} ({_describe(new_profile)}), clicked just now: " + \
                "; ".join(titles[i] for i in new_items)
        else:
            u = ds.user_index()[r["user_id"]]
            last = ds.item[ds.user == u][-3:]
            who = f"user {r['user_id']} ({_describe(profiles[u])}), last clicked: " + \
                "; ".join(titles[int(ds.items.ids[i])] for i in last)
        print(f"\n{who}")
        if rec is None:
            print("  (no answer in time)")
            continue
        if not rec["items"]:
            print("  (no items with seeds yet)")
        for j, it in enumerate(rec["items"], 1):
            print(f"  {j}. {titles.get(it['item_id'], it['item_id'])}  ({it['score']:.3f})")
        rec["sent_at"] = r["sent_at"]
    print(flush=True)
    return {k: v for k, v in got.items() if "sent_at" in v}
