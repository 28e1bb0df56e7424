"""Crash recovery at scale: the same clicks through a clean run and a run whose workers
are killed with SIGKILL at random points, then their final states compared.

Issue 8 asks for 1M synthetic clicks and 20 kills of each worker kind, separately and
together, with the seed windows of the crash run equal to a clean run's (exactly),
centroids within k-means tolerance, and the accepted-event counts equal (nothing lost,
nothing counted twice). Both runs use the same broker (their own topic prefix), the
same RALM checkpoint and snapshots every ``Size.snapshot_s`` (``consumers/snapshots``),
so a restarted worker starts from its snapshot and replays what came after it.

Then the failover bench (``lookalike/bench/failover.py``) measures the other side of
a kill: how long the killed scoring worker's users wait for answers.

The final state of each run is read from the snapshots its workers write on the clean
stop at the end, and checked three ways:

- windows: every item's seeds (user -> click time) are those of the clean run, and
  both equal what the click log implies (each item's ``window.size`` most recent
  distinct clickers, at their latest click);
- users: every user's click count is the log's, in both runs;
- centroids: equality is not expected, for two reasons that hold between any two
  runs, crashes or not: mini-batch k-means depends on how seeds were batched into
  polls, and a seed's vector is its user's embedding after the user's last click in
  the scoring worker's poll batch (one tower pass per user per batch), so the seed
  vectors themselves move with batch boundaries (the bench reports by how much).
  Each run's centroids are scored by the share of their own window's variance they
  explain (1 - inertia / total sum of squares), and the runs compared item by item
  (0: as good; 0.05: 5 points apart).
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from consumers.replay import replay
from consumers.topics_admin import create_topics
from engine.config import Settings
from engine.data import Dataset, load_dataset
from engine.synthetic import SyntheticSpec, generate
from lookalike.bench import failover
from lookalike.bench.freshness import _checkpoint
from lookalike.bench.ingest import bench_broker
from lookalike.bench.report import BenchOptions, BenchReport
from lookalike.pipeline import WorkerProcess, spawn_worker, wait_ready, worker_metric

KINDS = ("scoring", "clustering")


@dataclass(frozen=True)
class Size:
    clicks: int
    kills: int  # kill events, cycling: scoring alone, clustering alone, both
    users: int
    items: int
    window: int  # seeds per item window
    max_seen: int  # the user rings' length (bounds the scoring snapshot)
    snapshot_s: float


# windows larger than any item's clickers: a full window evicts its earliest *arrival*,
# and seeds of one item reach it in an order that depends on how the scoring worker's
# polls interleave click partitions, so full windows differ between any two runs
# (crashes or not); with room for every seed the window is a set, exact to compare
FULL = Size(1_000_000, 30, 100_000, 20_000, 10_000, 50, 10.0)  # each kind killed 20 times
QUICK = Size(4_000, 2, 500, 200, 10_000, 20, 0.5)


@dataclass
class Run:
    """One pass of the clicks: where its snapshots are and what happened."""

    snapshots: Path
    kills: list[str]
    seconds: float
    restores_from_snapshot: int
    clicks_replayed: int  # clicks re-read into user state after restarts


def run(opts: BenchOptions) -> BenchReport:
    size = QUICK if opts.quick else FULL
    s = opts.settings
    ckpt = _checkpoint(s, load_dataset("ml-100k", s.data_dir).time_split(0.8)[0], opts.quick)
    ds = _clicks(size, opts.seed)
    out = opts.out_dir / "recovery-run"
    out.mkdir(parents=True, exist_ok=True)
    with bench_broker(opts, out / "broker.log") as bootstrap:
        s = s.model_copy(update={"kafka": s.kafka.model_copy(update={
            "bootstrap_servers": bootstrap})})
        clean = _pass(s, ds, ckpt, size, out / "clean", kills=0, seed=opts.seed)
        crash = _pass(s, ds, ckpt, size, out / "crash", kills=size.kills, seed=opts.seed)
    report = _report(size, ds, clean, crash)
    for f in failover.run(opts).figures:  # the gap a kill leaves in the answers
        report.add(f"failover: {f.name}", f.value, f.unit, f.target, f.note)
    return report


def _clicks(size: Size, seed: int) -> Dataset:
    """At least ``size.clicks`` synthetic clicks (Zipf items, planted tastes), cut to it."""
    spec = SyntheticSpec(n_users=size.users, n_items=size.items, seed=seed,
                         clicks_per_user=size.clicks / size.users * 1.05)
    ds = generate(spec)
    n = min(size.clicks, len(ds))
    return Dataset(ds.name, ds.users, ds.items, ds.user[:n], ds.item[:n], ds.rating[:n],
                   ds.ts[:n])


def _pass(s: Settings, ds: Dataset, ckpt: Path, size: Size, folder: Path, kills: int,
          seed: int) -> Run:
    """All clicks through fresh topics; ``kills`` SIGKILLs spread over the replay."""
    shutil.rmtree(folder, ignore_errors=True)  # an earlier run's snapshots and logs
    folder.mkdir(parents=True)
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={
        "topic_prefix": f"bench-recovery-{uuid.uuid4().hex[:6]}-"})})
    create_topics(s.kafka)
    env = {"LOOKALIKE_SNAPSHOTS__EVERY_S": str(size.snapshot_s),
           "LOOKALIKE_SNAPSHOTS__DIR": str(folder / "snapshots"),
           "LOOKALIKE_WINDOW__SIZE": str(size.window),
           "LOOKALIKE_WINDOW__VECTOR_DTYPE": "float16",
           "LOOKALIKE_SCORING__MAX_SEEN": str(size.max_seen)}
    spawned = [0]

    def spawn(kind: str) -> WorkerProcess:
        spawned[0] += 1
        return spawn_worker(kind, s, ckpt, folder, spawned[0], env)

    rng = np.random.default_rng(seed)
    plan = [("scoring", "clustering", "both")[i % 3] for i in range(kills)]
    chunk = -(-len(ds) // (kills + 1))
    workers = {kind: spawn(kind) for kind in KINDS}
    done: list[str] = []
    t0 = time.monotonic()
    try:
        wait_ready(list(workers.values()))
        for c, victim in enumerate([*plan, None]):
            replay(ds, s.kafka, limit=chunk * (c + 1), skip=chunk * c, progress=False)
            if victim is None:
                break
            time.sleep(float(rng.uniform(0.0, 2.0)))  # mid-chunk: the workers lag the replay
            victims = KINDS if victim == "both" else (victim,)
            for kind in victims:
                workers[kind].proc.kill()  # SIGKILL: no flush, no commit, no snapshot
                workers[kind].proc.wait(10)
                done.append(kind)
            for kind in victims:
                workers[kind] = spawn(kind)
            wait_ready(list(workers.values()), timeout_s=300)
        _drained(list(workers.values()), timeout_s=1800)
    finally:
        for w in workers.values():
            w.stop(timeout_s=120)  # the clean stop writes the final snapshots
    logs = "".join(p.read_text(errors="replace") for p in folder.glob("*.log"))
    replayed = sum(int(line.split("replayed ")[1].split()[0])
                   for line in logs.splitlines() if "replayed " in line and " clicks of " in line)
    return Run(folder / "snapshots", done, time.monotonic() - t0,
               logs.count("from a snapshot at offset"), replayed)


def _drained(workers: list[WorkerProcess], timeout_s: float) -> None:
    """Until every worker owns partitions, has restored them all and reports no lag,
    three checks in a row (gauges refresh every 2 s). Why all three: a worker still
    restoring a snapshot has polled nothing yet and reports no lag at all; the
    bench once stopped one then and read a snapshot from before its replay."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    time.sleep(5.0)
    while quiet < 3:
        if time.monotonic() > deadline:
            raise TimeoutError("the workers did not catch up in time")
        caught_up = all(worker_metric(w, "lookalike_assigned_partitions") > 0
                        and worker_metric(w, "lookalike_partitions_restoring") == 0
                        and worker_metric(w, "lookalike_consumer_lag_messages") == 0
                        for w in workers)
        quiet = quiet + 1 if caught_up else 0
        time.sleep(2.0)


