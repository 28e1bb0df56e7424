"""Failover: how long a killed scoring worker's users go unanswered, and how long the
survivor's own users wait while the group moves the partitions.

Two scoring workers (one partition of each topic each) and a clustering worker run on
the broker, with users' state from a replay of synthetic clicks. A prober asks for the
recommendations of one user of each partition every ``PROBE_S`` and reads the answers.
A scoring worker is killed with SIGKILL: it does not leave its group, so the broker
evicts it after ``kafka.session_timeout_ms``, and the survivor is assigned its
partitions, restores their users from the snapshots and answers the requests that
waited. The killed worker is then started again, and the group hands one partition
back to it. Per kill:

- the killed worker's partition: the time from the kill to the first answer to a
  request sent after it (target: within two session timeouts);
- the survivor's own partition: its longest gap between answers while the group
  rebalanced (an eager rebalance revokes every partition; the survivor keeps the
  state of those it gets back, ``lookalike_partitions_kept_total``);
- the restart: the longest gap of either partition while the restarted worker joined.

``lookalike bench failover`` runs it alone; ``lookalike bench recovery`` includes it.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from consumers.kafka import assign_all, make_consumer, make_producer, reader_start
from consumers.replay import replay
from consumers.topics_admin import create_topics
from engine.codec import encode_json, key_of
from engine.config import Settings
from engine.data import load_dataset
from engine.synthetic import SyntheticSpec, generate
from engine.topics import KeyPartitions, Topics
from lookalike.bench.freshness import _checkpoint
from lookalike.bench.ingest import bench_broker
from lookalike.bench.report import BenchOptions, BenchReport
from lookalike.pipeline import WorkerProcess, spawn_worker, wait_ready

PROBE_S = 0.05  # one request per partition every 50 ms


@dataclass(frozen=True)
class Size:
    kills: int
    clicks: int
    users: int
    items: int
    session_timeout_ms: int


FULL = Size(kills=4, clicks=40_000, users=4_000, items=2_000, session_timeout_ms=10_000)
QUICK = Size(kills=1, clicks=2_000, users=300, items=200, session_timeout_ms=6_000)


@dataclass
class Kill:
    """One kill and restart, by the prober's clock (time.monotonic)."""

    partition: int  # the killed worker's score-requests partition
    killed_at: float
    answered_at: float  # the first answer to a request of that partition sent after the kill
    restarted_at: float
    rejoined_at: float


class Prober:
    """Asks for one user of each partition every ``PROBE_S``; keeps when answers come."""

    def __init__(self, s: Settings, users: dict[int, int]):
        self.s, self.users = s, users  # partition -> user
        self.partition_of = {u: p for p, u in users.items()}
        self.answers: dict[int, list[float]] = {p: [] for p in users}  # when each came
        self.asked: dict[int, list[float]] = {p: [] for p in users}  # when its request went
        self._sent: dict[str, float] = {}
        self.stop = threading.Event()
        names = Topics(s.kafka.topic_prefix)
        self.requests_topic = names.score_requests
        self.reader = make_consumer(s.kafka, None, fetch_max_wait_ms=10)
        assign_all(self.reader, names.recommendations, at="end")
        self.since = reader_start()
        self.threads = [threading.Thread(target=self._ask, daemon=True),
                        threading.Thread(target=self._read, daemon=True)]

    def __enter__(self) -> Prober:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.reader.close()

    def _ask(self) -> None:
        producer = make_producer(self.s.kafka, linger_ms=0)
        n = 0
        try:
            while not self.stop.wait(PROBE_S):
                for user in self.users.values():
                    n += 1
                    self._sent[f"failover-{n}"] = time.monotonic()
                    producer.send(self.requests_topic, key=key_of(user), value=encode_json(
                        {"user_id": user, "k": 10, "request_id": f"failover-{n}"}))
                producer.flush()
        finally:
            producer.close(timeout=10)

    def _read(self) -> None:
        while not self.stop.is_set():
            for records in self.reader.poll(timeout_ms=100).values():
                now = time.monotonic()
                for r in records:
                    if r.timestamp / 1000.0 < self.since:
                        continue
                    answer = orjson.loads(r.value)
                    p = self.partition_of.get(answer.get("user_id"))
                    sent = self._sent.get(answer.get("request_id"))
                    if p is not None and sent is not None:
                        self.answers[p].append(now)
                        self.asked[p].append(sent)

    def first_answer_asked_after(self, p: int, t: float) -> float | None:
        """When the first answer came to a request of partition ``p`` sent after ``t``
        (an answer the killed worker sent just before dying does not count)."""
        got = [a for a, s in zip(self.answers[p], self.asked[p], strict=True) if s > t]
        return min(got) if got else None


def run(opts: BenchOptions) -> BenchReport:
    size = QUICK if opts.quick else FULL
    s = opts.settings
    ckpt = _checkpoint(s, load_dataset("ml-100k", s.data_dir).time_split(0.8)[0], opts.quick)
    out = opts.out_dir / "failover-run"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with bench_broker(opts, out / "broker.log") as bootstrap:
        s = s.model_copy(update={"kafka": s.kafka.model_copy(update={
            "bootstrap_servers": bootstrap, "partitions": 2,
            "session_timeout_ms": size.session_timeout_ms,
            "topic_prefix": f"bench-failover-{uuid.uuid4().hex[:6]}-"})})
        create_topics(s.kafka)
        kills, answers = _kills(s, ckpt, size, out, opts.seed)
    return _report(size, kills, answers)


