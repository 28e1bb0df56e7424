"""``lookalike bench soak``: minutes of steady load; does anything drift?

The workers run as their own processes on the embedded broker, as in
``lookalike run``. First a calibration: a burst of real ml-100k clicks
through the pipeline as fast as it takes them gives this deployment's ingest
rate. Then, for ``seconds`` (600 by default), clicks at 80% of that rate and
score requests at ``request_rate`` per second (500), with a few bad clicks
injected every 30 s. Every ``window_s`` the bench samples each worker's RSS
(``/proc``), the request latencies of the window (request produced ->
recommendation consumed), the consumer lag and the error counters (scraped
over HTTP).

Targets (issue 8): RSS flat (the last sample within 10% of the one after the
first minute: state is bounded by configuration); the last minute's p99
within 20% of the first minute's; no error counter moves except the dead
letters of the injected bad clicks; no request lost.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from consumers.replay import replay
from consumers.topics_admin import create_topics
from engine.config import Settings
from engine.data import Dataset, load_dataset
from lookalike.bench.freshness import _checkpoint
from lookalike.bench.load import Pumps, click_pool
from lookalike.bench.report import BenchOptions, BenchReport
from lookalike.broker import EmbeddedBroker, long_run_settings
from lookalike.pipeline import WorkerProcess, spawn_worker, wait_ready, worker_metric
from lookalike.processes import cpu_seconds, rss_bytes
from lookalike.scrape import scrape, total

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoakSize:
    seconds: float
    request_rate: float
    window_s: float
    calibration_clicks: int
    first_s: float  # "the first minute": the baseline window of RSS and latency
    bad_every_s: float = 30.0
    bad_per_injection: int = 3
    trial_s: float = 45.0  # each steady trial of `_sustained`
    #: a trial holds only if requests were answered within this (p99, its second half):
    #: a scoring worker that keeps up with the clicks but queues the requests is full
    trial_p99_s: float = 1.0


FULL = SoakSize(600, 500, 10, 30_000, 60)
QUICK = SoakSize(24, 40, 4, 2_000, 8, bad_every_s=8, trial_s=4)


@dataclass
class Window:
    t: float  # seconds since the soak started
    rss: dict[str, float]  # worker kind -> bytes
    p50_ms: float
    p99_ms: float
    answered: int
    lag: float
    clicks_sent: int
    cpu: dict[str, float] = field(default_factory=dict)  # process -> cores used in the window
    batches: dict[str, float] = field(default_factory=dict)  # topic -> batches/s, all producers


def _counters(workers: list[WorkerProcess]) -> dict[str, float]:
    """Summed over the workers; ``batches:<topic>``: the batches they produced so far."""
    out = {"dead_letters": 0.0, "errors": 0.0, "lag": 0.0}
    for w in workers:
        m = scrape(w.metrics_url)
        out["dead_letters"] += total(m, "lookalike_dead_letters_total")
        out["errors"] += total(m, "lookalike_errors_total")
        out["lag"] += total(m, "lookalike_consumer_lag_messages")
        for (name, labels), value in m.items():
            if name == "lookalike_batches_produced_total":
                key = f"batches:{dict(labels)['topic']}"
                out[key] = out.get(key, 0.0) + value
    return out


def run(opts: BenchOptions) -> BenchReport:
    size = QUICK if opts.quick else FULL
    s = opts.settings
    ds = load_dataset("ml-100k", s.data_dir)
    ckpt = _checkpoint(s, ds.time_split(0.8)[0], opts.quick)
    run_dir = opts.out_dir / "soak-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    broker, workers = None, []
    try:
        bootstrap = opts.bootstrap_servers
        if bootstrap is None:
            broker = EmbeddedBroker(log_file=run_dir / "broker.log").start()
            bootstrap = broker.bootstrap_servers
            s = long_run_settings(s)
        prefix = f"bench-soak-{uuid.uuid4().hex[:6]}-"
        s = s.model_copy(update={"kafka": s.kafka.model_copy(update={
            "bootstrap_servers": bootstrap, "topic_prefix": prefix})})
        create_topics(s.kafka)
        workers = [spawn_worker(kind, s, ckpt, run_dir, 0) for kind in ("clustering", "scoring")]
        wait_ready(workers)
        burst = _calibrate(s, ds, workers, size.calibration_clicks, size.request_rate)
        ingest = _sustained(s, ds, workers, size, burst)
        before = _counters(workers)
        watched = {w.kind: w.proc.pid for w in workers}
        if broker is not None and broker.proc is not None:
            watched["broker"] = broker.proc.pid  # its CPU shows a broker that falls behind
        windows, pumps = _soak(s, ds, workers, size, 0.8 * ingest, watched)
        _settle(workers, timeout_s=60)  # the last injected bad clicks reach the workers
        after = _counters(workers)
    finally:
        for w in workers:
            w.stop()
        if broker is not None:
            broker.stop()
    report = _report(size, burst, ingest, windows, pumps, before, after)
    plot(windows, opts.out_dir / "soak.png")
    return report


def _batches(counters: dict[str, float]) -> dict[str, float]:
    return {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("batches:")}


def _settle(workers: list[WorkerProcess], timeout_s: float) -> None:
    """Until the workers' consumer lag is 0 (or ``timeout_s``): what was sent is read."""
    deadline = time.monotonic() + timeout_s
    time.sleep(5.0)  # the lag gauges are refreshed every 2 s: none may predate the last send
    while time.monotonic() < deadline and _counters(workers)["lag"] > 0:
        time.sleep(0.5)


