"""Pipelines over the centroid table alone (the default blend of RALM and popularity,
RALM alone with popular candidates, popularity alone) are served batched over table
slots (``Ranking._rank_table``); the per-user path over item ids
(``Ranking.rank_pipeline``, which zoo and CTR pipelines use) is its reference."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import orjson
import pytest
import torch

from consumers.loop import Event
from consumers.scoring import ScoringStage
from engine import topics as T
from engine.codec import Click, ItemCentroids, ScoreRequest, key_of
from engine.config import DEFAULT_PIPELINE, PipelineConfig, load_settings
from engine.data import profiles_of
from engine.synthetic import SyntheticSpec, generate
from engine.topics import KeyPartitions
from models.features import FeatureSpace
from models.ralm import RalmConfig, RalmModel

PIPELINES = {
    "default": DEFAULT_PIPELINE,
    "ralm-ranks-both": PipelineConfig(sources=["ralm", "popular"], ranker="ralm",
                                      per_source=15),
    "popular-first": PipelineConfig(sources=["popular", "ralm"], ranker="blend",
                                    blend={"popular": 2.0, "ralm": 1.0}, per_source=25),
    "popular": PipelineConfig(sources=["popular"], ranker="popular", per_source=30),
    "ralm-popular-term": PipelineConfig(sources=["ralm"], ranker="blend",
                                        blend={"ralm": 1.0, "popular": 0.5}, per_source=20),
}


class _Sink:
    """Stands in for the consumer loop (three partitions): keeps what the stage sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None]] = []
        self.producer = self

    def partitions_for(self, topic):
        return {0, 1, 2}

    def send(self, topic, key, value, headers=None, timestamp_ms=None, partition=None):
        self.sent.append((topic, key, value, partition))


@pytest.fixture(scope="module")
def stage() -> ScoringStage:
    data = generate(SyntheticSpec(n_users=150, n_items=400, clicks_per_user=25, seed=7))
    torch.manual_seed(0)
    cfg = RalmConfig.tiny(history_len=8)
    model = RalmModel.new(cfg, FeatureSpace.build(data, cfg.history_len), version="v1")
    s = load_settings(None)
    s = s.model_copy(update={
        "window": s.window.model_copy(update={"k": model.k}),
        "scoring": s.scoring.model_copy(update={"pipelines": PIPELINES, "min_seeds": 2,
                                                "history_len": 8})})
    st = ScoringStage(s, model)
    st.loop = _Sink()
    prof = profiles_of(data)
    clicks = [Click(int(data.users.ids[data.user[i]]), int(data.items.ids[data.item[i]]),
                    float(data.ts[i]), prof[data.user[i]]) for i in range(len(data))]
    st._apply_clicks(clicks, [0] * len(clicks))
    rng = np.random.default_rng(3)
    for item in data.items.ids.tolist():
        cent = rng.normal(size=(model.k, model.dim)).astype(np.float32)
        counts = rng.integers(0, 6, model.k).astype(np.float32)
        seeds = int(rng.integers(1, 12))  # ties in popularity; seeds 1 is below min_seeds
        version = "v0" if rng.random() < 0.05 else "v1"  # a few of another model version
        st.table.upsert(item, ItemCentroids(cent, counts, seeds, 0.0, model_version=version))
    st.table.serve_version("v1")
    st.table.refresh(model.item_global)
    return st


def _users(stage: ScoringStage, n: int):
    users = list(stage.users.users)[:n]
    states = [stage.users.get(u) for u in users] + [None]  # and a user without clicks
    vecs = stage._embed(states, [s.profile if s else None for s in states])
    return users + [10**9], states, vecs


@pytest.mark.parametrize("name", list(PIPELINES))
@pytest.mark.parametrize("explain", [False, True])
def test_batched_table_pipelines_equal_the_per_user_reference(stage, name, explain):
    p = PIPELINES[name]
    users, states, vecs = _users(stage, 40)
    ks = [None, 5, 30] * 13 + [7, 12]
    got = stage._rank_table(p, vecs, states, ks, explain)
    want = stage.rank_pipeline(p, vecs, states, ks, explain, [(u, None) for u in users])
    assert sum(len(r.items) for r in want) > 0
    for g, w in zip(got, want, strict=True):
        assert [i for i, _ in g.items] == [i for i, _ in w.items]
        np.testing.assert_allclose([s for _, s in g.items], [s for _, s in w.items],
                                   rtol=1e-5, atol=1e-6)
        if not explain:
            assert g.why is None and w.why is None
            continue
        assert [(x["sources"], x["ranker"]) for x in g.why] == [
            (x["sources"], x["ranker"]) for x in w.why]
        for a, b in zip(g.why, w.why, strict=True):
            assert ("seed_cluster" in a) == ("seed_cluster" in b)
            if "seed_cluster" in a:
                assert a["seed_cluster"]["seeds"] == b["seed_cluster"]["seeds"]
                assert abs(a["seed_cluster"]["weight"] - b["seed_cluster"]["weight"]) < 2e-4


def test_requests_are_answered_from_servable_items_by_the_batched_path(stage, monkeypatch):
    """The worker's request handling goes through the batched path for table-only
    pipelines, and answers with servable items only (min_seeds, the serving version)."""
    calls = []
    original = stage._rank_table
    monkeypatch.setattr(stage, "_rank_table", lambda *a: calls.append(a[0]) or original(*a))
    users, states, _ = _users(stage, 10)
    homes = KeyPartitions().of(np.array(users), 3).tolist()  # murmur2, as Kafka's clients
    events = [Event(T.SCORE_REQUESTS, SimpleNamespace(
        topic=T.SCORE_REQUESTS, partition=h, offset=n, key=key_of(u), timestamp=0, headers=[]),
        ScoreRequest(u, 20, f"r{u}")) for n, (u, h) in enumerate(zip(users, homes))]
    stage.loop.sent.clear()
    stage.handle(events)
    assert calls == [DEFAULT_PIPELINE]
    sent = [(orjson.loads(v), p) for t, _, v, p in stage.loop.sent if t == T.RECOMMENDATIONS]
    answers = [a for a, _ in sent]
    assert len(answers) == len(users)
    assert [p for _, p in sent] == homes  # each answer on its user's partition
    t = stage.table
    for a, st in zip(answers, states, strict=True):
        items = [x["item_id"] for x in a["items"]]
        assert len(items) == 20
        slots = np.array([t.slot_of[i] for i in items])
        assert t.servable(slots).all()
        if st is not None:
            assert not set(items) & set(st.seen.tolist())
    assert [k for _, k, _, _ in stage.loop.sent] == [key_of(u) for u in users]
