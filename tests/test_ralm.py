"""RALM: the math pinned by hand, the sampler, training, determinism, checkpoints, serving."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.config import WindowConfig
from engine.data import Dataset
from engine.synthetic import SyntheticSpec, generate
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.evaluate_lookalike import auc, evaluate_lookalike
from models.features import ClickLog, FeatureSpace, Profile
from models.ralm import AttentionMerge, ItemSoftmax, RalmConfig, RalmModel, UserTower
from models.train_ralm import (
    LATEST,
    LogUniformSampler,
    LookalikeData,
    SeedClusters,
    fit_ralm,
    item_seeds,
    latest_checkpoint,
    train_ralm,
    validation_split,
)

SPEC = SyntheticSpec(n_users=240, n_items=60, n_clusters=4, clicks_per_user=12.0, seed=3)
CFG = RalmConfig.tiny()


@pytest.fixture(scope="module")
def data() -> tuple[Dataset, Dataset]:
    """Planted-cluster clicks, split in time (train, test)."""
    return generate(SPEC).time_split(0.8)


@pytest.fixture(scope="module")
def trained(data: tuple[Dataset, Dataset], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_ralm(data[0], CFG, tmp_path_factory.mktemp("ckpt"), progress=False,
                      log=lambda _: None)


@pytest.fixture(scope="module")
def model(trained: Path) -> RalmModel:
    return RalmModel.load(trained)


def _lookalike_data(train: Dataset, cfg: RalmConfig) -> LookalikeData:
    """Stage-2 data over an untrained user tower: enough to check the examples."""
    features = FeatureSpace.build(train, cfg.history_len)
    return LookalikeData(UserTower(features, cfg), ClickLog(train, features), train, cfg)


def _softmax(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    e = np.where(mask, np.exp(x - x[mask].max()), 0.0)
    return e / e.sum()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _reference_score(model: RalmModel, u: np.ndarray, cent: np.ndarray,
                     counts: np.ndarray) -> float:
    """The paper's formulas for one user and one item, in plain numpy from the module's weights."""
    la = model.lookalike
    w_l = la.local_w.weight.detach().numpy().T  # E_u W_l
    w_g = la.global_proj.weight.detach().numpy()  # W_g: g×h
    v_g = la.global_w.weight.detach().numpy()[0]  # w_g
    mask = counts > 0
    local = _softmax(np.tanh(u @ w_l @ cent.T), mask) @ cent
    glob = _softmax(np.tanh(cent @ w_g.T) @ v_g, mask) @ cent
    return 0.3 * _cos(u, glob) + 0.7 * _cos(u, local)


# ---------------------------------------------------------------- math by hand


def test_attention_merge_by_hand() -> None:
    merge = AttentionMerge(m=2, a=2)
    with torch.no_grad():
        merge.w1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # H W1 with W1 = diag(1, 2)
        merge.w2.weight.copy_(torch.tensor([[1.0, -1.0]]))
    h = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # n = 3 fields, m = 2
    u = np.tanh(h @ np.diag([1.0, 2.0]))
    logits = u @ np.array([1.0, -1.0])
    weights = np.exp(logits) / np.exp(logits).sum()
    expected = weights @ h
    got_w = merge.weights(torch.tensor(h[None], dtype=torch.float32))[0].detach().numpy()
    got = merge(torch.tensor(h[None], dtype=torch.float32))[0].detach().numpy()
    np.testing.assert_allclose(got_w, weights, atol=1e-6)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def _random_model(seed: int = 0) -> RalmModel:
    torch.manual_seed(seed)
    ds = generate(SyntheticSpec(n_users=30, n_items=12, n_clusters=2, seed=seed))
    return RalmModel.new(RalmConfig.tiny(), FeatureSpace.build(ds, history_len=5))


def test_score_matches_the_formulas() -> None:
    model = _random_model()
    rng = np.random.default_rng(0)
    b, c, k, h = 3, 5, model.k, model.dim
    users = rng.normal(size=(b, h)).astype(np.float32)
    cent = rng.normal(size=(b, c, k, h)).astype(np.float32)
    counts = rng.integers(0, 3, size=(b, c, k)).astype(np.float32)
    counts[..., 0] = 1  # at least one used slot per item
    got = model.score(users, cent, counts)
    assert got.shape == (b, c) and got.dtype == np.float32
    for i in range(b):
        for j in range(c):
            ref = _reference_score(model, users[i], cent[i, j], counts[i, j])
            assert got[i, j] == pytest.approx(ref, abs=1e-5)
    # precomputed global embeddings give the same; so does the one-user form
    glob = model.item_global(cent.reshape(b * c, k, h), counts.reshape(b * c, k))
    np.testing.assert_allclose(np.linalg.norm(glob, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(model.score(users, cent, counts, glob.reshape(b, c, h)), got,
                               atol=1e-6)
    np.testing.assert_allclose(model.score_user(users[1], cent[1], counts[1]), got[1], atol=1e-6)


def test_empty_centroids_get_no_weight() -> None:
    model = _random_model(1)
    rng = np.random.default_rng(1)
    k, h = model.k, model.dim
    user = rng.normal(size=h).astype(np.float32)
    cent = rng.normal(size=(2, k, h)).astype(np.float32)
    counts = np.ones((2, k), np.float32)
    counts[:, k // 2:] = 0
    before = model.score_user(user, cent, counts)
    cent[:, k // 2:] = rng.normal(scale=100.0, size=(2, k - k // 2, h))  # junk in empty slots
    np.testing.assert_allclose(model.score_user(user, cent, counts), before, atol=1e-6)
    # the same as if the item had only its used slots
    only_used = _reference_score(model, user, cent[0, : k // 2], counts[0, : k // 2])
    assert before[0] == pytest.approx(only_used, abs=1e-5)
    # an item with no seeds at all scores 0, never NaN
    counts[1] = 0
    assert model.score_user(user, cent, counts)[1] == 0.0
    assert np.all(model.item_global(cent, counts)[1] == 0.0)


def test_item_softmax_dot_and_cosine_logits() -> None:
    torch.manual_seed(0)
    users, items = torch.randn(3, 4), torch.tensor([[1, 2], [3, 1], [2, 2]])
    for scale in (None, 5.0):
        out = ItemSoftmax(n_items=3, m=4, scale=scale)
        with torch.no_grad():
            out.bias.weight.copy_(torch.arange(4.0)[:, None])
        e = out.weight.weight.detach()[items]  # [3, 2, 4]
        b = torch.arange(4.0)[items]
        if scale is None:  # u·e_j + b_j
            want = (e * users[:, None]).sum(-1) + b
        else:  # scale·cos(u, e_j) + b_j
            want = scale * F.cosine_similarity(e, users[:, None], dim=-1) + b
        torch.testing.assert_close(out(users, items).detach(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- sampling


def test_log_uniform_sampler_frequencies() -> None:
    d, n = 30, 300_000
    sampler = LogUniformSampler(d, np.random.default_rng(0))
    p = sampler.probs()
    assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) < 0)
    assert p[0] == pytest.approx(np.log(2) / np.log(d + 1))
    draws = sampler.sample((n,))
    assert draws.min() >= 0 and draws.max() < d
    observed = np.bincount(draws, minlength=d)
    chi2 = float(((observed - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 58.3, chi2  # 99.9% quantile of chi-square with 29 degrees of freedom
    np.testing.assert_allclose(np.exp(sampler.log_prob(np.arange(d))), p, rtol=1e-12)


@pytest.mark.parametrize("sampling", ["uniform", "popularity", "mixed"])
def test_lookalike_negatives(data: tuple[Dataset, Dataset], sampling: str) -> None:
    """Stage-2 negatives are seeded items, never clicked by their user, drawn as configured."""
    train = data[0]
    cfg = RalmConfig.tiny(lookalike_sampling=sampling)
    la = _lookalike_data(train, cfg)
    users, items, labels = la.examples(4, np.random.default_rng(0))
    neg = labels == 0
    assert neg.sum() == 4 * (labels == 1).sum()
    assert np.isin(items[neg], la.seeded).all()
    codes = users[neg].astype(np.int64) * la.n_items + items[neg]
    assert not np.isin(codes, la.clicked).any()
    n = 200_000
    draws = la.negatives(n, np.random.default_rng(1))
    freq = np.bincount(np.searchsorted(la.seeded, draws), minlength=len(la.seeded)) / n
    uniform = np.full(len(la.seeded), 1.0 / len(la.seeded))
    want = {"uniform": uniform, "popularity": la.popularity,
            "mixed": 0.5 * (uniform + la.popularity)}[sampling]
    np.testing.assert_allclose(freq, want, atol=0.01)


def test_user_side_negatives_keep_the_item_and_change_the_user(
        data: tuple[Dataset, Dataset]) -> None:
    """The paper's contrast: an item's clickers against users who never clicked it."""
    train = data[0]
    cfg = RalmConfig.tiny(lookalike_negative_side="user")
    la = _lookalike_data(train, cfg)
    queries, items, labels = la.examples(3, np.random.default_rng(0))
    pos, neg = labels == 1, labels == 0
    np.testing.assert_array_equal(items[neg], np.repeat(items[pos], 3))
    codes = la.query_user[queries[neg]].astype(np.int64) * la.n_items + items[neg]
    assert not np.isin(codes, la.clicked).any()
    assert len(np.unique(queries[neg])) > len(np.unique(queries[pos])) // 2  # spread over users


@pytest.mark.parametrize("sampling", ["activity", "mixed"])
def test_user_negatives_by_activity_favour_active_users(
        data: tuple[Dataset, Dataset], sampling: str) -> None:
    """Activity-weighted user negatives come from busier users than uniform ones, and
    never from the positive's clickers."""
    train = data[0]
    activity = np.bincount(train.user, minlength=len(train.users.ids)).astype(float)
    drawn = {}
    for s in ("uniform", sampling):
        cfg = RalmConfig.tiny(lookalike_negative_side="user", lookalike_user_sampling=s)
        la = _lookalike_data(train, cfg)
        queries, items, labels = la.examples(3, np.random.default_rng(0))
        neg = labels == 0
        codes = la.query_user[queries[neg]].astype(np.int64) * la.n_items + items[neg]
        assert not np.isin(codes, la.clicked).any()
        drawn[s] = activity[la.query_user[queries[neg]]].mean()
    a = activity[la.query_user]
    weighted = (a * (a + 1)).sum() / (a + 1).sum()  # size-biased: clicks + 1
    want = weighted if sampling == "activity" else (weighted + a.mean()) / 2
    assert want > a.mean() + 0.3
    assert drawn[sampling] == pytest.approx(want, rel=0.02)
    assert drawn["uniform"] == pytest.approx(a.mean(), rel=0.02)