def load_state(folder: Path) -> tuple[dict[int, dict[int, float]], dict[int, np.ndarray],
                                      dict[int, tuple[np.ndarray, np.ndarray]], dict[int, int]]:
    """(item -> {user: seed time}, item -> window vectors in that order,
    item -> (centroids, counts), user -> clicks) from one run's snapshots."""
    windows: dict[int, dict[int, float]] = {}
    vectors: dict[int, np.ndarray] = {}
    centroids: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    clicks: dict[int, int] = {}
    for path in sorted(folder.rglob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        if "length" not in a:
            clicks.update(zip(a["user"].tolist(), a["clicks"].tolist(), strict=True))
            continue
        ends = np.cumsum(a["length"])
        at: dict[int, int] = defaultdict(int)  # per dim: items and seeds so far
        seeds_at: dict[int, int] = defaultdict(int)
        for j, item in enumerate(a["item"].tolist()):
            lo, hi, dim = int(ends[j] - a["length"][j]), int(ends[j]), int(a["dim"][j])
            windows[item] = dict(zip(a["users"][lo:hi].tolist(), a["ts"][lo:hi].tolist(),
                                     strict=True))
            start = seeds_at[dim]
            vectors[item] = a[f"vectors_{dim}"][start:start + hi - lo].astype(np.float32)
            seeds_at[dim] += hi - lo
            centroids[item] = (a[f"centroids_{dim}"][at[dim]], a[f"counts_{dim}"][at[dim]])
            at[dim] += 1
    return windows, vectors, centroids, clicks


def expected_windows(ds: Dataset, size: int) -> dict[int, dict[int, float]]:
    """What the click log implies: each item's ``size`` most recent distinct clickers."""
    latest: dict[int, dict[int, float]] = defaultdict(dict)
    users, items = ds.users.ids[ds.user].tolist(), ds.items.ids[ds.item].tolist()
    for u, i, t in zip(users, items, ds.ts.tolist(), strict=True):
        if t > latest[i].get(u, -1.0):
            latest[i][u] = t
    out = {}
    for i, seeds in latest.items():
        keep = sorted(seeds.items(), key=lambda kv: kv[1])[-size:]
        out[i] = dict(keep)
    return out


def inertia(x: np.ndarray, centroids: np.ndarray, counts: np.ndarray) -> float:
    """Sum of squared distances of ``x`` to their nearest live centroid."""
    live = centroids[counts > 0]
    if not len(x) or not len(live):
        return 0.0
    d = (x ** 2).sum(1)[:, None] - 2 * x @ live.T + (live ** 2).sum(1)[None]
    return float(np.maximum(d.min(1), 0).sum())


def explained(x: np.ndarray, centroids: np.ndarray, counts: np.ndarray) -> float | None:
    """Share of the window's variance its centroids explain; None for a constant window."""
    total = float(((x - x.mean(0)) ** 2).sum()) if len(x) >= 2 else 0.0
    return 1.0 - inertia(x, centroids, counts) / total if total > 0 else None


def _report(size: Size, ds: Dataset, clean: Run, crash: Run) -> BenchReport:
    cw, cv, cc, cu = load_state(clean.snapshots)
    xw, xv, xc, xu = load_state(crash.snapshots)
    want = expected_windows(ds, size.window)
    log_clicks = dict(zip(*np.unique(ds.users.ids[ds.user], return_counts=True)))
    log_clicks = {int(u): int(n) for u, n in log_clicks.items()}
    gaps, moved = [], []
    for item in set(cc) & set(xc):
        ex_clean, ex_crash = explained(cv[item], *cc[item]), explained(xv[item], *xc[item])
        if ex_clean is not None and ex_crash is not None:
            gaps.append(abs(ex_crash - ex_clean))
        mine = dict(zip(xw[item], xv[item], strict=True))
        moved += [float(np.abs(v - mine[u]).max()) for u, v in zip(cw[item], cv[item],
                                                                    strict=True) if u in mine]
    r = np.array(gaps) if gaps else np.zeros(1)
    moved_a = np.array(moved) if moved else np.zeros(1)
    report = BenchReport("recovery", settings={**size.__dict__, "clicks": len(ds)})
    report.add("clicks replayed through each run", len(ds), "clicks")
    report.add("SIGKILLs injected (crash run)", len(crash.kills), "kills",
               note=f"scoring {crash.kills.count('scoring')}, clustering "
               f"{crash.kills.count('clustering')}")
    report.add("restarts that started from a snapshot", crash.restores_from_snapshot,
               "partitions")
    report.add("clicks re-read into user state after restarts", crash.clicks_replayed, "clicks")
    report.add("items whose window differs, crash vs clean", _differ(xw, cw), "items", "<= 0")
    report.add("items whose window differs from the click log (crash run)", _differ(xw, want),
               "items", "<= 0")
    report.add("items whose window differs from the click log (clean run)", _differ(cw, want),
               "items", "<= 0")
    report.add("|seeds held, crash - clean|", abs(sum(map(len, xw.values())) -
               sum(map(len, cw.values()))), "seeds", "<= 0")
    report.add("users whose click count differs from the log (crash run)",
               _differ(xu, log_clicks), "users", "<= 0")
    report.add("users whose click count differs from the log (clean run)",
               _differ(cu, log_clicks), "users", "<= 0")
    report.add("variance explained by the centroids, |crash - clean|, mean over items",
               float(r.mean()), "", "<= 0.05", note=f"{len(gaps):,} items with 2+ distinct "
               f"seeds; p99 {np.percentile(r, 99):.3f}, max {r.max():.3f}")
    report.add("seed vectors, largest |crash - clean| component, median over seeds",
               float(np.median(moved_a)), "", note=f"p99 {np.percentile(moved_a, 99):.3f}: "
               "batch boundaries, not crashes (module docstring)")
    report.add("clean run", clean.seconds, "s")
    report.add("crash run", crash.seconds, "s")
    return report


def _differ(a: dict, b: dict) -> int:
    """Keys whose values differ, or that one side lacks."""
    return sum(a.get(k) != b.get(k) for k in set(a) | set(b))
