"""Crash recovery (issue 8, item 1, first version): workers killed with SIGKILL mid-stream
and restarted lose nothing and count nothing twice.

The clustering worker rebuilds its windows by replaying ``seed-events`` from the
beginning on assignment; the scoring worker rebuilds user state from ``clicks`` up to
its group's committed offset and reprocesses what came after (at-least-once: a seed
sent twice lands once, windows keep distinct users). At the end every item's latest
centroids on ``seed-centroids`` count exactly its distinct clickers, as a run without
crashes would.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest

from consumers.replay import replay
from engine.codec import decode_centroids
from engine.pipeline import WorkerProcess, spawn_worker, wait_ready
from models.ralm import RalmConfig
from models.train_ralm import train_ralm
from tests.kafka_fixtures import read_all, wait_until

N_CLICKS, CHUNK = 12_000, 2_000
ENV = {"LOOKALIKE_WINDOW__SIZE": "100000", "LOOKALIKE_SCORING__MIN_SEEDS": "1"}


@pytest.mark.slow
def test_workers_killed_mid_stream_lose_and_double_count_nothing(settings, ml100k, tmp_path):
    ckpt = train_ralm(ml100k.time_split(0.8)[0], RalmConfig.tiny(user_epochs=1,
                      lookalike_epochs=1), tmp_path / "ckpt", progress=False,
                      log=lambda *_: None)
    run = tmp_path / "run"
    run.mkdir()
    spawned = [0]

    def spawn(kind: str) -> WorkerProcess:
        spawned[0] += 1
        return spawn_worker(kind, settings, ckpt, run, spawned[0], ENV)

    workers = {"clustering": spawn("clustering"), "scoring": spawn("scoring")}
    kills = []
    try:
        wait_ready(list(workers.values()))
        rng = np.random.default_rng(0)
        plan = ["scoring", "clustering", "both", "scoring", "clustering"]
        for c, victim in enumerate(plan + [None]):
            rep = replay(ml100k, settings.kafka, limit=CHUNK * (c + 1), progress=False,
                         skip=CHUNK * c)
            assert rep.events == CHUNK
            if victim is None:
                break
            time.sleep(float(rng.uniform(0.0, 1.5)))  # somewhere in the middle of the chunk
            for kind in (("scoring", "clustering") if victim == "both" else (victim,)):
                workers[kind].proc.kill()  # SIGKILL: no flush, no commit, no goodbye
                workers[kind].proc.wait(10)
                kills.append(kind)
            for kind in (("scoring", "clustering") if victim == "both" else (victim,)):
                workers[kind] = spawn(kind)
            wait_ready(list(workers.values()))

        users = ml100k.users.ids[ml100k.user[:N_CLICKS]]
        items = ml100k.items.ids[ml100k.item[:N_CLICKS]]
        clickers = defaultdict(set)
        for u, i in zip(users.tolist(), items.tolist()):
            clickers[i].add(u)

        def table() -> dict[int, int]:
            return {int(r.key): decode_centroids(r.value).n_seeds
                    for r in read_all(settings, "seed-centroids", timeout_s=10)}

        want = {i: len(u) for i, u in clickers.items()}
        wait_until(lambda: table() == want, timeout_s=180, every_s=2.0,
                   what="every item's centroids count exactly its distinct clickers")
        assert kills.count("scoring") == 3 and kills.count("clustering") == 3
    finally:
        for w in workers.values():
            w.stop()