def test_seed_centroids_leave_the_scored_user_out() -> None:
    """With ``exclude``, a row's centroids are the means of its item's other seeds."""
    clusters = SeedClusters(np.array([0, 1, 2, 3, 1, 4]), np.array([0, 0, 0, 0, 1, 1]),
                            np.arange(6.0), n_items=2, n_users=5, window=WindowConfig(k=2))
    z = torch.arange(10, dtype=torch.float32).view(5, 2)
    clusters.recluster(z.numpy())
    assert clusters.users.tolist() == [0, 1, 2, 3, 1, 4]  # each item's window, oldest first
    clusters.slots[:] = [0, 0, 1, 1, 0, 1]  # item 0: {0,1} {2,3}; item 1: {1} {4}
    cent, mask = clusters.centroids(z, np.array([0, 0, 1]), exclude=np.array([1, 4, 1]))
    np.testing.assert_allclose(cent[0].numpy(), [z[0].numpy(), (z[2] + z[3]).numpy() / 2])
    np.testing.assert_allclose(cent[1].numpy(), [(z[0] + z[1]).numpy() / 2,
                                                 (z[2] + z[3]).numpy() / 2])
    # user 1 was all of item 1's slot 0
    assert mask.tolist() == [[True, True], [True, True], [False, True]]
    np.testing.assert_allclose(cent[2, 1].numpy(), z[4].numpy())


