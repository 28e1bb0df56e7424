"""Hot reload: a new checkpoint is swapped in between polls; a bad one is refused."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from consumers.model_reload import ModelReloader, RejectedModel, load_validated
from consumers.runner import start_worker
from consumers.scoring import ScoringStage
from engine.codec import (
    BadEvent,
    ItemCentroids,
    decode_model_announcement,
    encode_centroids,
    encode_json,
    key_of,
)
from engine.config import load_settings
from engine.synthetic import SyntheticSpec, generate
from lookalike.scrape import scrape, total
from models.features import FeatureSpace
from models.ralm import RalmConfig, RalmModel
from tests.kafka_fixtures import json_values, produce, read_all, wait_until

K = 20  # the centroid table's k (settings.window.k)


@pytest.fixture(scope="module")
def features():
    data = generate(SyntheticSpec(n_users=100, n_items=80, clicks_per_user=10, seed=2))
    return FeatureSpace.build(data, 8)


def _model(features, version: str, dim: int = 16, seed: int = 0) -> RalmModel:
    torch.manual_seed(seed)
    return RalmModel.new(RalmConfig.tiny(history_len=8, dim=dim), features, version=version)


def _save(model: RalmModel, path: Path) -> Path:
    model.save(path)
    return path


def _poll_until(reloader: ModelReloader, what: str) -> RalmModel | None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = reloader.poll(time.monotonic(), lambda rec, e: None)
        if got is not None:
            return got
        if reloader._loading is None and reloader._queued is None and reloader.rejected:
            return None
        time.sleep(0.02)
    raise AssertionError(f"no outcome in time: {what}")


def test_a_changed_checkpoint_file_is_loaded_and_a_corrupt_one_rejected(features, tmp_path):
    s = load_settings(None)
    s = s.model_copy(update={"scoring": s.scoring.model_copy(update={"reload_check_s": 0.01})})
    path = _save(_model(features, "v1"), tmp_path / "ralm.pt")
    rejected = []
    r = ModelReloader(s, 16, path, explicit=True, on_reject=lambda: rejected.append(1))
    assert r.poll(time.monotonic(), lambda rec, e: None) is None  # unchanged: nothing to do
    _save(_model(features, "v2", seed=1), tmp_path / "new.pt")
    os.replace(tmp_path / "new.pt", path)  # an atomic overwrite, as a trainer should do
    os.utime(path, (time.time() + 5, time.time() + 5))
    got = _poll_until(r, "the new checkpoint")
    assert got is not None and got.version == "v2"
    path.write_bytes(b"not a checkpoint at all")
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert _poll_until(r, "the corrupt checkpoint") is None
    assert rejected == [1] and r.rejected[-1][1].startswith("CheckpointError")
    r.close()


def test_a_model_of_another_size_is_rejected(features, tmp_path):
    path = _save(_model(features, "wide", dim=32), tmp_path / "wide.pt")
    with pytest.raises(RejectedModel, match="embedding size 32"):
        load_validated(path, 16)
    assert load_validated(_save(_model(features, "ok"), tmp_path / "ok.pt"), 16).version == "ok"


def test_swap_re_embeds_items_and_stamps_outputs(features):
    s = load_settings(None)
    old, new = _model(features, "v1"), _model(features, "v2", seed=7)
    stage = ScoringStage(s, old)
    rng = np.random.default_rng(0)
    for item in range(30):
        cent = rng.normal(size=(K, 16)).astype(np.float32)
        stage.table.upsert(item, ItemCentroids(cent, np.ones(K, np.float32), 9, 1.0))
    stage.table.refresh(old.item_global)
    stage.swap_model(new)
    live = stage.table.live_slots()
    want = new.item_global(stage.table.centroids[live], stage.table.counts[live])
    np.testing.assert_allclose(stage.table.global_vec[live], want, rtol=1e-5, atol=1e-6)
    assert stage.model is new
    assert stage.metrics.registry.get_sample_value(
        "lookalike_model_reloads_total", {"stage": "scoring", "outcome": "loaded"}) == 1


@pytest.mark.parametrize("raw", [b"{", b'{"kind": "sasrec", "path": "/x"}', b'{"kind": "ralm"}',
                                 b'{"kind": "ralm", "path": ""}', b'{"kind": "ralm", "path": 3}'])
def test_bad_announcements_have_reasons(raw):
    with pytest.raises(BadEvent):
        decode_model_announcement(raw)


def test_hot_reload_under_a_request_stream_loses_nothing(settings, features, tmp_path):
    """Requests flow while a new model is announced, then a corrupt one: every request
    is answered once, the version switches once, and the corrupt file changes nothing."""
    models = tmp_path / "models"
    models.mkdir()
    s = settings.model_copy(update={"scoring": settings.scoring.model_copy(update={
        "min_seeds": 1, "reload_check_s": 0.0, "model_dirs": [models]})})
    v1 = _model(features, "v1")
    v2_path = _save(_model(features, "v2", seed=3), models / "v2.pt")
    bad_path = models / "bad.pt"
    bad_path.write_bytes(b"\x00garbage")
    outside = _save(_model(features, "v3", seed=4), tmp_path / "v3.pt")
    stage = ScoringStage(s, v1)
    w = start_worker(stage)
    rng = np.random.default_rng(1)
    try:
        wait_until(lambda: w.loop.ready.is_set(), what="scoring worker ready")
        produce(s, "seed-centroids", [
            (key_of(i), encode_centroids(ItemCentroids(
                rng.normal(size=(K, 16)).astype(np.float32), np.ones(K, np.float32), 3, 1.0)))
            for i in range(40)])
        wait_until(lambda: len(stage.table) == 40, what="centroids at the scorer")
        n = 300
        sent = threading.Event()

        def requests() -> None:
            for i in range(n):
                produce(s, "score-requests", [(key_of(i % 7), encode_json(
                    {"user_id": i % 7, "request_id": f"r{i}", "k": 3}))])
                if i == 100:
                    produce(s, "models", [(b"ralm", encode_json(
                        {"kind": "ralm", "path": str(v2_path), "version": "v2"}))])
                if i == 200:
                    produce(s, "models", [(b"ralm", encode_json(
                        {"kind": "ralm", "path": str(bad_path)})), (b"ralm", b"{oops"),
                        (b"ralm", encode_json({"kind": "ralm", "path": str(outside)}))])
            sent.set()

        t = threading.Thread(target=requests)
        t.start()
        t.join(120)
        assert sent.is_set()
        recs = json_values(read_all(s, "recommendations", expect=n, timeout_s=60))
        assert sorted(r["request_id"] for r in recs) == sorted(f"r{i}" for i in range(n))
        by_id = {r["request_id"]: r for r in recs}
        versions = [by_id[f"r{i}"]["model_version"] for i in range(n)]
        switch = versions.index("v2")
        assert 0 < switch < n and set(versions[:switch]) == {"v1"}
        assert set(versions[switch:]) == {"v2"}  # the corrupt and the outside one never
        assert all(len(r["items"]) == 3 for r in recs)
        dlq = read_all(s, "models.dlq", expect=2)  # the broken record, the outside path
        reasons = sorted(dict(r.headers)["reason"] for r in dlq)
        assert reasons == [b"not_json", b"schema"]
        assert any(b"outside the model folders" in dict(r.headers)["detail"] for r in dlq)
        m = scrape(w.metrics_url)
        assert total(m, "lookalike_model_reloads_total", outcome="loaded") == 1
        assert total(m, "lookalike_model_reloads_total", outcome="rejected") == 1
    finally:
        w.stop()


def test_users_catalogue_rows_are_rebuilt_from_their_item_ids(features):
    """Catalogue rows are a model's: a swap rebuilds each user's ring of rows from the
    ring of item ids, exactly as the click path wrote it (ring wrapped or not)."""
    from engine.codec import Click

    s = load_settings(None)
    stage = ScoringStage(s, _model(features, "v1"))
    items = list(features.item_ids[:30])
    for j, item in enumerate(items):  # user 7 wraps its ring (8 rows), user 8 does not
        stage._apply_clicks([Click(7, item, 1.0 + j)], [0])
    stage._apply_clicks([Click(8, items[0], 1.0)], [0])
    before = stage.users.rows.copy()
    stage.users.remap_rows(lambda ids: np.full(len(ids), 3))  # another catalogue
    for u in (7, 8):
        st = stage.users.get(u)
        assert (stage.users.rows[st.slot] == 3).sum() == min(st.clicks, stage.users.ring_len)
    stage.users.remap_rows(features.catalog_rows)  # back: the click path's rows exactly
    np.testing.assert_array_equal(stage.users.rows, before)


def test_a_swap_re_embeds_users_a_slice_per_poll(features, monkeypatch):
    """After a swap every held user's stored embedding is the old model's; each poll's
    tick (``refresh_stale``) re-embeds at most ``ScoringStage.refresh_per_tick`` of them (a million
    users in one go would hold the loop for minutes), until all are the new model's."""
    from consumers import scoring
    from engine.codec import Click

    monkeypatch.setattr(scoring.ScoringStage, "refresh_per_tick", 40)
    stage = ScoringStage(load_settings(None), _model(features, "v1"))
    items = list(features.item_ids[:5])
    clicks = [Click(u, items[u % 5], 1.0) for u in range(100)]
    stage._apply_clicks(clicks, [0] * len(clicks))
    stage.users.fresh[:] = True  # as the click path leaves them
    stage.swap_model(_model(features, "v2", seed=5))
    live = stage.users.user_of >= 0
    fresh_after = []
    for _ in range(4):
        stage.refresh_stale()
        fresh_after.append(int(stage.users.fresh[live].sum()))
    assert fresh_after == [40, 80, 100, 100]
    st = stage.users.get(3)
    np.testing.assert_allclose(stage.users.vecs[st.slot],
                               stage._embed([st], [st.profile])[0], rtol=1e-5)


