"""Serving pipelines from config: every pipeline answers on the embedded broker, SASRec
reads the user's live clicks, explanations say who proposed an item and why."""

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from consumers.clustering import ClusteringStage
from consumers.pipelines import Pool, rank_user, standardised
from consumers.replay import replay
from consumers.runner import start_worker
from consumers.scoring import ScoringStage
from engine.codec import key_of
from engine.config import PipelineConfig, ScoringConfig
from models.ctr_data import build_ctr_data
from models.ctr_ranker import CTRRanker
from models.ctr_train import build_model, fit, save_ctr
from models.ralm import RalmConfig, RalmModel
from models.recommender import get_model
from models.splits import make_split
from models.train_ralm import train_ralm
from tests.kafka_fixtures import json_values, produce, read_all, wait_until

N_CLICKS = 3000


@pytest.fixture(scope="module")
def ralm(ml100k, tmp_path_factory) -> RalmModel:
    train, _ = ml100k.time_split(0.8)
    cfg = RalmConfig.tiny(user_epochs=1, lookalike_epochs=1)
    path = train_ralm(train, cfg, tmp_path_factory.mktemp("ralm"), progress=False,
                      log=lambda *_: None)
    return RalmModel.load(path)


@pytest.fixture(scope="module")
def sasrec_path(ml100k, tmp_path_factory):
    model = get_model("sasrec")(hidden=16, max_len=20, blocks=1, heads=1)
    model.fit(make_split(ml100k, "loo", seed=0), epochs=3, seed=0, threads=1, progress=False)
    return model.save(tmp_path_factory.mktemp("sasrec") / "sasrec.pt")


@pytest.fixture(scope="module")
def dlrm_path(ml100k, tmp_path_factory):
    data = build_ctr_data(ml100k, "ctx", seed=0)
    model = build_model("dlrm", data, seed=0)
    fit(model, data, epochs=2, threads=1, progress=False)
    return save_ctr(tmp_path_factory.mktemp("dlrm") / "dlrm.pt", "dlrm", model, data, {})


PIPELINES = {
    "default": {},
    "ctr": {"sources": ["sasrec", "ralm"], "ranker": "dlrm"},
    "seq": {"sources": ["sasrec"], "ranker": "sasrec"},
    "seq-then-ralm": {"sources": ["sasrec"], "ranker": "ralm"},
    "ralm-then-seq": {"sources": ["ralm"], "ranker": "sasrec"},  # a zoo model ranking only
    "blend": {"sources": ["sasrec", "ralm"], "ranker": "blend",
              "blend": {"sasrec": 0.5, "ralm": 0.5}},
    "cold": {"sources": ["popular"], "ranker": "popular"},
}


def _request(s, user: int, rid: str, pipeline: str | None, k: int = 5) -> None:
    body = {"user_id": user, "request_id": rid, "k": k, "explain": True,
            **({"pipeline": pipeline} if pipeline else {})}
    produce(s, "score-requests", [(key_of(user), orjson.dumps(body))])


