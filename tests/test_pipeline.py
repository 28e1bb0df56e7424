"""Every stage together on the embedded broker with real MovieLens clicks.

Replay -> scoring worker (user state, RALM user embedding, seed-events) ->
clustering workers (windows, k-means, seed-centroids) -> scoring worker's
centroid table -> score request -> recommendations; bad events dead-lettered
on the way while the good ones around them go through.
"""

import subprocess
import sys
from collections import defaultdict

import numpy as np
import orjson
import pytest

from consumers.audience import request_audience
from consumers.clustering import ClusteringStage
from consumers.replay import replay
from consumers.runner import start_worker
from consumers.scoring import ScoringStage
from engine.codec import decode_centroids, key_of
from lookalike.scrape import scrape, total
from models.ralm import RalmConfig, RalmModel
from models.train_ralm import train_ralm
from tests.kafka_fixtures import json_values, produce, read_all, wait_until

N_CLICKS = 3000


@pytest.fixture(scope="module")
def tiny_ralm(ml100k, tmp_path_factory) -> RalmModel:
    train, _ = ml100k.time_split(0.8)
    cfg = RalmConfig.tiny(user_epochs=1, lookalike_epochs=1)
    out = tmp_path_factory.mktemp("ckpt")
    path = train_ralm(train, cfg, out, progress=False, log=lambda *_: None)
    return RalmModel.load(path)