def _calibrate(s: Settings, ds: Dataset, workers: list[WorkerProcess], n: int,
               request_rate: float) -> float:
    """Clicks/s this deployment ingests while it answers ``request_rate`` requests/s:
    with the soak's request load flowing, a warm-up burst of ``n`` real clicks, then
    a measured one of ``n`` more, produced as fast as kafka-python can; measured until
    every click is a seed in a window and no request waits.

    Why so: a burst of clicks alone measured 5.4k clicks/s (the first soak's click
    lag grew to 2.7M at 80% of it); one burst under request load but onto an empty
    centroid table (requests cheap: few items to rank) measured 3.0k/s, and at 80%
    of it the second soak fell behind in its first two minutes: ranking a full
    table costs each request ~4x more."""
    requests = Pumps(s, [], [], np.unique(ds.users.ids[ds.user]), 0.0, request_rate)
    threads = requests.start()  # no clicks: its click rate is 0
    try:
        warm = replay(ds, s.kafka, limit=n, progress=False)
        _clicks_drained(workers, warm.events, timeout_s=600)
        t0 = time.monotonic()
        rep = replay(ds, s.kafka, limit=2 * n, skip=n, progress=False)
        _clicks_drained(workers, warm.events + rep.events, timeout_s=600)
        done = _requests_drained(workers, timeout_s=600)
    finally:
        requests.finish(threads, drain_s=5)
    return rep.events / (done - t0)


def _sustained(s: Settings, ds: Dataset, workers: list[WorkerProcess], size: SoakSize,
               rate: float, tries: int = 3) -> float:
    """The click rate both workers keep up with under the soak's own steady load,
    answering its requests within ``size.trial_p99_s``.

    Why: a burst is produced by one fast replay and then leaves the machine to the
    workers, but the soak's load generators keep producing clicks and requests on
    the same cores as the workers and the broker. At 80% of the burst rate (3.5k
    clicks/s) the fifth soak's click lag grew from its first two minutes, with the
    scoring worker at 0.9 cores. So: steady trials of ``size.trial_s`` s with the
    soak's own pumps, starting at ``rate``; a trial the scoring worker did not keep up
    with (clicks consumed below 95% of those offered) sets the next trial's rate to
    what it consumed, one whose requests waited (p99 of the trial's second half over
    ``size.trial_p99_s``: a soak whose scoring worker kept up with 6.7k clicks/s
    answered its requests at 2.3 s p99 in the first minute and 4.1 s in the last)
    to 80% of it; the workers drain between trials."""
    values, keys = click_pool(ds, 20_000 if size.seconds < 60 else 200_000, seed=1)
    users = np.unique(ds.users.ids[ds.user])
    for _ in range(tries):
        pumps = Pumps(s, values, keys, users, rate, size.request_rate)
        before = _clicks_consumed(workers)
        threads = pumps.start()
        time.sleep(size.trial_s)
        consumed, sent = _clicks_consumed(workers) - before, pumps.clicks_sent
        late = [x for t, x in pumps.latencies if t >= pumps.started + size.trial_s / 2]
        pumps.finish(threads, drain_s=5)
        _settle(workers, timeout_s=600)
        p99 = float(np.percentile(late, 99)) if late else float("inf")
        log.info("soak calibration: %.0f clicks/s offered, %.0f/s consumed, request p99 "
                 "%.2f s in the trial's second half", sent / size.trial_s,
                 consumed / size.trial_s, p99)
        if consumed < 0.95 * sent:
            rate = consumed / size.trial_s
        elif p99 > size.trial_p99_s:
            rate *= 0.8
        else:
            return rate
    return rate