def test_the_table_serves_only_centroids_of_the_serving_version():
    from engine.centroid_table import CentroidTable

    table = CentroidTable(K, 16, min_seeds=1)
    rng = np.random.default_rng(0)
    for item, version in [(1, "v1"), (2, "v2"), (3, ""), (4, "v1")]:
        table.upsert(item, ItemCentroids(rng.normal(size=(K, 16)).astype(np.float32),
                                         np.ones(K, np.float32), 3, 1.0, 1.0, version))
    table.serve_version("v1")
    table.refresh(lambda c, n: c.mean(1))
    served = {int(table.item_ids[s]) for s in table.live_slots()}
    assert served == {1, 3, 4}  # "": a record that names no version serves with any
    found = table.search(rng.normal(size=(2, 16)).astype(np.float32), 10)
    assert {int(table.item_ids[s]) for s in found.ravel() if s >= 0} <= served
    assert table.coverage("v1") == 2 and table.coverage("v2") == 1
    table.serve_version("v2")
    table.refresh(lambda c, n: c.mean(1))
    assert {int(table.item_ids[s]) for s in table.live_slots()} == {2, 3}


def test_a_reloaded_model_serves_its_own_centroids_once_they_cover_the_items(
        settings, features, tmp_path):
    """One model version per score, on the embedded broker. Serving v1, a worker
    recommends only items whose centroids are v1's, in the RALM path and in the
    default blend; v2 loaded, v1 goes on serving until v2's centroids cover
    ``reload_min_coverage`` of what v1 covered; then only v2's items are served."""
    models = tmp_path / "models"
    models.mkdir()
    s = settings.model_copy(update={"scoring": settings.scoring.model_copy(update={
        "min_seeds": 1, "reload_check_s": 0.0, "model_dirs": [models],
        "reload_min_coverage": 0.9})})
    v2_path = _save(_model(features, "v2", seed=3), models / "v2.pt")
    stage = ScoringStage(s, _model(features, "v1"))
    w = start_worker(stage)
    rng = np.random.default_rng(2)
    items = [int(i) for i in features.item_ids[:40]]

    def centroids(group: list[int], version: str) -> None:
        produce(s, "seed-centroids", [(key_of(i), encode_centroids(ItemCentroids(
            rng.normal(size=(K, 16)).astype(np.float32), np.ones(K, np.float32), 3, 1.0, 1.0,
            version))) for i in group])

    def recommended(tag: str, pipeline: str) -> tuple[set[int], str]:
        produce(s, "score-requests", [(key_of(u), encode_json(
            {"user_id": u, "request_id": f"{tag}-{u}", "k": 5, "pipeline": pipeline}))
            for u in range(6)])
        recs = [r for r in json_values(read_all(s, "recommendations", timeout_s=10))
                if r["request_id"].startswith(f"{tag}-")]
        assert len(recs) == 6
        return {i["item_id"] for r in recs for i in r["items"]}, recs[0]["model_version"]

    try:
        wait_until(lambda: w.loop.ready.is_set(), what="scoring worker ready")
        centroids(items[:20], "v1")
        centroids(items[20:30], "v2")
        wait_until(lambda: len(stage.table.versions) == 30, what="centroids at the scorer")
        for pipeline in ("ralm", "default"):
            got, version = recommended(f"a-{pipeline}", pipeline)
            assert got and got <= set(items[:20]) and version == "v1", pipeline
        produce(s, "models", [(b"ralm", encode_json(
            {"kind": "ralm", "path": str(v2_path), "version": "v2"}))])
        wait_until(lambda: stage.pending is not None, what="v2 loaded, pending")
        got, version = recommended("b", "ralm")  # 10 of 20 covered: v1 still serves
        assert got <= set(items[:20]) and version == "v1"
        centroids(items[30:40], "v2")  # 20 of v1's 20 covered now
        wait_until(lambda: stage.model.version == "v2", what="v2 serving")
        for pipeline in ("ralm", "default"):
            got, version = recommended(f"c-{pipeline}", pipeline)
            assert got and got <= set(items[20:40]) and version == "v2", pipeline
        assert total(scrape(w.metrics_url), "lookalike_model_swap_wait_seconds") > 0
    finally:
        w.stop()


