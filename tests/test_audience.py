"""Audience extension: an item's look-alike users, its seeds excluded, by the RALM score."""

import numpy as np
import orjson
import pytest

from consumers.audience import look_alike_users, merge_partials, refresh_vectors
from engine.codec import AudienceRequest, BadEvent, ItemCentroids, decode_audience_request
from tests.test_scoring_fast_paths import _clicks, _stage, data, model  # noqa: F401 - fixtures

ITEM = 9_000_001  # an item no model was trained on


@pytest.fixture()
def stage(data, model):  # noqa: F811 - the imported fixtures
    st = _stage(model)
    clicks = _clicks(data, 2000)
    st._apply_clicks(clicks, [0] * len(clicks))
    refresh_vectors(st.users, lambda sts: st._embed(sts, [s.profile for s in sts]))
    return st


def _seed_item(stage, seeds: list[int]) -> None:
    """ITEM's centroids: its seeds' embeddings (k-means of a tiny window), and their clicks."""
    from engine.codec import Click

    for u in seeds:
        stage._apply_clicks([Click(u, ITEM, 1e9)], [0])
    vecs = stage.users.vecs[[stage.users.get(u).slot for u in seeds]]
    k = stage.table.k
    cent = vecs[np.arange(k) % len(seeds)].astype(np.float32)
    counts = np.zeros(k, np.float32)
    counts[:len(seeds)] = 1
    stage.table.upsert(ITEM, ItemCentroids(cent, counts, len(seeds), 1e9))


def test_audience_excludes_seeds_and_ranks_by_the_ralm_score(stage, model):  # noqa: F811
    users = list(stage.users.users)
    seeds = users[:3]
    _seed_item(stage, seeds)
    got = look_alike_users(model, stage.table, stage.users, ITEM, 20, candidates=10_000)
    assert got.reason is None and got.seeds_dropped == 3
    ids = [u for u, _ in got.users]
    assert len(ids) == 20 and not set(ids) & set(seeds)
    # the reference: the model's own score of every non-seed user for this item
    slot = stage.table.slot_of[ITEM]
    cent, counts = stage.table.centroids[slot], stage.table.counts[slot]
    others = [u for u in users if u not in seeds]
    states = [stage.users.get(u) for u in others]
    vecs = stage._embed(states, [s.profile for s in states])
    ref = np.array([model.score_user(v, cent[None], counts[None])[0] for v in vecs])
    best = np.argsort(-ref, kind="stable")[:20]
    np.testing.assert_allclose([s for _, s in got.users], ref[best], atol=1e-5)
    assert set(ids) == {others[i] for i in best}


def test_an_activity_prior_is_added_to_every_users_score(stage, model):  # noqa: F811
    """A model trained with ``activity_prior`` ranks by score + (γ/τ)·log(1 + clicks), the
    score ``lookalike evaluate audience`` measures: active users move up."""
    import copy

    import torch

    plain_model, with_prior = copy.deepcopy(model), copy.deepcopy(model)
    if hasattr(plain_model.lookalike, "prior"):
        del plain_model.lookalike.prior
    with_prior.lookalike.prior = torch.nn.Parameter(torch.tensor(3.0))
    users = list(stage.users.users)
    seeds = users[:3]
    _seed_item(stage, seeds)
    plain = look_alike_users(plain_model, stage.table, stage.users, ITEM, 200,
                             candidates=10_000)
    got = look_alike_users(with_prior, stage.table, stage.users, ITEM, 20, candidates=10_000)
    w = 3.0 / float(model.lookalike.tau.detach())
    clicks = {u: stage.users.get(u).clicks for u, _ in plain.users}
    assert len(set(clicks.values())) > 1  # users differ in activity, so the prior matters
    want = sorted(((s + w * np.log1p(clicks[u]), u) for u, s in plain.users), reverse=True)
    assert [u for u, _ in got.users] == [u for _, u in want[:20]]
    np.testing.assert_allclose([s for _, s in got.users], [s for s, _ in want[:20]], atol=1e-5)


def test_a_narrow_shortlist_still_returns_the_best_it_saw(stage, model):  # noqa: F811
    users = list(stage.users.users)
    _seed_item(stage, users[:2])
    wide = look_alike_users(model, stage.table, stage.users, ITEM, 5, candidates=10_000)
    narrow = look_alike_users(model, stage.table, stage.users, ITEM, 5, candidates=60)
    assert narrow.shortlisted == 65 and len(narrow.users) == 5
    # the shortlist is by global cosine, the re-rank by the full score: mostly the same top
    assert len({u for u, _ in narrow.users} & {u for u, _ in wide.users}) >= 3