def _clicks_consumed(workers: list[WorkerProcess]) -> float:
    """Clicks read by the scoring worker (the pipeline's bottleneck: seed events travel
    many per record, and the clustering worker reads them at a fraction of a core)."""
    return sum(worker_metric(w, "lookalike_events_consumed_total", topic="clicks")
               for w in workers if w.kind == "scoring")


def _lag(workers: list[WorkerProcess], topics: tuple[str, ...]) -> float:
    return sum(worker_metric(w, "lookalike_consumer_lag_messages", topic=t)
               for w in workers for t in topics)


def _clicks_drained(workers: list[WorkerProcess], n: int, timeout_s: float) -> float:
    """When the scoring worker has consumed ``n`` clicks and neither worker lags on
    clicks or seed-events (requests keep flowing, so their lag is not waited for)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _clicks_consumed(workers) >= n and _lag(workers, ("clicks", "seed-events")) == 0:
            return time.monotonic()
        time.sleep(0.25)
    raise TimeoutError("the clicks were not all ingested in time")


def _requests_drained(workers: list[WorkerProcess], timeout_s: float) -> float:
    """When no score request waits (the lag gauges are refreshed every 2 s: a few
    readings in a row at 0, as requests keep arriving)."""
    deadline, zeros = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        zeros = zeros + 1 if _lag(workers, ("score-requests",)) == 0 else 0
        if zeros >= 3:
            return time.monotonic()
        time.sleep(0.25)
    raise TimeoutError("score requests kept waiting: the request rate alone is too much")


def _soak(s: Settings, ds: Dataset, workers: list[WorkerProcess], size: SoakSize,
          click_rate: float, watched: dict[str, int]) -> tuple[list[Window], Pumps]:
    values, keys = click_pool(ds, 20_000 if size.seconds < 60 else 200_000)
    pumps = Pumps(s, values, keys, np.unique(ds.users.ids[ds.user]), click_rate,
                  size.request_rate)
    threads = pumps.start()
    t0, windows, seen = time.monotonic(), [], 0
    cpu_was, t_was = {k: cpu_seconds(pid) for k, pid in watched.items()}, t0
    batches_was = _batches(_counters(workers))
    pumps.batches.take()
    next_bad = t0 + size.bad_every_s
    try:
        while (now := time.monotonic()) - t0 < size.seconds:
            time.sleep(min(size.window_s, max(0.0, t0 + size.seconds - now)))
            if time.monotonic() >= next_bad:
                pumps.inject_bad(size.bad_per_injection)
                next_bad += size.bad_every_s
            lat = np.array([x for _, x in pumps.latencies[seen:]]) * 1e3
            seen = len(pumps.latencies)
            c = _counters(workers)
            cpu_now, t_now = {k: cpu_seconds(pid) for k, pid in watched.items()}, time.monotonic()
            cpu = {k: (cpu_now[k] - cpu_was[k]) / (t_now - t_was) for k in watched}
            batches_now = _batches(c)
            with pumps.lock:
                pumped = pumps.batches.take()
            made = {t: batches_now.get(t, 0.0) - batches_was.get(t, 0.0) + pumped.get(t, 0)
                    for t in batches_now.keys() | pumped.keys()}
            batches = {t: n / (t_now - t_was) for t, n in sorted(made.items())}
            cpu_was, t_was, batches_was = cpu_now, t_now, batches_now
            windows.append(Window(
                time.monotonic() - t0, {w.kind: rss_bytes(w.proc.pid) for w in workers},
                float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                len(lat), c["lag"], pumps.clicks_sent, cpu, batches))
    finally:
        pumps.finish(threads, drain_s=30)
    return windows, pumps


def _report(size: SoakSize, burst: float, ingest: float, windows: list[Window], pumps: Pumps,
            before: dict[str, float], after: dict[str, float]) -> BenchReport:
    report = BenchReport("soak", settings={**size.__dict__, "click_rate": pumps.click_rate})
    first = [w for w in windows if w.t <= size.first_s + 1e-9] or windows[:1]
    last = [w for w in windows if w.t >= windows[-1].t - size.first_s]
    lat_first = _p99([w for w in first])
    lat_last = _p99(last)
    report.add("burst ingest rate", burst, "clicks/s", note="burst of real clicks "
               "through both workers until every one is a seed in a window")
    report.add("calibrated ingest rate", ingest, "clicks/s", note="what both workers kept "
               "up with under the soak's own steady load (trials of "
               f"{size.trial_s:.0f} s)")
    report.add("click rate offered (80% of calibrated)", pumps.click_rate, "clicks/s")
    report.add("clicks sent", pumps.clicks_sent, "clicks")
    report.add("requests sent", pumps.requests_sent, "requests",
               note=f"{size.request_rate:.0f}/s offered")
    report.add("requests lost", len(pumps.sent_at), "requests", "<= 0",
               "no recommendation within 30 s of the end")
    for kind in windows[0].rss:
        base = first[-1].rss[kind]
        report.add(f"{kind} RSS after the first minute", base / 2**20, "MiB")
        report.add(f"{kind} RSS at the end", windows[-1].rss[kind] / 2**20, "MiB")
        report.add(f"{kind} RSS end / after first minute", windows[-1].rss[kind] / base, "x",
                   "<= 1.1", "flat: state bounded by configuration")
    report.add("request p99, first minute", lat_first, "ms")
    report.add("request p99, last minute", lat_last, "ms")
    report.add("p99 last minute / first minute", lat_last / lat_first, "x", "<= 1.2")
    second = [w for w in windows if size.first_s < w.t <= 2 * size.first_s + 1e-9] or first
    for proc in windows[0].cpu:
        report.add(f"{proc} CPU, first minute / last minute",
                   float(np.mean([w.cpu[proc] for w in first])), "cores",
                   note=f"last minute {np.mean([w.cpu[proc] for w in last]):.2f}")
    if "broker" in windows[0].cpu:
        cpu2 = float(np.mean([w.cpu["broker"] for w in second]))
        cpu_last = float(np.mean([w.cpu["broker"] for w in last]))
        report.add("broker CPU last minute / second minute", cpu_last / max(cpu2, 1e-9), "x",
                   "<= 1.2", f"flat: {cpu2:.3f} -> {cpu_last:.3f} cores (its cost grows with "
                   "the batches it holds)")
    topics = sorted({t for w in windows for t in w.batches})
    for t in topics:
        rates = [w.batches.get(t, 0.0) for w in windows]
        report.add(f"batches/s produced to {t}", float(np.mean(rates)), "batches/s",
                   note=f"max window {max(rates):.1f}; every producer: workers and load")
    report.add("consumer lag at the end", windows[-1].lag, "messages")
    report.add("bad clicks injected", pumps.bad_sent, "records")
    dead = after["dead_letters"] - before["dead_letters"]
    report.add("dead letters beyond the injected", dead - pumps.bad_sent, "records", "<= 0")
    report.add("error counter increase", after["errors"] - before["errors"], "events", "<= 0",
               "lookalike_errors_total (transient broker faults)")
    return report


def _p99(windows: list[Window]) -> float:
    """The windows' p99s weighted by their answers: the p99 of the period, near enough."""
    ok = [w for w in windows if w.answered]
    if not ok:
        return float("nan")
    return float(np.average([w.p99_ms for w in ok], weights=[w.answered for w in ok]))


