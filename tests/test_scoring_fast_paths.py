"""The scoring worker's fast paths equal the reference code they replace."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner.default import murmur2

from consumers.scoring import ScoringStage, _chunks
from engine.centroid_table import CentroidTable
from engine.codec import (
    BadEvent,
    Click,
    ItemCentroids,
    SeedBatch,
    SeedPack,
    decode_click,
    decode_seed_message,
    decode_seed_pack,
    encode_seed_pack,
    encode_seeds,
    key_of,
)
from engine.config import load_settings
from engine.data import profiles_of
from engine.synthetic import SyntheticSpec, generate
from models.features import FeatureSpace
from models.ralm import RalmConfig, RalmModel


@pytest.fixture(scope="module")
def data():
    return generate(SyntheticSpec(n_users=200, n_items=300, clicks_per_user=30, seed=3))


@pytest.fixture(scope="module")
def model(data):
    torch.manual_seed(0)
    cfg = RalmConfig.tiny(history_len=8)
    return RalmModel.new(cfg, FeatureSpace.build(data, cfg.history_len), version="t")


class _Sink:
    """Stands in for the consumer loop: keeps what the stage sends."""

    def __init__(self, partitions: int = 3):
        self.sent = []
        self.producer = self
        self._parts = set(range(partitions))

    def partitions_for(self, topic):
        return self._parts

    def send(self, topic, key, value, headers=None, timestamp_ms=None, partition=None):
        self.sent.append((key, value, partition))


def _stage(model, history_len=8) -> ScoringStage:
    s = load_settings(None)
    s = s.model_copy(update={"scoring": s.scoring.model_copy(update={"history_len": history_len})})
    stage = ScoringStage(s, model)
    stage.loop = _Sink()
    return stage


def _clicks(data, n):
    prof = profiles_of(data)
    return [Click(int(data.users.ids[data.user[i]]), int(data.items.ids[data.item[i]]),
                  float(data.ts[i]), prof[data.user[i]]) for i in range(n)]


def test_score_table_equals_score(model):
    """The re-rank's compiled pass over a table's rows against the torch formula: slots
    repeat across users, items with empty centroid slots (junk left in them) and an item
    with none, rows not ``ok`` are NaN, and the attention weights are the softmax's."""
    rng = np.random.default_rng(5)
    n, k, h = 60, model.k, model.dim
    cent = rng.normal(size=(n, k, h)).astype(np.float32)
    counts = rng.integers(0, 3, (n, k)).astype(np.float32)
    counts[7] = 0
    glob = model.item_global(cent, counts)
    gram = cent @ cent.transpose(0, 2, 1)
    cent[counts == 0] += rng.normal(scale=50.0, size=(int((counts == 0).sum()), h))
    users = rng.normal(size=(4, h)).astype(np.float32)
    slots = rng.integers(0, n, (4, 25))
    slots[0, :3] = 7
    slots[2, -4:] = -1
    ok = slots >= 0
    ok[1, 5] = False
    got, att = model.score_table(users, slots, ok, cent, counts, glob, gram, explain=True)
    safe = np.maximum(slots, 0)
    clean = cent * (counts > 0)[..., None]
    want = model.score(users, clean[safe], counts[safe], glob[safe])
    assert np.isnan(got[~ok]).all()
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-4, atol=1e-5)
    assert att is not None and att.shape == (4, 25, k)
    np.testing.assert_allclose(att[ok].sum(-1), (counts[safe][ok] > 0).any(-1), atol=1e-5)
    assert (att[ok][counts[safe][ok] == 0] == 0).all()
    again, none = model.score_table(users, slots, ok, cent, counts, glob, gram)
    assert none is None
    np.testing.assert_array_equal(again, got)


