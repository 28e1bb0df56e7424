"""A fixed hostile corpus through real workers on the embedded broker (issue 8, item 4).

One scoring and one clustering worker; on each topic they read (clicks,
score-requests, seed-events, seed-centroids) hostile records go in mixed with
good ones. Every hostile record lands on ``<topic>.dlq`` with its reason, the
good ones come through (seeds in windows, recommendations answered), and both
workers are still running at the end. The property-based part, with the
same checks in-process, is ``tests/test_hostile_input.py``.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import orjson
import pytest
import torch

from consumers.clustering import ClusteringStage
from consumers.runner import start_worker
from engine.codec import (
    FUTURE_SLACK_S,
    Click,
    ItemCentroids,
    SeedBatch,
    SeedPack,
    encode_centroids,
    encode_click,
    encode_seed_pack,
    encode_seeds,
    key_of,
)
from engine.synthetic import SyntheticSpec, generate
from lookalike.scrape import scrape, total
from tests.kafka_fixtures import json_values, produce, read_all, wait_until

NOW = time.time()


def _model():
    from models.features import FeatureSpace
    from models.ralm import RalmConfig, RalmModel

    data = generate(SyntheticSpec(n_users=100, n_items=60, clicks_per_user=10, seed=5))
    torch.manual_seed(0)
    cfg = RalmConfig.tiny(history_len=8)
    return data, RalmModel.new(cfg, FeatureSpace.build(data, cfg.history_len), version="t")


def _seed(users: list[int], ts: list[float], vec: np.ndarray | None = None,
          dim: int = 8) -> bytes:
    v = np.random.default_rng(len(users)).normal(size=(len(users), dim)).astype(np.float32)
    return encode_seeds(SeedBatch(np.array(users, np.int64), np.array(ts), v if vec is None
                                  else vec, "t"))  # the serving model's version (_model)


def _hostile_clicks() -> list[tuple[bytes | None, bytes | None, str]]:
    far = str(NOW + 3 * FUTURE_SLACK_S).encode()
    return [
        (b"1", b"{not json", "not_json"),
        (b"1", b'{"item_id": 5}', "schema"),
        (b"1", b'{"user_id": "\xc2\xb2", "item_id": 1}', "schema"),  # crashed the worker once
        (b"1", b'{"user_id": 1, "item_id": 1, "ts": -1}', "schema"),
        (b"1", b'{"user_id": 1, "item_id": 1, "ts": ' + far + b"}", "schema"),
        (b"1", b'{"user_id": 1, "item_id": 1, "x": "' + b"y" * 70_000 + b'"}', "oversized"),
        (b"1", None, "schema"),
        (b"1", b"[1, 2]", "schema"),
        (b"1", b'{"user_id": 9223372036854775808, "item_id": 1}', "schema"),
        (b"1", b'{"user_id": 1, "item_id": 1, "ts": NaN}', "not_json"),
        (b"1", b'{"user_id": 1, "item_id": 1, "profile": {"age": "old"}}', "schema"),
        (None, b"\xff\xfe\x00", "not_json"),
    ]


def _hostile_requests() -> list[tuple[bytes | None, bytes | None, str]]:
    return [
        (b"1", b'{"user_id": 1, "k": 0}', "schema"),
        (b"1", b'{"user_id": 1, "k": 1000000}', "schema"),
        (b"1", b'{"user_id": 1, "request_id": "' + b"r" * 200 + b'"}', "schema"),
        (b"1", b"[" * 10_000, "not_json"),
        (b"1", None, "schema"),
        (b"1", b'{"user_id": -1}', "schema"),
    ]


def _hostile_seeds(dim: int) -> list[tuple[bytes | None, bytes | None, str]]:
    good = _seed([7], [1.0], dim=dim)
    nan = np.full((1, dim), np.nan, np.float32)
    huge = np.full((1, dim), 3e38, np.float32)
    pack = encode_seed_pack(SeedPack(np.array([3, 4]), np.array([0, 1, 2]), np.array([1, 2]),
                                     np.array([1.0, 2.0]), np.ones((2, dim), np.float32), "v1"))
    return [
        (key_of(1), b"garbage", "bad_binary"),
        (b"not-an-id", good, "schema"),
        (b"9" * 19, good, "schema"),  # past int64
        (None, good, "schema"),
        (key_of(1), None, "bad_binary"),
        (key_of(1), _seed([8], [NOW + 3 * FUTURE_SLACK_S], dim=dim), "bad_binary"),  # froze
        (key_of(1), _seed([8], [-5.0], dim=dim), "bad_binary"),
        (key_of(1), _seed([8], [1.0], huge), "bad_binary"),
        (key_of(1), _seed([8], [1.0], nan), "bad_binary"),
        (None, pack[:-3], "bad_binary"),
    ]


def _hostile_centroids(k: int, dim: int) -> list[tuple[bytes | None, bytes | None, str]]:
    ok = ItemCentroids(np.ones((k, dim), np.float32), np.ones(k, np.float32), 5, NOW, NOW, "t")
    nan_time = ItemCentroids(ok.centroids, ok.counts, 5, float("nan"), NOW, "t")
    wrong_k = ItemCentroids(np.ones((k + 1, dim), np.float32), np.ones(k + 1, np.float32), 5,
                            NOW, NOW, "t")
    huge = ItemCentroids(ok.centroids * 1e30, ok.counts, 5, NOW, NOW, "t")
    item = key_of(424242)
    return [
        (b"9" * 19, encode_centroids(ok), "schema"),  # an OverflowError killed the worker once
        (b"x", encode_centroids(ok), "schema"),
        (item, b"garbage", "bad_binary"),
        (item, encode_centroids(nan_time), "bad_binary"),
        (item, encode_centroids(wrong_k), "bad_binary"),
        (item, encode_centroids(huge), "bad_binary"),
    ]


def _reasons(s, topic: str, expect: int) -> Counter:
    dlq = read_all(s, f"{topic}.dlq", expect=expect, timeout_s=60)
    return Counter(dict(r.headers)["reason"].decode() for r in dlq)


@pytest.mark.slow
def test_hostile_corpus_is_dead_lettered_and_good_events_come_through(settings):
    from consumers.scoring import ScoringStage

    data, model = _model()
    s = settings.model_copy(update={
        "window": settings.window.model_copy(update={"size": 1000, "k": model.k}),
        "scoring": settings.scoring.model_copy(update={"min_seeds": 1}),
    })
    scoring, clustering = ScoringStage(s, model), ClusteringStage(s)
    workers = [start_worker(scoring), start_worker(clustering)]
    try:
        wait_until(lambda: all(w.loop.ready.is_set() for w in workers), what="groups formed")
        rng = np.random.default_rng(0)
        users, items = data.users.ids[:20].tolist(), data.items.ids[:30].tolist()
        good_clicks = [Click(int(rng.choice(users)), int(rng.choice(items)), 1000.0 + i)
                       for i in range(200)]
        clicks = [(key_of(c.user_id), encode_click(c)) for c in good_clicks]
        hostile_clicks, hostile_reqs = _hostile_clicks(), _hostile_requests()
        hostile_seeds = _hostile_seeds(model.dim)
        hostile_cents = _hostile_centroids(model.k, model.dim)
        # interleaved: good, bad, good, ... on every topic
        produce(s, "clicks", [m for i, h in enumerate(hostile_clicks)
                              for m in (*clicks[15 * i:15 * (i + 1)], h[:2])] + clicks[180:])
        replayed = (key_of(5000), _seed([7], [1.0], dim=model.dim))  # sent twice: applied once
        produce(s, "seed-events", [replayed, *[h[:2] for h in hostile_seeds], replayed])
        produce(s, "seed-centroids", [h[:2] for h in hostile_cents])

        pairs = {(c.item_id, c.user_id) for c in good_clicks} | {(5000, 7)}
        wait_until(lambda: clustering.state.seeds_held() == len(pairs), timeout_s=90,
                   what="every good click's seed in a window")
        for item in {i for i, _ in pairs}:
            want = {u for i, u in pairs if i == item}
            assert set(clustering.state.items[item].window.users()) == want

        n_items = len({i for i, _ in pairs})
        wait_until(lambda: len(scoring.table) == n_items, timeout_s=60,
                   what="every seeded item in the scoring table")
        good_reqs = [(key_of(u), orjson.dumps({"user_id": u, "k": 5, "request_id": f"g{j}"}))
                     for j, u in enumerate(users[:10])]
        produce(s, "score-requests", [m for i, h in enumerate(hostile_reqs)
                                      for m in (*good_reqs[2 * i:2 * (i + 1)], h[:2])])
        recs = json_values(read_all(s, "recommendations", expect=len(good_reqs), timeout_s=60))
        assert {r["request_id"] for r in recs} == {f"g{j}" for j in range(len(good_reqs))}
        assert all(r["items"] for r in recs)  # the table the good seeds built serves them

        for topic, corpus in (("clicks", hostile_clicks), ("score-requests", hostile_reqs),
                              ("seed-events", hostile_seeds),
                              ("seed-centroids", hostile_cents)):
            want = Counter(reason for *_, reason in corpus)
            assert _reasons(s, topic, sum(want.values())) == want, topic
        assert all(w.thread.is_alive() for w in workers)  # nothing killed a worker
        dead = sum(total(scrape(w.metrics_url), "lookalike_dead_letters_total") for w in workers)
        assert dead == len(hostile_clicks) + len(hostile_reqs) + len(hostile_seeds) + len(
            hostile_cents)
    finally:
        for w in workers:
            w.stop()