def _kills(s: Settings, ckpt: Path, size: Size, out: Path, seed: int
           ) -> tuple[list[Kill], dict[int, list[float]]]:
    """The workers, the clicks, then ``size.kills`` kills and restarts under the prober."""
    ds = generate(SyntheticSpec(n_users=size.users, n_items=size.items, seed=seed,
                                clicks_per_user=size.clicks / size.users))
    env = {"LOOKALIKE_SNAPSHOTS__EVERY_S": "2", "LOOKALIKE_SNAPSHOTS__DIR": str(out / "snapshots"),
           "LOOKALIKE_KAFKA__SESSION_TIMEOUT_MS": str(size.session_timeout_ms)}
    spawned = [0]

    def spawn(kind: str) -> WorkerProcess:
        spawned[0] += 1
        return spawn_worker(kind, s, ckpt, out, spawned[0], env)

    scoring = [spawn("scoring"), spawn("scoring")]
    clustering = spawn("clustering")
    kills: list[Kill] = []
    try:
        wait_ready([*scoring, clustering], timeout_s=180)
        replay(ds, s.kafka, progress=False)
        users = ds.users.ids[ds.user[-200:]]  # users with clicks, as the stream left them
        parts = KeyPartitions().of(users, 2).tolist()
        probe = {p: int(users[parts.index(p)]) for p in (0, 1)}
        time.sleep(5.0)  # the replay's clicks applied, a snapshot written
        with Prober(s, probe) as prober:
            time.sleep(3.0)
            for i in range(size.kills):
                v = i % 2
                kills.append(_kill_and_restart(scoring, v, prober, spawn, size))
                time.sleep(5.0)
            answers = {p: list(t) for p, t in prober.answers.items()}
    finally:
        for w in [*scoring, clustering]:
            w.stop(timeout_s=60)
    return kills, answers


def _kill_and_restart(scoring: list[WorkerProcess], v: int, prober: Prober, spawn,
                      size: Size) -> Kill:
    """Kill worker ``v``, wait until both partitions answer again, start it again. The
    killed worker's partition is the one answered last (its lag gauge says the same
    but may lag a rebalance by a report interval)."""
    killed_at = time.monotonic()
    scoring[v].proc.kill()  # SIGKILL: no leave-group, no commit
    scoring[v].proc.wait(10)
    deadline = killed_at + 6 * size.session_timeout_ms / 1e3 + 60
    while any(prober.first_answer_asked_after(p, killed_at) is None for p in (0, 1)):
        if time.monotonic() > deadline:
            raise TimeoutError("a partition got no answer after the kill")
        time.sleep(0.1)
    part = max((0, 1), key=lambda p: prober.first_answer_asked_after(p, killed_at) or 0.0)
    time.sleep(3.0)
    restarted_at = time.monotonic()
    scoring[v] = spawn("scoring")
    wait_ready([scoring[v]], timeout_s=180)
    rejoined_at = time.monotonic()
    time.sleep(3.0)
    first = prober.first_answer_asked_after(part, killed_at)
    assert first is not None
    return Kill(part, killed_at, first, restarted_at, rejoined_at)


def _gap(times: list[float], start: float, end: float) -> float:
    """The longest time without an answer that overlaps [start, end]."""
    t = np.asarray(sorted(times))
    before = t[t <= start]
    inside = t[(t > start) & (t <= end)]
    after = t[t > end]
    seq = np.r_[before[-1:], inside, after[:1]]
    return float(np.diff(seq).max()) if len(seq) > 1 else float("inf")


def _report(size: Size, kills: list[Kill], answers: dict[int, list[float]]) -> BenchReport:
    report = BenchReport("failover")
    report.settings = {"size": size.__dict__, "probe_s": PROBE_S}
    killed, survivor, rejoin = [], [], []
    for k in kills:
        other = 1 - k.partition
        killed.append(k.answered_at - k.killed_at)
        survivor.append(_gap(answers[other], k.killed_at, k.answered_at + 1.0))
        rejoin.append(max(_gap(answers[p], k.restarted_at, k.rejoined_at + 3.0)
                          for p in (0, 1)))
    session_s = size.session_timeout_ms / 1e3
    note = f"per kill: {', '.join(f'{x:.2f}' for x in killed)} s"
    report.add("killed worker's partition: kill -> first answer, max", max(killed), "s",
               f"<= {2 * session_s:g}", note=f"{note}; session timeout {session_s:g} s")
    report.add("killed worker's partition: kill -> first answer, p50",
               float(np.median(killed)), "s")
    report.add("survivor's own partition: longest gap, max", max(survivor), "s",
               note="per kill: " + ", ".join(f"{x:.2f}" for x in survivor) + " s; eager "
               "rebalance (range assignor): every partition is revoked and given back")
    report.add("survivor's own partition: longest gap, p50", float(np.median(survivor)), "s")
    report.add("restart: longest gap of either partition, max", max(rejoin), "s",
               note="per restart: " + ", ".join(f"{x:.2f}" for x in rejoin) + " s")
    report.add("normal gap between answers, p50", float(np.median(np.diff(
        sorted(answers[0])))), "s", note=f"one request per partition every {PROBE_S} s")
    report.add("kills", len(kills), "kills")
    return report