def test_embed_from_cached_rows_equals_embed_users(data, model):
    stage = _stage(model, history_len=6)  # shorter than the model's 8: the ring wraps
    clicks = _clicks(data, 3000)
    stage._apply_clicks(clicks, [0] * len(clicks))
    users = list(stage.users.users)[:40]
    states = [stage.users.get(u) for u in users] + [None]
    profiles = [st.profile for st in states[:-1]] + [None]
    assert max(st.clicks for st in states[:-1]) > 6
    got = stage._embed(states, profiles)
    want = model.embed_users(profiles, [list(st.history) if st else [] for st in states],
                             [st.clicks if st else 0 for st in states])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_requests_read_the_embedding_the_click_path_stored(data, model):
    """A known user's request reads the embedding stored when their last click was
    seeded; a click since, another profile in the request or no state runs the tower."""
    from engine.codec import Profile
    from engine.user_store import UserState

    stage = _stage(model)
    clicks = _clicks(data, 600)
    stage._apply_clicks(clicks, [0] * len(clicks))
    states = list(stage.users.users.values())[:4]
    stage.users.set_vectors(states, stage._embed(states, [s.profile for s in states]))
    marked = np.full(model.dim, 7.0, np.float32)  # what no tower gives: read, not computed
    stage.users.vecs[states[0].slot] = marked
    other = Profile(age=99.0, gender="F", occupation="x", zip_code="0")
    ask: list[UserState | None] = [*states, None]
    profiles = [states[0].profile, states[1].profile, other, states[3].profile, None]
    stage.users.click(Click(list(stage.users.users)[3], 1, 1e12), 0, 0)  # a click since
    got = stage._user_vectors(ask, profiles)
    np.testing.assert_array_equal(got[0], marked)
    np.testing.assert_allclose(got[1], stage._embed([states[1]], [profiles[1]])[0], rtol=1e-5,
                               atol=1e-6)
    for i in (2, 3, 4):  # another profile, a click since the store, no state: the tower
        np.testing.assert_allclose(got[i], stage._embed([ask[i]], [profiles[i]])[0],
                                   rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[2], stage._embed([states[2]], [states[2].profile])[0])


def test_user_slots_are_reused_after_eviction(data, model):
    stage = _stage(model)
    stage.users.max_users = 5
    clicks = _clicks(data, 500)
    stage._apply_clicks(clicks, [0] * len(clicks))
    assert len(stage.users) == 5
    states = list(stage.users.users.values())
    assert len({st.slot for st in states}) == 5 and max(st.slot for st in states) <= 5
    want = model.embed_users([s.profile for s in states], [list(s.history) for s in states],
                             [s.clicks for s in states])
    np.testing.assert_allclose(stage._embed(states, [s.profile for s in states]), want,
                               rtol=1e-5, atol=1e-6)


def test_packed_seeds_go_to_the_partition_of_their_item(data, model):
    stage = _stage(model)
    stage.pack_seeds = True
    stage.seed_pack_bytes = 40 * (16 + 4 * model.dim)  # small packs: chunking is exercised
    clicks = _clicks(data, 600)
    n = len(clicks)
    vecs = np.random.default_rng(1).normal(size=(n, model.dim)).astype(np.float32)
    items = np.array([c.item_id for c in clicks])
    stage._emit_seeds(items, np.array([c.user_id for c in clicks]),
                      np.array([c.ts for c in clicks]), vecs, np.arange(n))
    got: dict[int, list] = {}
    for key, value, partition in stage.loop.sent:
        assert key is None
        pack = decode_seed_pack(value)
        assert len(pack.users) <= 40 or len(pack.items) == 1
        for item, batch in pack.batches():
            assert partition == (murmur2(key_of(item)) & 0x7FFFFFFF) % 3
            assert item not in got  # one pack holds all of an item's seeds of the poll
            got[item] = batch.users.tolist()
    want: dict[int, list] = {}
    for c in clicks:
        want.setdefault(c.item_id, []).append(c.user_id)
    assert got == want


def test_chunks_keep_items_whole():
    starts = np.array([0, 3, 4, 10, 11])
    assert _chunks(starts, 12, 5) == [(0, 4), (4, 10), (10, 12)]
    assert _chunks(np.array([0]), 9, 5) == [(0, 9)]