def plot(windows: list[Window], path: Path) -> Path:
    """RSS of each worker, request latency, the workers' lag and each process's CPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [w.t for w in windows]
    fig, (a, b, c, d, e) = plt.subplots(5, 1, figsize=(8, 12), sharex=True)
    for kind in windows[0].rss:
        a.plot(t, [w.rss[kind] / 2**20 for w in windows], label=f"{kind} worker")
    a.set_ylabel("RSS (MiB)")
    a.legend()
    a.set_ylim(bottom=0)
    b.plot(t, [w.p50_ms for w in windows], label="p50")
    b.plot(t, [w.p99_ms for w in windows], label="p99")
    b.set_ylabel("request -> recommendation (ms)")
    b.legend()
    b.set_ylim(bottom=0)
    c.plot(t, [w.lag for w in windows])
    c.set_ylabel("consumer lag (messages)")
    c.set_ylim(bottom=0)
    for proc in windows[0].cpu:
        d.plot(t, [w.cpu[proc] for w in windows], label=proc)
    d.set_ylabel("CPU (cores)")
    d.set_ylim(bottom=0)
    if windows[0].cpu:
        d.legend()
    for topic in sorted({t for w in windows for t in w.batches}):
        e.plot(t, [w.batches.get(topic, 0.0) for w in windows], label=topic)
    e.set_ylabel("batches/s produced")
    e.set_xlabel("seconds into the soak")
    e.set_ylim(bottom=0)
    if any(w.batches for w in windows):
        e.legend(fontsize="small")
    fig.suptitle("lookalike bench soak")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