def test_leave_out_examples_are_every_click_before_it_happened(
        data: tuple[Dataset, Dataset]) -> None:
    """Positives are all training clicks on items with another seed; queries are pre-click users."""
    train = data[0]
    cfg = RalmConfig.tiny(lookalike_examples="leave_out")
    features = FeatureSpace.build(train, cfg.history_len)
    clicks = ClickLog(train, features)
    tower = UserTower(features, cfg).eval()
    la = LookalikeData(tower, clicks, train, cfg)
    seeds = item_seeds(train.user, train.item, train.ts, la.n_items, cfg.max_seeds)
    multi = np.array([len(s) > 1 for s in seeds])
    assert la.n_positives == int(multi[train.item].sum())
    assert (la.query_user[la.pos_query] == clicks.user[la.pos_query]).all()
    assert (la.pos_item == clicks.dense_item[la.pos_query]).all()
    first = clicks.indptr[:-1][np.diff(clicks.indptr) > 0][:3]  # first clicks: no history yet
    batch = clicks.encode(clicks.user[first], first)
    assert (batch.items == 0).all()
    with torch.no_grad():
        np.testing.assert_allclose(la.queries[first].numpy(), tower(batch).numpy(), atol=1e-6)


def test_validation_split_stays_inside_the_training_period(ml_like: Dataset) -> None:
    train, test = ml_like.time_split(0.8)
    fit, valid = validation_split(train)
    assert len(fit) + len(valid) == len(train)
    assert fit.ts.max() <= valid.ts.min() and valid.ts.max() <= test.ts.min()
    assert len(valid) == pytest.approx(0.2 * len(train), abs=0.02 * len(train))