def test_seed_pack_round_trip_and_s1_compatibility():
    rng = np.random.default_rng(0)
    pack = SeedPack(np.array([7, 9]), np.array([0, 2, 3]), np.array([1, 2, 3]),
                    np.array([1.0, 2.0, 3.0]), rng.normal(size=(3, 4)).astype(np.float32), "v")
    out = decode_seed_message(None, encode_seed_pack(pack))
    assert [(i, b.users.tolist()) for i, b in out] == [(7, [1, 2]), (9, [3])]
    np.testing.assert_array_equal(out[1][1].vectors, pack.vectors[2:])
    s1 = encode_seeds(SeedBatch(np.array([5]), np.array([1.0]), pack.vectors[:1], "v"))
    assert [(i, b.users.tolist()) for i, b in decode_seed_message(b"12", s1)] == [(12, [5])]
    raw = encode_seed_pack(pack)
    for bad in (raw[:-1], raw[:10], raw.replace(b"S2", b"S3", 1)):
        with pytest.raises(BadEvent):
            decode_seed_pack(bad)


def test_profile_cache_still_rejects_a_boolean_age():
    ok = b'{"user_id": 1, "item_id": 2, "profile": {"age": 1, "gender": "M"}}'
    assert decode_click(ok, 0.0).profile.age == 1.0
    with pytest.raises(BadEvent):
        decode_click(ok.replace(b'"age": 1', b'"age": true'), 0.0)
    with pytest.raises(BadEvent):
        decode_click(ok.replace(b'"M"', b'["M"]'), 0.0)


def test_batched_search_equals_faiss_search():
    rng = np.random.default_rng(0)
    table = CentroidTable(3, 8, min_seeds=1)
    for item in range(500):
        cent = rng.normal(size=(3, 8)).astype(np.float32)
        table.upsert(item, ItemCentroids(cent, np.ones(3, np.float32), 3, 0.0))
    table.refresh(lambda c, n: c.mean(1) / np.linalg.norm(c.mean(1), axis=1, keepdims=True))
    users = rng.normal(size=(40, 8)).astype(np.float32)
    batched = table.search(users, 30)
    one_by_one = np.concatenate([table.search(u[None], 30) for u in users])
    np.testing.assert_array_equal(batched, one_by_one)


def _mean_global(c: np.ndarray, n: np.ndarray) -> np.ndarray:
    g = c.mean(1)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def _clustered_table(n_items: int, ann_min_items: int, rng: np.random.Generator,
                     ) -> tuple[CentroidTable, np.ndarray]:
    """Items around 16 taste directions in 16-d, as trained embeddings sit."""
    tastes = rng.normal(size=(16, 16))
    table = CentroidTable(3, 16, min_seeds=2, ann_min_items=ann_min_items, ann_nprobe=8)
    for item in range(n_items):
        cent = tastes[item % 16] + rng.normal(0, 0.3, (3, 16))
        table.upsert(item, ItemCentroids(cent.astype(np.float32), np.ones(3, np.float32), 3, 0.0))
    table.refresh(_mean_global)
    return table, tastes


def test_ivf_index_finds_what_exact_search_finds_and_stays_fresh():
    rng = np.random.default_rng(1)
    table, tastes = _clustered_table(3_000, 1_000, rng)
    assert table.approximate
    users = (tastes[rng.integers(0, 16, 50)] + rng.normal(0, 0.3, (50, 16))).astype(np.float32)
    got, exact = table.search(users, 20), table.search_exact(users, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got, exact, strict=True)])
    assert recall >= 0.95
    np.testing.assert_array_equal(table.search(users[:1], 20), got[:1])  # batch 1 = batched

    # an item moved next to a user is found after the next refresh, in place (no retrain)
    trained_on, item = table._ann_trained_on, 7
    table.upsert(item, ItemCentroids(np.repeat(users[:1], 3, 0), np.ones(3, np.float32), 3, 0.0))
    table.refresh(_mean_global)
    assert table._ann_trained_on == trained_on
    assert table.item_ids[table.search(users[:1], 1)[0, 0]] == item
    # below min_seeds (or a tombstone) it leaves the index; the index holds each item once
    table.upsert(item, ItemCentroids(np.repeat(users[:1], 3, 0), np.ones(3, np.float32), 1, 0.0))
    table.refresh(_mean_global)
    assert item not in table.item_ids[table.search(users[:1], 50)[0]].tolist()
    assert table._ann.ntotal == len(table.live_slots()) == 2_999