@pytest.mark.slow
def test_a_swap_moves_every_window_to_the_new_version_in_seconds(settings, ml100k, tmp_path):
    """The whole path on the embedded broker: scoring and clustering workers serve v1's
    centroids of 2,000 real clicks; v2 is announced. The scoring worker re-sends its
    users' seeds with v2, the clustering worker (told the current version by the
    ``models`` topic) moves each window to v2, and v2 serves once its centroids cover
    what v1 covered: measured here, and well inside ``reload_max_wait_s``."""
    from consumers.clustering import ClusteringStage
    from consumers.replay import replay
    from models.train_ralm import train_ralm

    path = train_ralm(ml100k.time_split(0.8)[0], RalmConfig.tiny(
        user_epochs=1, lookalike_epochs=1, episode_steps=5), tmp_path / "ckpt",
        progress=False, log=lambda *_: None)
    v1 = RalmModel.load(path)
    models = tmp_path / "models"
    models.mkdir()
    v2 = RalmModel.load(path)
    v2.version = "ralm-29991231T000000-newer"
    with torch.no_grad():
        for p in v2.user_tower.parameters():
            p.add_(0.01 * torch.randn_like(p))
    v2_path = _save(v2, models / "v2.pt")
    s = settings.model_copy(update={
        "window": settings.window.model_copy(update={"k": v1.k, "publish_interval_s": 0.2}),
        "scoring": settings.scoring.model_copy(update={
            "min_seeds": 1, "reload_check_s": 0.0, "model_dirs": [models]})})
    scoring, clustering = ScoringStage(s, v1), ClusteringStage(s)
    workers = [start_worker(scoring), start_worker(clustering)]
    try:
        wait_until(lambda: all(w.loop.ready.is_set() for w in workers), what="workers ready")
        replay(ml100k, s.kafka, limit=2000, progress=False)
        n_items = len(set(ml100k.item[:2000].tolist()))
        wait_until(lambda: scoring.table.coverage(v1.version) == n_items, timeout_s=90,
                   what="v1's centroids of every clicked item at the scorer")
        produce(s, "models", [(b"ralm", encode_json(
            {"kind": "ralm", "path": str(v2_path), "version": v2.version}))])
        wait_until(lambda: scoring.model.version == v2.version, timeout_s=120,
                   what="v2 serving")
        took = scoring.swap_coverage_s
        assert took is not None and took < s.scoring.reload_max_wait_s  # covered, not timed out
        assert scoring.table.coverage(v2.version) >= 0.95 * n_items
        live = scoring.table.live_slots()
        assert {scoring.table.versions[int(x)] for x in live} == {v2.version}
        print(f"swap to v2 served after {took:.2f} s ({n_items} items)")
    finally:
        for w in workers:
            w.stop()