@pytest.fixture(scope="module")
def ml_like() -> Dataset:
    return generate(SPEC)


# ---------------------------------------------------------------- training


def test_losses_go_down_in_both_stages(model: RalmModel) -> None:
    user_loss, la_loss = model.metrics["user_tower_loss"], model.metrics["lookalike_loss"]
    assert user_loss[-1] < user_loss[0]
    assert la_loss[-1] < la_loss[0]


def test_training_is_deterministic(data: tuple[Dataset, Dataset], model: RalmModel) -> None:
    again = fit_ralm(data[0], CFG, progress=False, log=lambda _: None)
    for mine, theirs in ((model.user_tower, again.user_tower), (model.lookalike, again.lookalike)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.version.rsplit("-", 1)[1] == model.version.rsplit("-", 1)[1]  # weights hash


def test_trained_model_beats_chance(model: RalmModel, data: tuple[Dataset, Dataset]) -> None:
    """On planted clusters the look-alike ranking is clearly better than random."""
    report = evaluate_lookalike(model, *data, k_list=(5,))
    assert report["user_auc"] > 0.6, report
    assert set(report) >= {"prec@5", "auc", "pop_prec@5", "pop_auc", "audience_auc"}


def test_trained_model_beats_popularity(model: RalmModel,
                                        data: tuple[Dataset, Dataset]) -> None:
    """Held-out clicks of planted-cluster users: the look-alike ranking beats popularity.

    (On ml-100k it does not: see ``test_ml100k_full_training_beats_chance``.)
    """
    report = evaluate_lookalike(model, *data, k_list=(5,))
    assert report["prec@5"] > report["pop_prec@5"] + 0.05, report
    assert report["auc"] > report["pop_auc"], report


# ---------------------------------------------------------------- serving


def test_unseen_user_gets_a_finite_embedding(model: RalmModel) -> None:
    emb = model.embed_users(
        [Profile(age=None, gender="?", occupation="astronaut", zip_code="XXXXX"), None],
        [[10**12, -5], []],
    )
    assert emb.shape == (2, model.dim) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert model.embed_users([], []).shape == (0, model.dim)


def test_embed_users_matches_training_encoding(model: RalmModel,
                                               data: tuple[Dataset, Dataset]) -> None:
    train = data[0]
    u = int(train.user[0])
    items = train.items.ids[train.item[train.user == u]].tolist()
    users = train.users
    profile = Profile(age=float(users.age[u]), gender=users.gender[u],
                      occupation=users.occupation[u], zip_code=users.zip_code[u])
    one = model.embed_users([profile], [items])
    batch = model.embed_users([profile, Profile()], [items, [1, 2]])
    np.testing.assert_allclose(batch[:1], one, atol=1e-6)


@pytest.mark.parametrize(("merge", "transform"),
                         [("attention", "relu"), ("concat", "relu"), ("attention", "linear")])
def test_numpy_towers_equal_the_torch_towers(data: tuple[Dataset, Dataset], merge: str,
                                             transform: str) -> None:
    """The serving copy (models/ralm_serving.py) against torch, and it follows weight updates."""
    train = data[0]
    cfg = CFG.model_copy(update={"merge": merge, "transform": transform})
    torch.manual_seed(0)
    model = RalmModel.new(cfg, FeatureSpace.build(train, cfg.history_len))
    with torch.no_grad():  # a padding row that is not zero must still count for nothing
        model.user_tower.fields.items.weight[0] = 5.0
    ids = train.items.ids.tolist()
    profiles = [Profile(age=30.0, gender="F", occupation="writer", zip_code="02139"), None,
                Profile(age=None, gender="?")]
    batch = model.features.encode(profiles, [ids[:7], [], ids[3:40] + [10**12]])

    def reference() -> np.ndarray:
        with torch.no_grad():
            return model.lookalike.transform(model.user_tower(batch)).numpy()

    assert len(batch) <= model.numpy_max_batch  # so embed_batch takes the numpy path
    np.testing.assert_allclose(model.embed_batch(batch), reference(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # as an optimiser step would: the copy must notice
        model.lookalike.transform[0].weight.mul_(-1.0)
    np.testing.assert_allclose(model.embed_batch(batch), reference(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("merge", "transform"),
                         [("attention", "relu"), ("concat", "relu"), ("attention", "linear")])
def test_the_serving_tower_on_history_rows_equals_the_torch_towers(
        data: tuple[Dataset, Dataset], merge: str, transform: str) -> None:
    """``embed_rows`` (pooled by a compiled pass, pre-multiplied weights) against torch
    on a few hundred users, each history's rows shuffled (the ring's order is not the
    history's), unknown items and empty histories among them."""
    train = data[0]
    cfg = CFG.model_copy(update={"merge": merge, "transform": transform})
    torch.manual_seed(1)
    model = RalmModel.new(cfg, FeatureSpace.build(train, cfg.history_len))
    rng = np.random.default_rng(0)
    ids = train.items.ids
    fs = model.features
    histories = [rng.choice(ids, rng.integers(0, 2 * cfg.history_len)).tolist() + [10**12]
                 if u % 7 else [] for u in range(300)]
    profiles = [Profile(age=float(20 + u % 50), gender="F" if u % 2 else "M") if u % 3 else None
                for u in range(300)]
    batch = fs.encode(profiles, histories)
    with torch.no_grad():
        want = model.lookalike.transform(model.user_tower(batch)).numpy()
    rows = np.zeros((300, cfg.history_len), np.int32)
    for u, h in enumerate(histories):
        tail = fs.catalog_rows(np.array(h[-cfg.history_len:], np.int64))
        rows[u, :len(tail)] = rng.permutation(tail)
    got = model.embed_rows(batch.categorical.numpy(), batch.continuous.numpy(), rows)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_scoring_is_fast() -> None:
    """1 user × 500 candidates × 20 centroids × 128-d, global embeddings precomputed."""
    torch.set_num_threads(1)
    ds = generate(SyntheticSpec(n_users=30, n_items=12, n_clusters=2))
    model = RalmModel.new(RalmConfig(), FeatureSpace.build(ds))
    rng = np.random.default_rng(0)
    cent = rng.random((500, 20, 128), dtype=np.float32)
    counts = np.ones((500, 20), np.float32)
    user = rng.random(128, dtype=np.float32)
    glob = model.item_global(cent, counts)
    model.score_user(user, cent, counts, glob)
    t = time.perf_counter()
    for _ in range(20):
        model.score_user(user, cent, counts, glob)
    per_call = (time.perf_counter() - t) / 20
    assert per_call < 0.02, f"{per_call * 1e3:.2f} ms"  # ~1 ms here; generous for shared CI


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_scores(model: RalmModel, trained: Path,
                                                      tmp_path: Path) -> None:
    again = RalmModel.load(model.save(tmp_path / "copy.pt"))
    assert again.version == model.version and again.features == model.features
    profiles = [Profile(age=30, gender="F", occupation="writer", zip_code="55105")]
    histories = [[1, 2, 3, 4]]
    a, b = model.embed_users(profiles, histories), again.embed_users(profiles, histories)
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    cent = rng.random((1, 7, model.k, model.dim), dtype=np.float32)
    counts = np.ones((1, 7, model.k), np.float32)
    np.testing.assert_array_equal(model.score(a, cent, counts), again.score(b, cent, counts))


def test_latest_pointer(trained: Path) -> None:
    assert (trained.parent / LATEST).read_text().strip() == trained.name
    assert latest_checkpoint(trained.parent) == trained
    assert trained.name.startswith("ralm-") and len(trained.stem.rsplit("-", 1)[1]) == 8


def test_latest_checkpoint_without_pointer(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for name in ("ralm-20240101T000000-aaaaaaaa.pt", "ralm-20250101T000000-bbbbbbbb.pt"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "ralm-20250101T000000-bbbbbbbb.pt"


class Evil:
    """A class a weights-only load must refuse to construct."""

    def __reduce__(self):  # pragma: no cover - never called by a safe load
        return (print, ("pwned",))


@pytest.mark.parametrize("case", ["missing", "garbage", "empty", "pickle", "custom_class"])
def test_bad_files_raise_checkpoint_error(case: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    if case == "garbage":
        path.write_bytes(b"\x00not a checkpoint\xff" * 10)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "pickle":
        path.write_bytes(pickle.dumps({"format": 1}, protocol=2))
    elif case == "custom_class":
        torch.save({"format": 1, "kind": "ralm", "version": "x", "evil": Evil()}, path)
    with pytest.raises(CheckpointError) as err:
        RalmModel.load(path)
    if case == "custom_class":
        assert "weights-only" in str(err.value)


def test_checkpoint_header_checks(model: RalmModel, tmp_path: Path) -> None:
    good = model.payload()
    for change, message in (
        ({"kind": "sasrec"}, "expected 'ralm'"),
        ({"format": 2}, "format 2"),
    ):
        path = save_checkpoint(tmp_path / "c.pt", good | change)
        with pytest.raises(CheckpointError, match=message):
            RalmModel.load(path)
    partial = {k: v for k, v in good.items() if k != "lookalike_tower"}
    path = save_checkpoint(tmp_path / "p.pt", partial)
    with pytest.raises(CheckpointError, match="lacks"):
        RalmModel.load(path)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x.pt", {"kind": "ralm"})


def test_checkpoint_write_is_atomic(model: RalmModel, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = model.save(tmp_path / "m.pt")
    before = path.read_bytes()

    def boom(*_a: object, **_k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


# ---------------------------------------------------------------- evaluation helpers


def test_auc_and_seeds_helpers() -> None:
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    assert np.isnan(auc(np.array([1.0]), np.array([1])))
    user = np.array([0, 1, 0, 2, 1])
    item = np.array([0, 0, 0, 0, 1])
    ts = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    seeds = item_seeds(user, item, ts, n_items=3, max_seeds=2)
    assert seeds[0].tolist() == [0, 2]  # distinct, most recent two, newest last
    assert seeds[1].tolist() == [1] and seeds[2].tolist() == []


@pytest.mark.slow
def test_ml100k_full_training_beats_chance(ml100k: Dataset, tmp_path: Path) -> None:
    """Default settings on the ml-100k time split (mostly new users, profile only): each
    user's ranking is better than chance. The defaults are chosen for cold-item audiences
    (tests/test_audience_expansion.py); on this split popularity leads (docs/ralm.md)."""
    train, test = ml100k.time_split(0.8)
    path = train_ralm(train, RalmConfig(), tmp_path, progress=False, log=lambda _: None)
    report = evaluate_lookalike(RalmModel.load(path), train, test)
    assert report["user_auc"] > 0.6, report


def test_negatives_on_both_sides_change_either_the_item_or_the_user(
        data: tuple[Dataset, Dataset]) -> None:
    """``lookalike_negative_side="both"``: each negative keeps the query or the item of its
    positive, about half each, and none is a click."""
    train = data[0]
    cfg = RalmConfig.tiny(lookalike_negative_side="both")
    la = _lookalike_data(train, cfg)
    queries, items, labels = la.examples(4, np.random.default_rng(0))
    pos, neg = labels == 1, labels == 0
    same_item = items[neg] == np.repeat(items[pos], 4)
    same_query = queries[neg] == np.repeat(queries[pos], 4)
    assert (same_item | same_query).all()
    assert 0.4 < same_query[~same_item].size / neg.sum() < 0.6
    codes = la.query_user[queries[neg]].astype(np.int64) * la.n_items + items[neg]
    assert not np.isin(codes, la.clicked).any()
