"""A CTR checkpoint ranks serving candidates from ids and a profile alone: the feature
rows it builds equal the training frames', and its scores equal the model's on them."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data import Dataset
from models.checkpoint import CheckpointError
from models.ctr_data import build_ctr_data
from models.ctr_ranker import CTRRanker
from models.ctr_train import build_model, predict, save_ctr


def _profile(ds: Dataset, u: int) -> dict[str, object]:
    users = ds.users
    age = float(users.age[u])
    return {"age": None if np.isnan(age) else age, "gender": users.gender[u],
            "occupation": users.occupation[u], "zip_code": users.zip_code[u]}


@pytest.mark.parametrize(("protocol", "buckets"), [("time", None), ("ctx", None),
                                                   ("time", 64)])
def test_feature_rows_equal_the_training_frames(ml100k: Dataset, protocol: str,
                                                buckets: int | None) -> None:
    """Train and test rows alike (test rows hold users the time split never trained on)."""
    data = build_ctr_data(ml100k, protocol, seed=0, hash_buckets=buckets)
    table = data.features
    assert table is not None
    rng = np.random.default_rng(0)
    for frame in (data.train, data.test):
        for r in rng.choice(len(frame), 40, replace=False):
            row = frame.rows[r]
            u, i = ml100k.user[row], ml100k.item[row]
            sparse, genres, dense = table.rows(int(ml100k.users.ids[u]), _profile(ml100k, u),
                                               np.array([ml100k.items.ids[i]]))
            np.testing.assert_array_equal(sparse[0], frame.sparse[r])
            np.testing.assert_array_equal(genres[0], frame.genres[r])
            np.testing.assert_allclose(dense[0], frame.dense[r], rtol=1e-6, atol=1e-6)


def test_unknown_items_and_users_get_the_unknown_codes(ml100k: Dataset) -> None:
    table = build_ctr_data(ml100k, "time", seed=0).features
    assert table is not None
    sparse, genres, dense = table.rows(10**9, None, np.array([10**9]))
    assert (sparse == 0).all() and (genres == 0).all()
    # no age: the training mean (standardised 0); no training rows: log1p(0) = 0
    want = [0.0, -table.mean[1] / table.std[1], -table.mean[2] / table.std[2]]
    np.testing.assert_allclose(dense[0], want, rtol=1e-6, atol=1e-6)


def test_ranker_scores_equal_the_model_on_the_frame(ml100k: Dataset, tmp_path) -> None:
    data = build_ctr_data(ml100k, "ctx", seed=0)
    model = build_model("dlrm", data, seed=0)  # untrained weights: the plumbing is the test
    model.eval()
    path = save_ctr(tmp_path / "dlrm.pt", "dlrm", model, data, {})
    ranker = CTRRanker(path)
    frame = data.test.take(np.flatnonzero(ml100k.user[data.test.rows]
                                          == ml100k.user[data.test.rows[0]]))
    u = int(ml100k.user[frame.rows[0]])
    items = ml100k.items.ids[ml100k.item[frame.rows]]
    got = ranker.score(int(ml100k.users.ids[u]), _profile(ml100k, u), items)
    want = predict(model, frame)
    np.testing.assert_allclose(1 / (1 + np.exp(-got)), want, rtol=1e-5, atol=1e-6)
    assert ranker.score(1, None, []).shape == (0,)


def test_a_checkpoint_without_features_is_refused(ml100k: Dataset, tmp_path) -> None:
    data = build_ctr_data(ml100k, "ctx", seed=0)
    old = type(data)(**{**{f: getattr(data, f) for f in data.__dataclass_fields__},
                        "features": None})
    path = save_ctr(tmp_path / "old.pt", "fm", build_model("fm", old, seed=0), old, {})
    with pytest.raises(CheckpointError, match="no feature table"):
        CTRRanker(path)