def test_every_pipeline_serves_and_sasrec_follows_live_clicks(settings, ml100k, ralm,
                                                              sasrec_path, dlrm_path):
    s = settings.model_copy(update={
        "window": settings.window.model_copy(update={"size": 10_000, "k": ralm.k}),
        "scoring": ScoringConfig.model_validate({
            **settings.scoring.model_dump(), "min_seeds": 1, "models": {"sasrec": sasrec_path},
            "rankers": {"dlrm": dlrm_path}, "pipelines": PIPELINES}),
    })
    scoring = ScoringStage(s, ralm)
    workers = [start_worker(st) for st in (scoring, ClusteringStage(s))]
    try:
        wait_until(lambda: all(w.loop.ready.is_set() for w in workers), what="groups formed")
        replay(ml100k, s.kafka, limit=N_CLICKS, progress=False)
        wait_until(lambda: len(scoring.table) > 300 and not scoring.table.dirty,
                   timeout_s=90, what="centroids at the scorer")
        users = ml100k.users.ids[ml100k.user[:N_CLICKS]]
        ids, counts = np.unique(users, return_counts=True)
        user = int(ids[counts.argmax()])
        for name in PIPELINES:
            _request(s, user, f"r-{name}", None if name == "default" else name)
        _request(s, 9_999_999, "new-user", "cold")
        recs = {r["request_id"]: r for r in json_values(
            read_all(s, "recommendations", expect=len(PIPELINES) + 1))}
        seen = set(scoring.users.get(user).seen.tolist())
        for name, p in PIPELINES.items():
            rec = recs[f"r-{name}"]
            assert rec["pipeline"] == name and len(rec["items"]) == 5, name
            got = [it["item_id"] for it in rec["items"]]
            assert not set(got) & seen, name
            scores = [it["score"] for it in rec["items"]]
            assert scores == sorted(scores, reverse=True), name
            for it in rec["items"]:
                why = it["why"]
                assert why["ranker"] == p.get("ranker", "ralm")
                assert set(why["sources"]) <= set(p.get("sources", ["ralm"]))
                if why["ranker"] == "ralm":  # RALM-ranked: the seed cluster it leaned on
                    assert 0 < why["seed_cluster"]["weight"] <= 1
        assert recs["new-user"]["cold"] is True and len(recs["new-user"]["items"]) == 5
        # DLRM ranks the pooled candidates by its own P(click | user, profile, item)
        ctr = recs["r-ctr"]["items"]
        profile = scoring.users.get(user).profile
        assert profile is not None
        want = CTRRanker(dlrm_path).score(user, profile.to_json(),
                                          [it["item_id"] for it in ctr])
        np.testing.assert_allclose([it["score"] for it in ctr], want, rtol=1e-4, atol=1e-5)

        # a click moves the user's SASRec recommendations (live state, no retraining)
        before = [it["item_id"] for it in recs["r-seq"]["items"]]
        clicks = before[:2]  # the user takes two of them
        n = scoring.users.get(user).clicks
        produce(s, "clicks", [(key_of(user), orjson.dumps({"user_id": user, "item_id": i}))
                              for i in clicks])
        wait_until(lambda: scoring.users.get(user).clicks == n + 2, what="clicks applied")
        _request(s, user, "r-seq-after", "seq")
        after = json_values(read_all(s, "recommendations", expect=len(PIPELINES) + 2))[-1]
        moved = [it["item_id"] for it in after["items"]]
        assert not set(clicks) & set(moved) and moved != before
        # not only the clicked items left: the sequence model's scores moved with the clicks
        old = {it["item_id"]: it["score"] for it in recs["r-seq"]["items"]}
        new = {it["item_id"]: it["score"] for it in after["items"]}
        common = set(old) & set(new)
        assert common and any(abs(old[i] - new[i]) > 1e-4 for i in common)

        _request(s, user, "bad", "no-such-pipeline")
        dlq = read_all(s, "score-requests.dlq", expect=1)
        assert dict(dlq[0].headers)["reason"] == b"schema"
        assert b"no-such-pipeline" in dict(dlq[0].headers)["detail"]
    finally:
        for w in workers:
            w.stop()


def test_blend_standardises_each_term_and_ranks_unscored_items_last():
    pool = Pool()
    pool.add("a", [10, 11, 12])
    pool.add("b", [12, 13])
    assert pool.items == [10, 11, 12, 13] and pool.by[12] == ["a", "b"]
    p = PipelineConfig(sources=["a", "b"], ranker="blend", blend={"a": 1.0, "b": 1.0})
    terms = {"a": np.array([3.0, 2.0, 1.0, np.nan]), "b": np.array([np.nan, np.nan, 5.0, 1.0])}
    got = rank_user(p, pool, 4, terms, True, None, None)
    za, zb = standardised(terms["a"]), standardised(terms["b"])
    want = np.argsort(-(za + zb), kind="stable")
    assert [i for i, _ in got.items] == [pool.items[j] for j in want]
    assert got.why[0]["sources"] == pool.by[got.items[0][0]]
    np.testing.assert_allclose(standardised(np.array([1.0, 3.0, np.nan])), [-1, 1, -1])


@pytest.mark.parametrize("bad, message", [
    ({"pipelines": {"x": {"sources": ["sasrec"]}}}, "unknown source"),
    ({"pipelines": {"x": {"sources": ["ralm"], "ranker": "popular"}}}, "ranker 'popular'"),
    ({"pipelines": {"x": {"sources": ["ralm", "popular"], "ranker": "blend"}}}, "needs weights"),
    ({"default_pipeline": "nope"}, "not among the pipelines"),
    ({"rankers": {"popular": "x.pt"}}, "reuses the name"),
    ({"pipelines": {"x": {"sources": ["ralm"], "ranker": "dlrm"}}}, "CTR ranker"),
])
def test_pipeline_config_errors_name_the_problem(bad, message):
    with pytest.raises(ValidationError, match=message):
        ScoringConfig.model_validate(bad)
