"""The batch-1 user tower alone, and right after a producer send + flush as the scoring loop
does after every poll (CHANGELOG.md, 2026-11-30: "Why the batch-1 user tower costs twice as much").
Starts and stops its own embedded broker.

    .venv/bin/python docs/bench/tower_after_flush.py
"""

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from consumers.kafka import make_producer
from consumers.scoring import ScoringStage
from engine.config import load_settings
from lookalike.bench.ingest import bench_settings
from lookalike.bench.report import BenchOptions
from lookalike.bench.score import bench_dataset, geometry_model, warm_clicks
from lookalike.broker import EmbeddedBroker


def timings(stage: ScoringStage, users: list[int], label: str,
            before: Callable[[], object] | None = None) -> None:
    """p50 and p99 of ``stage._embed`` on one user, ``before`` run untimed before each."""
    out = []
    for u in users:
        if before:
            before()
        st = stage.users.get(u)
        t0 = time.perf_counter()
        stage._embed([st], [st.profile])
        out.append(time.perf_counter() - t0)
    us = np.array(out[100:]) * 1e6
    print(f"{label:36s} p50 {np.median(us):.0f} µs  p99 {np.percentile(us, 99):.0f} µs",
          flush=True)


def main() -> None:
    ds = bench_dataset(20_000, 43_500, 0, clicks_per_user=20)
    model = geometry_model(ds, 0, False)
    torch.set_num_threads(1)
    settings = load_settings(None)
    stage = ScoringStage(settings, model)
    warm = warm_clicks(ds, len(ds))
    stage._apply_clicks(warm, [-1] * len(warm))
    known = np.fromiter(stage.users.users, np.int64)
    users = np.random.default_rng(0).choice(known, 1500).tolist()
    with EmbeddedBroker() as broker:
        s = bench_settings(BenchOptions(settings=settings, out_dir=Path("/tmp")),
                           broker.bootstrap_servers, "tower")
        producer = make_producer(s.kafka)
        topic = s.kafka.topic_prefix + "recommendations"
        producer.send(topic, b"x").get(10)

        def send_flush(pause: float | None = None) -> None:
            producer.send(topic, b"y" * 300)
            producer.flush()
            if pause is not None:
                time.sleep(pause)

        timings(stage, users, "alone")
        timings(stage, users, "after send + flush", send_flush)
        for interval in (0.001, 0.0002):
            sys.setswitchinterval(interval)
            timings(stage, users, f"after send + flush, switch {interval * 1e3:g} ms",
                    send_flush)
        sys.setswitchinterval(0.005)
        timings(stage, users, "after send + flush + sleep(1 ms)", lambda: send_flush(0.001))
        timings(stage, users, "alone again")
        producer.close()


if __name__ == "__main__":
    main()