def test_an_item_without_centroids_has_no_audience(stage, model):  # noqa: F811
    got = look_alike_users(model, stage.table, stage.users, 123_456_789, 10, 100)
    assert got.users == [] and got.reason == "no_seeds"


def test_stale_vectors_are_embedded_before_searching(stage, data):  # noqa: F811
    """Users restored from the log have no embedding yet; the first audience embeds them."""
    from engine.codec import Click

    u = next(iter(stage.users.users))
    st = stage.users.get(u)
    stage.users.click(Click(u, 42, 2e9), 0, 0)  # state changed without the click path
    assert not stage.users.fresh[st.slot]
    embedded = refresh_vectors(stage.users, lambda sts: stage._embed(sts, [s.profile for s in sts]))
    assert embedded == 1
    np.testing.assert_allclose(stage.users.vecs[st.slot], stage._embed([st], [st.profile])[0],
                               rtol=1e-6)


def test_the_click_path_stores_each_users_new_embedding(data, model):  # noqa: F811
    from consumers.loop import Event

    stage = _stage(model)
    clicks = _clicks(data, 300)
    events = [Event("clicks", _Rec(i), c) for i, c in enumerate(clicks)]
    stage._clicks(events)
    live = stage.users.user_of >= 0
    assert stage.users.fresh[live].all()
    st = stage.users.get(clicks[-1].user_id)
    np.testing.assert_allclose(stage.users.vecs[st.slot], stage._embed([st], [st.profile])[0],
                               rtol=1e-6)


class _Rec:
    partition, timestamp = 0, 0

    def __init__(self, offset: int):
        self.offset = offset


def test_evicted_users_leave_the_audience(data, model):  # noqa: F811
    from engine.codec import Click

    stage = _stage(model)
    stage.users.max_users = 5
    for u in range(8):
        stage.users.click(Click(u, 1, 1.0), 0, 0)
    held = set(stage.users.user_of[stage.users.user_of >= 0].tolist())
    assert held == {3, 4, 5, 6, 7}


def test_periodic_mode_publishes_changed_items_within_its_budget(data, model):  # noqa: F811
    stage = _stage(model)
    s = stage.settings
    stage.settings = s.model_copy(update={"scoring": s.scoring.model_copy(update={
        "audience_every_s": 1.0, "audience_items_per_s": 2.0})})
    clicks = _clicks(data, 500)
    stage._apply_clicks(clicks, [0] * len(clicks))
    for item in (11, 12, 13):
        k = stage.table.k
        cent = np.random.default_rng(item).normal(size=(k, model.dim)).astype(np.float32)
        stage._audience_due[item] = None
        stage.table.upsert(item, ItemCentroids(cent, np.ones(k, np.float32), 4, 1.0))
    stage._audiences(now=100.0)
    sent = [orjson.loads(v) for _, v, _ in stage.loop.sent]
    assert [r["item_id"] for r in sent] == [11, 12]  # 2 per second, first changed first
    assert all(r["kind"] == "periodic" and len(r["users"]) == s.scoring.audience_k for r in sent)
    stage._audiences(now=100.5)  # not yet
    assert len(stage.loop.sent) == 2
    stage._audiences(now=101.0)
    assert orjson.loads(stage.loop.sent[-1][1])["item_id"] == 13


def test_partials_merge_into_one_audience():
    a = {"partitions": [0], "partitions_total": 2,
         "users": [{"user_id": 1, "score": 0.9}, {"user_id": 2, "score": 0.5}]}
    b = {"partitions": [1], "partitions_total": 2,
         "users": [{"user_id": 3, "score": 0.7}, {"user_id": 2, "score": 0.6}]}
    users, complete = merge_partials([a], 2)
    assert not complete and [u["user_id"] for u in users] == [1, 2]
    users, complete = merge_partials([a, b], 3)
    assert complete
    assert [(u["user_id"], u["score"]) for u in users] == [(1, 0.9), (3, 0.7), (2, 0.6)]


@pytest.mark.parametrize("raw", [
    b'{"k": 5}', b'{"item_id": -3}', b'{"item_id": 1, "k": 0}', b'{"item_id": 1, "k": true}',
    b'{"item_id": 1, "k": 20000}', b'{"item_id": 1, "request_id": ["x"]}', b"[]", None,
])
def test_bad_audience_requests_have_reasons(raw):
    with pytest.raises(BadEvent) as e:
        decode_audience_request(raw, max_k=10_000)
    assert e.value.reason == "schema"


def test_audience_request_decodes():
    assert decode_audience_request(b'{"item_id": "7", "k": 3, "request_id": 9}', 10) == \
        AudienceRequest(7, 3, "9")