def test_ivf_index_is_retrained_when_the_catalogue_doubles_and_dropped_when_it_shrinks():
    rng = np.random.default_rng(2)
    table, _ = _clustered_table(1_200, 1_000, rng)
    first = table._ann_trained_on
    assert table.approximate and first == 1_200
    for item in range(1_200, 2_500):
        table.upsert(item, ItemCentroids(rng.normal(size=(3, 16)).astype(np.float32),
                                         np.ones(3, np.float32), 3, 0.0))
    table.refresh(_mean_global)
    assert table._ann_trained_on == 2_500 and table._ann.ntotal == 2_500
    for item in range(2_000):
        table.upsert(item, None)
    table.refresh(_mean_global)
    assert not table.approximate  # exact again below ann_min_items
    assert table.search(np.ones((1, 16), np.float32), 600).shape == (1, 500)


@pytest.mark.parametrize("ann_min_items", [10_000, 200])  # exact index, then IVF
def test_deleted_items_leave_the_index_and_their_slots_are_reused(ann_min_items):
    rng = np.random.default_rng(4)
    table = CentroidTable(3, 16, min_seeds=1, ann_min_items=ann_min_items, ann_nprobe=64)
    tastes = rng.normal(size=(8, 16))
    for item in range(400):
        cent = (tastes[item % 8] + rng.normal(0, 0.3, (3, 16))).astype(np.float32)
        table.upsert(item, ItemCentroids(cent, np.ones(3, np.float32), 3, 1.0))
    table.refresh(_mean_global)
    assert table.approximate == (ann_min_items == 200)
    user = table.global_vec[table.slot_of[5]][None]
    assert 5 in table.item_ids[table.search(user, 10)[0]].tolist()
    slot = table.slot_of[5]
    table.upsert(5, None)  # tombstone
    table.refresh(_mean_global)
    assert 5 not in table.slot_of and len(table) == 399
    assert 5 not in table.item_ids[np.maximum(table.search(user, 50)[0], 0)].tolist()
    table.upsert(10_005, ItemCentroids(np.repeat(user, 3, 0), np.ones(3, np.float32), 3, 2.0))
    table.refresh(_mean_global)
    assert table.slot_of[10_005] == slot and len(table) == 400  # the slot came back
    assert table.item_ids[table.search(user, 1)[0, 0]] == 10_005
    assert table._next == 400  # no new slot was used


def test_index_recall_is_sampled_into_a_metric(model):
    """One request in recall_sample_every is searched exactly too; the recall is observed."""
    s = load_settings(None)
    s = s.model_copy(update={"window": s.window.model_copy(update={"k": model.k}),
                             "scoring": s.scoring.model_copy(update={
                                 "ann_min_items": 100, "ann_nprobe": 1, "min_seeds": 1,
                                 "recall_sample_every": 5, "candidates": 20})})
    stage = ScoringStage(s, model)
    rng = np.random.default_rng(5)
    for item in range(600):
        cent = rng.normal(size=(model.k, model.dim)).astype(np.float32)
        stage.table.upsert(item, ItemCentroids(cent, np.ones(model.k, np.float32), 3, 0.0))
    stage.table.refresh(model.item_global)
    assert stage.table.approximate
    for _ in range(20):
        stage.rank(rng.normal(size=(1, model.dim)).astype(np.float32), [None], [5])

    def sample(name):
        return stage.metrics.registry.get_sample_value(name, {"stage": "scoring"})
    assert sample("lookalike_index_recall_count") == 4  # requests 5, 10, 15, 20
    # random vectors and one list probed of ~20: the exact top 20 is mostly missed
    assert 0 <= sample("lookalike_index_recall_sum") < 4


