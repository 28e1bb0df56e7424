"""Crash recovery (issue 8, item 1): workers killed with SIGKILL mid-stream and
restarted lose nothing and count nothing twice.

Both workers snapshot their partitions every half second (``consumers/snapshots.py``);
a restarted one loads its snapshots and re-reads only what came after them (the
clustering worker replays ``seed-events`` from the snapshot's offset; the scoring
worker re-applies clicks up to its group's committed offset, then reprocesses what
came after: at-least-once, and a seed sent twice lands once). At the end every item's
latest centroids on ``seed-centroids`` count exactly its distinct clickers, and the
final snapshots (written on the clean stop) hold exactly the windows and user click
counts the click log implies, as a run without crashes would.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest

from consumers.replay import replay
from engine.clustering import ItemClusters, decode_records
from engine.codec import PACK_MAGIC, decode_centroids, decode_key
from lookalike.pipeline import WorkerProcess, spawn_worker, wait_ready
from models.ralm import RalmConfig
from models.train_ralm import train_ralm
from tests.kafka_fixtures import read_all, wait_until

N_CLICKS, CHUNK = 12_000, 2_000
ENV = {"LOOKALIKE_WINDOW__SIZE": "100000", "LOOKALIKE_SCORING__MIN_SEEDS": "1",
       "LOOKALIKE_SNAPSHOTS__EVERY_S": "0.5"}


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
    logs = {kind: "".join(p.read_text() for p in run.glob(f"{kind}-*.log"))
            for kind in ("scoring", "clustering")}
    for kind, text in logs.items():  # restarts started from snapshots, not from the log
        assert "from a snapshot at offset" in text, kind
    _final_state_is_the_click_logs(settings, ml100k)
    _final_centroids_are_the_seed_logs(settings)


def _final_centroids_are_the_seed_logs(settings) -> None:
    """The centroids the killed and restarted clustering workers ended with are those of
    one ItemClusters fed ``seed-events`` offline, each partition in offset order: a
    restore from a snapshot and the replay after it change no centroid's value."""
    window = settings.window.model_copy(update={"size": int(ENV["LOOKALIKE_WINDOW__SIZE"])})
    ref = ItemClusters(window)
    records = sorted(read_all(settings, "seed-events", timeout_s=10),
                     key=lambda r: (r.partition, r.offset))
    for r in records:
        item = None if r.value[:2] == PACK_MAGIC else decode_key(r.key)
        for cols, _ in decode_records([item], [r.value])[0]:
            ref.apply_columns(cols)
    assert ref.refreshes > 0
    folder = settings.cache_dir / "snapshots"
    checked = 0
    for a in (dict(np.load(p, allow_pickle=False)) for p in folder.rglob("*.npz")):
        if "length" not in a:
            continue
        for dim in {int(d) for d in a["dim"]}:
            mine = [i for i, d in zip(a["item"].tolist(), a["dim"].tolist()) if d == dim]
            for j, item in enumerate(mine):
                np.testing.assert_allclose(a[f"centroids_{dim}"][j], ref.items[item].centroids,
                                           rtol=1e-5, atol=1e-6)
                np.testing.assert_array_equal(a[f"counts_{dim}"][j], ref.items[item].counts)
                checked += 1
    assert checked == len(ref.items)


def _final_state_is_the_click_logs(settings, ml100k) -> None:
    """The snapshots of the clean stop against the first N_CLICKS clicks: every item's
    window holds exactly its distinct clickers at their latest click time, and every
    user's state counts exactly their clicks, with their latest items last."""
    folder = settings.cache_dir / "snapshots"
    arrays = [dict(np.load(p, allow_pickle=False)) for p in folder.rglob("*.npz")]
    windows = [a for a in arrays if "length" in a]
    users = [a for a in arrays if "clicks" in a and "length" not in a]
    assert len(windows) == len(users) == settings.kafka.partitions
    rows = slice(0, N_CLICKS)
    user_ids = ml100k.users.ids[ml100k.user[rows]].tolist()
    item_ids = ml100k.items.ids[ml100k.item[rows]].tolist()
    latest: dict[int, dict[int, float]] = defaultdict(dict)
    history: dict[int, list[int]] = defaultdict(list)
    for u, i, t in zip(user_ids, item_ids, ml100k.ts[rows].tolist(), strict=True):
        latest[i][u] = max(latest[i].get(u, 0.0), t)
        history[u].append(i)
    got: dict[int, dict[int, float]] = {}
    for a in windows:
        ends = np.cumsum(a["length"])
        for j, item in enumerate(a["item"].tolist()):
            lo, hi = ends[j] - a["length"][j], ends[j]
            got[item] = dict(zip(a["users"][lo:hi].tolist(), a["ts"][lo:hi].tolist(),
                                 strict=True))
    assert got == latest
    clicks = {u: int(n) for a in users for u, n in zip(a["user"].tolist(), a["clicks"].tolist(),
                                                       strict=True)}
    assert clicks == {u: len(h) for u, h in history.items()}
    for a in users:
        for j, u in enumerate(a["user"].tolist()):
            n = min(len(history[u]), a["ids"].shape[1])
            ring = a["ids"][j][(np.arange(len(history[u]) - n, len(history[u]))
                               % a["ids"].shape[1])]
            assert ring.tolist() == history[u][-n:], u