def test_clicks_flow_through_every_stage(settings, ml100k, tiny_ralm):
    s = settings.model_copy(update={
        "window": settings.window.model_copy(update={"size": 10_000, "k": tiny_ralm.k}),
        "scoring": settings.scoring.model_copy(update={"min_seeds": 1}),
    })
    scoring = ScoringStage(s, tiny_ralm)
    clustering = [ClusteringStage(s) for _ in range(2)]
    workers = [start_worker(st) for st in [scoring, *clustering]]
    try:
        wait_until(lambda: all(w.loop.ready.is_set() for w in workers), what="groups formed")
        wait_until(lambda: sum(len(w.loop.consumer.assignment()) for w in workers[1:]) == 2,
                   what="seed-event partitions spread")
        new_item = 99_999_999  # no model was trained on it: servable from its first seed
        bad = [
            (key_of(1), b"{not json"),
            (key_of(1), b'{"item_id": 5}'),
            (key_of(1), b'{"user_id": 1, "item_id": %d}' % new_item),
            (key_of(1), b'{"user_id": 1, "item_id": 5, "x": "' + b"y" * 70_000 + b'"}'),
        ]
        produce(s, "clicks", bad[:2])
        rep = replay(ml100k, s.kafka, limit=N_CLICKS, progress=False)
        produce(s, "clicks", bad[2:])
        assert rep.events == N_CLICKS

        users = ml100k.users.ids[ml100k.user[:N_CLICKS]]
        items = ml100k.items.ids[ml100k.item[:N_CLICKS]]
        expected = defaultdict(set)
        for u, i in zip(users.tolist(), items.tolist()):
            expected[i].add(u)
        expected[new_item].add(1)
        n_seeds = sum(map(len, expected.values()))
        wait_until(lambda: sum(c.state.seeds_held() for c in clustering) == n_seeds,
                   timeout_s=90, what="every click in a seed window")

        # every replayed click ends up in exactly one seed window
        owners = defaultdict(list)
        for i, c in enumerate(clustering):
            for item, st in c.state.items.items():
                owners[item].append(i)
                assert set(st.window.users()) == expected[item]
        assert set(owners) == set(expected) and all(len(o) == 1 for o in owners.values())

        # centroids appear on seed-centroids for every clicked item, and reach the scorer
        latest = {int(r.key): decode_centroids(r.value) for r in read_all(s, "seed-centroids")}
        assert set(latest) == set(expected)
        assert {i: c.n_seeds for i, c in latest.items()} == {i: len(u) for i, u in
                                                             expected.items()}
        wait_until(lambda: len(scoring.table) == len(expected) and not scoring.table.dirty,
                   what="centroid table complete at the scorer")
        # the new item is served: in the index, where its one seed (user 1) is
        t = scoring.table
        slot = t.slot_of[new_item]
        assert slot in t.live_slots() and slot in t.search(t.global_vec[slot][None], len(t))[0]
        st1 = scoring.users.get(1)
        one = scoring._embed([st1], [st1.profile])[0]
        assert t.global_vec[slot] @ one / np.linalg.norm(one) > 0.99

        # ... and has an audience: the users most like its one seed, the seed excluded
        aud, complete, partials = request_audience(s, new_item, 5, timeout_s=30)
        assert complete and len(partials) == 1 and partials[0]["seeds_dropped"] == 1
        assert len(aud) == 5 and 1 not in {a["user_id"] for a in aud}
        assert [a["score"] for a in aud] == sorted((a["score"] for a in aud), reverse=True)
        produce(s, "audience-requests", [(key_of(new_item), b'{"k": 5}')])  # no item_id
        dlq = read_all(s, "audience-requests.dlq", expect=1)
        assert dict(dlq[0].headers)["reason"] == b"schema"

        # a score request yields a recommendations record for that user (the most active one)
        ids, counts = np.unique(users, return_counts=True)
        user = int(ids[counts.argmax()])
        seen = {int(i) for i, u in zip(items, users) if u == user}
        produce(s, "score-requests", [(key_of(user), orjson.dumps(
            {"user_id": user, "k": 7, "request_id": "r1", "pipeline": "ralm"}))])
        recs = json_values(read_all(s, "recommendations", expect=1))
        assert len(recs) == 1
        rec = recs[0]
        assert rec["user_id"] == user and rec["request_id"] == "r1"
        assert rec["model_version"] == tiny_ralm.version and rec["cold"] is False
        assert rec["request_seen_at"] <= rec["emitted_at"]
        got = [it["item_id"] for it in rec["items"]]
        assert len(got) == 7 and not seen & set(got) and set(got) <= set(expected)
        scores = [it["score"] for it in rec["items"]]
        assert scores == sorted(scores, reverse=True)

        # pipeline "ralm" ranks by the model: the full RALM score over the Faiss shortlist
        st = scoring.users.get(user)
        vec = tiny_ralm.embed_users([st.profile], [list(st.history)], [st.clicks])
        shortlist = scoring.table.search(vec, s.scoring.candidates + len(st.seen))[0]
        cand = np.array([c for c in shortlist if scoring.table.item_ids[c] not in seen])
        full = tiny_ralm.score_user(vec[0], scoring.table.centroids[cand],
                                    scoring.table.counts[cand], scoring.table.global_vec[cand])
        top = np.argsort(-full, kind="stable")[:7]
        np.testing.assert_allclose(scores, full[top], atol=1e-5)
        # the worker scores in numpy (RalmModel.score_table): near-ties may swap, nothing else
        ref = dict(zip(scoring.table.item_ids[cand].tolist(), full.tolist()))
        assert set(got) <= set(ref)
        np.testing.assert_allclose([ref[i] for i in got], full[top], atol=1e-5)

        # a user the worker never saw still gets recommendations, marked cold
        produce(s, "score-requests", [(key_of(77_777_777), orjson.dumps(
            {"user_id": 77_777_777, "request_id": "cold", "profile": {"age": 30}}))])
        cold = json_values(read_all(s, "recommendations", expect=2))[-1]
        assert cold["request_id"] == "cold" and cold["cold"] is True
        assert len(cold["items"]) == s.scoring.top_k

        # bad events: dead-lettered with reasons; metrics over HTTP count what was sent
        dlq = read_all(s, "clicks.dlq", expect=3)
        assert sorted(dict(r.headers)["reason"].decode() for r in dlq) == [
            "not_json", "oversized", "schema"]
        m = scrape(workers[0].metrics_url)
        assert total(m, "lookalike_events_consumed_total", topic="clicks") == N_CLICKS + 4
        assert total(m, "lookalike_dead_letters_total", topic="clicks") == 3
        assert total(m, "lookalike_events_produced_total", topic="seed-events") == N_CLICKS + 1
        assert total(m, "lookalike_recommendations_total") == 2
        assert total(m, "lookalike_audiences_total", kind="request") == 1
        assert total(m, "lookalike_events_consumed_total", topic="audience-requests") == 2
        assert total(m, "lookalike_scoring_latency_seconds_count") == 2
        mc = [scrape(w.metrics_url) for w in workers[1:]]
        assert sum(total(x, "lookalike_seed_window_seeds") for x in mc) == n_seeds
        assert sum(total(x, "lookalike_centroids_published_total") for x in mc) >= len(expected)

        # `lookalike recommend` asks as any client would, and gets the same answer
        r = subprocess.run([sys.executable, "-m", "lookalike.cli", "recommend", str(user),
                            "-k", "3", "--pipeline", "ralm", "-b", s.kafka.bootstrap_servers,
                            "--topic-prefix", s.kafka.topic_prefix, "--timeout", "30"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        answer = orjson.loads(r.stdout)
        assert answer["user_id"] == user and [it["item_id"] for it in answer["items"]] == got[:3]
    finally:
        for w in workers:
            w.stop()


def _clicks_applied(stage: ScoringStage) -> int:
    """Clicks in the stage's user state (-1 while its worker thread changes it)."""
    try:
        return sum(st.clicks for st in list(stage.users.users.values()))
    except RuntimeError:  # the dict changed size while it was copied
        return -1


def test_a_restarted_scoring_worker_restores_user_state_without_reemitting(
        settings, ml100k, tiny_ralm):
    s = settings.model_copy(update={
        "window": settings.window.model_copy(update={"k": tiny_ralm.k})})
    n = 1500
    first = start_worker(ScoringStage(s, tiny_ralm))
    try:
        wait_until(first.loop.ready.is_set, what="group formed")
        replay(ml100k, s.kafka, limit=n, progress=False)
        wait_until(lambda: total(scrape(first.metrics_url), "lookalike_events_consumed_total",
                                 topic="clicks") == n, what="clicks consumed")
        # consumed counts a poll as it is read; its clicks are applied after that
        wait_until(lambda: _clicks_applied(first.loop.stage) == n, what="clicks applied")
        held = first.loop.stage.users.users
        before = {u: (list(st.history), st.clicks) for u, st in held.items()}
    finally:
        first.stop()
    second_stage = ScoringStage(s, tiny_ralm)
    second = start_worker(second_stage)
    try:
        wait_until(second.loop.ready.is_set, what="group re-formed")
        # a request makes the worker handle a batch (the restore runs before it)
        user = next(iter(before))
        produce(s, "score-requests", [(key_of(user), orjson.dumps(
            {"user_id": user, "request_id": "after-restart"}))])
        recs = json_values(read_all(s, "recommendations", expect=1))
        assert recs[0]["request_id"] == "after-restart" and recs[0]["cold"] is False
        after = {u: (list(st.history), st.clicks) for u, st in second_stage.users.users.items()}
        assert after == before
        m = scrape(second.metrics_url)
        assert total(m, "lookalike_events_produced_total", topic="seed-events") == 0
        assert len(read_all(s, "seed-events")) > 0  # only the first worker's seeds exist
    finally:
        second.stop()