@pytest.mark.parametrize("big_ids", [False, True])
def test_unseen_keeps_the_first_unclicked_slots_of_each_row(model, big_ids):
    """The batch-wide isin equals a per-row set filter (and its fallback for huge ids)."""
    stage = _stage(model)
    rng = np.random.default_rng(4)
    base = 1 << 50 if big_ids else 0
    ids = base + rng.permutation(5_000)[:400]
    stage.table.item_ids[:400] = ids
    slots = np.stack([rng.permutation(400)[:60] for _ in range(7)])
    slots[2, 50:] = -1  # a short shortlist
    seen = [ids[rng.choice(400, n, replace=False)] for n in (0, 5, 30, 200, 1, 0, 60)]
    seen[4] = np.array([base + 10**6])  # a click on an item the table never held
    got = stage._unseen(slots, seen, 40)
    for b, row in enumerate(slots):
        clicked = set(seen[b].tolist())
        want = [s for s in row.tolist() if s >= 0 and int(ids[s]) not in clicked][:40]
        assert got[b, :len(want)].tolist() == want
        assert (got[b, len(want):] == -1).all()


def test_unseen_finds_clicked_items_per_row_whatever_their_ids():
    """The compiled filter of ``Ranking._unseen`` against Python sets: repeats, empty
    rows, ids past 2**47 (where packing the row into the key would overflow)."""
    from consumers.ranking import unseen

    rng = np.random.default_rng(5)
    big = np.int64(1) << np.int64(50)
    item_of = rng.integers(0, 60, 300) + np.where(rng.random(300) < 0.3, big, 0)
    slots = rng.integers(-1, 300, (7, 30))
    seen = [item_of[rng.integers(0, 300, int(n))] for n in rng.integers(0, 60, 7)]
    seen[2] = np.zeros(0, np.int64)
    got = unseen(slots, item_of, np.concatenate(seen),
                 np.r_[0, np.cumsum([len(x) for x in seen])], 12)
    for b, row in enumerate(slots):
        clicked = set(seen[b].tolist())
        want = [s for s in row.tolist() if s >= 0 and int(item_of[s]) not in clicked][:12]
        assert got[b].tolist() == want + [-1] * (12 - len(want))


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.integers(-1, 12), max_size=15), min_size=1, max_size=6))
def test_first_occurrences_keeps_each_rows_first_of_every_slot(rows):
    """The compiled dedup of a user's pool against Python: order kept, -1 dropped,
    padded to the longest row."""
    from consumers.ranking import first_occurrences

    width = max(len(r) for r in rows)
    slots = np.array([r + [-1] * (width - len(r)) for r in rows], np.int64).reshape(len(rows),
                                                                                  width)
    want = [list(dict.fromkeys(s for s in r if s >= 0)) for r in rows]
    longest = max(len(w) for w in want)
    got = first_occurrences(slots)
    assert got.shape == (len(rows), longest)
    assert got.tolist() == [w + [-1] * (longest - len(w)) for w in want]


def test_serving_compiles_nothing_after_start(data, model):
    """``ScoringStage._compile`` (run by ``start``) gives each compiled step the types
    serving passes it, so no click poll or request compiles (seconds on a fresh
    install: the demo's first answers came 7 s late): batch 1 and batched requests,
    the click path's tower."""
    from consumers.ranking import first_occurrences, unseen
    from models.ralm_serving import _pool_rows, score_slots

    steps = (unseen, first_occurrences, score_slots, _pool_rows)
    stage = _stage(model)
    stage._compile()
    before = [len(f.signatures) for f in steps]
    clicks = _clicks(data, 2000)
    last = stage._apply_clicks(clicks, [0] * len(clicks))
    states = list(last.values())
    vecs = stage._embed(states, [s.profile for s in states])
    rng = np.random.default_rng(6)
    for item in data.items.ids[:120].tolist():
        stage.table.upsert(int(item), ItemCentroids(
            rng.normal(size=(stage.table.k, model.dim)).astype(np.float32),
            np.ones(stage.table.k, np.float32), 30, 1.0, model_version=model.version))
    stage.table.refresh(model.item_global)
    stage.rank(vecs[:1], states[:1], [10])
    stage.rank(vecs[:6], states[:6], [10] * 6)
    assert [len(f.signatures) for f in steps] == before
