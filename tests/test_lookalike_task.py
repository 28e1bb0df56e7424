"""The look-alike task: baselines, RALM variants by hand, the protocol helpers, the harness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine.data import Dataset
from engine.synthetic import SyntheticSpec, generate
from lookalike.cli import app
from lookalike.experiments.lookalike_task import (
    MAIN_ROWS,
    METRICS,
    _bucket_of,
    ablation_rows,
    bucket_labels,
    run_lookalike_task,
)
from models.baselines import (
    fit_item_lr,
    popularity_scores,
    ralm_parts,
    seed_mean_scores,
    tune_item_lr,
    universal_embeddings,
    user_feature_matrix,
    youtube_scores,
)
from models.evaluate_lookalike import (
    Protocol,
    audience_per_item,
    evaluate_lookalike,
    protocol_metrics,
    user_view,
)
from models.features import FeatureSpace
from models.ralm import RalmConfig, RalmModel
from models.train_ralm import fit_ralm

SPEC = SyntheticSpec(n_users=240, n_items=60, n_clusters=4, clicks_per_user=12.0, seed=3)


@pytest.fixture(scope="module")
def split() -> tuple[Dataset, Dataset]:
    return generate(SPEC).time_split(0.8)


@pytest.fixture(scope="module")
def proto(split: tuple[Dataset, Dataset]) -> Protocol:
    return Protocol.build(*split, max_seeds=32)


def _hand_protocol(seeds: list[list[int]], seen: list[list[bool]],
                   clicked: list[list[bool]], users: list[int]) -> Protocol:
    """A Protocol without datasets: enough for the scorers and views that do not read them."""
    return Protocol(train=None, test=None, users=np.array(users),  # type: ignore[arg-type]
                    candidates=np.arange(len(seeds)), seeds=[np.array(s) for s in seeds],
                    seen=np.array(seen), clicked=np.array(clicked))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _softmax(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    e = np.where(mask, np.exp(x - x[mask].max()), 0.0)
    return e / e.sum()


# ---------------------------------------------------------------- protocol helpers


def test_protocol_matches_evaluate_lookalike(split: tuple[Dataset, Dataset],
                                             proto: Protocol) -> None:
    """The refactored split gives evaluate_lookalike's popularity numbers exactly."""
    model = RalmModel.new(RalmConfig.tiny(), FeatureSpace.build(split[0], 10))
    report = evaluate_lookalike(model, *split, k_list=(5, 10))
    pop, active = popularity_scores(proto)
    mine = protocol_metrics(proto, pop, (5, 10), active)
    for key in ("prec@5", "prec@10", "auc", "user_auc"):
        assert mine[key] == pytest.approx(report[f"pop_{key}"])
    assert mine["audience_auc"] == pytest.approx(report["active_audience_auc"])
    assert report["candidates"] == len(proto.candidates)
    assert not (proto.seen & proto.clicked).any()


def test_views_by_hand() -> None:
    # 2 users × 3 items; user 0 saw item 2; clicks: user 0 -> item 1, user 1 -> items 0, 2
    seen = np.array([[False, False, True], [False, False, False]])
    clicked = np.array([[False, True, False], [True, False, True]])
    scores = np.array([[0.9, 0.5, 0.0], [0.2, 0.55, 0.6]])
    v = user_view("", scores, seen, clicked, (1, 2))
    # user 0 ranks items 0, 1: top-1 misses (0), top-2 hits 1/min(2, 1) = 1; AUC 0
    # user 1 ranks 2, 1, 0: top-1 hits (1), top-2 has one of 2: 1/2; AUC (0 + 1)/2
    assert v["prec@1"] == pytest.approx((0.0 + 1.0) / 2)
    assert v["prec@2"] == pytest.approx((1.0 + 0.5) / 2)
    assert v["user_auc"] == pytest.approx((0.0 + 0.5) / 2)
    # pooled: positives 0.5, 0.2, 0.6 against negatives 0.9, 0.55 -> 1 win of 6
    assert v["auc"] == pytest.approx(1 / 6)
    cols, precs = audience_per_item(scores, seen, clicked, 1)
    # item 0: users (0.9 no, 0.2 yes) -> 0; item 1: (0.5 yes, 0.55 no) -> 0;
    # item 2: only user 1 -> 1
    assert cols.tolist() == [0, 1, 2] and precs.tolist() == [0.0, 0.0, 1.0]


def test_seed_buckets() -> None:
    assert bucket_labels() == ["1", "2-4", "5-9", "10-19", "20-49", "50+"]
    assert _bucket_of(np.array([1, 2, 4, 5, 19, 20, 49, 50, 256])).tolist() == [
        0, 1, 1, 2, 3, 4, 4, 5, 5]


# ---------------------------------------------------------------- baselines


def test_lr_features_and_scores(split: tuple[Dataset, Dataset], proto: Protocol) -> None:
    train = split[0]
    x = user_feature_matrix(train)
    assert x.shape[0] == len(train.users.ids) and np.isfinite(x).all()
    m = fit_item_lr(train, epochs=1, x=x)
    s = m.scores(proto.users, proto.candidates)
    assert s.shape == proto.seen.shape and np.isfinite(s).all()
    u, i = proto.users[3], proto.candidates[5]
    assert s[3, 5] == pytest.approx(float(x[u] @ m.weight[i] + m.bias[i]), rel=1e-5)
    # trained on clicks vs non-clicks: clicked pairs score above the rest on the training data
    n_items = len(train.items.ids)
    pairs = np.unique(train.user * n_items + train.item)
    all_scores = m.scores(np.arange(len(train.users.ids)), np.arange(n_items))
    assert all_scores.ravel()[pairs].mean() > all_scores.mean()


def test_lr_tuning_uses_the_training_period_only(split: tuple[Dataset, Dataset]) -> None:
    model, info = tune_item_lr(split[0], (1e-3, 1e-1), epochs=1, max_seeds=32)
    assert info["chosen"] in (1e-3, 1e-1) and set(info["val"]) == {"0.001", "0.1"}
    assert model.weight.shape[0] == len(split[0].items.ids)


def test_youtube_scores_are_the_softmax_logits(split: tuple[Dataset, Dataset],
                                              proto: Protocol) -> None:
    """Score = the output layer's logit for (user, item) without the item bias."""
    cfg = RalmConfig.tiny(merge="concat", user_epochs=1, lookalike_epochs=0)
    model = fit_ralm(split[0], cfg, progress=False, log=lambda _: None)
    s = youtube_scores(model, proto)
    assert s.shape == proto.seen.shape
    u = universal_embeddings(model, split[0])
    assert u.shape == (len(split[0].users.ids), cfg.embed_dim)
    item = proto.candidates[2]
    row = model.features.item_index(split[0].items.ids[[item]])[0]
    assert row > 0
    out = model.user_tower.output
    with torch.no_grad():
        rows = torch.tensor([[row]])
        logit = out(torch.from_numpy(u[proto.users[1]][None]), rows) - out.bias(rows)[..., 0]
    assert s[1, 2] == pytest.approx(float(logit), rel=1e-5)
    if getattr(out, "scale", None) is None:  # plain dot-product softmax
        table = out.weight.weight.detach().numpy()
        assert s[1, 2] == pytest.approx(float(u[proto.users[1]] @ table[row]), rel=1e-5)


def test_seed_mean_by_hand() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 4.0]], np.float32)
    proto = _hand_protocol(seeds=[[0, 1], [0], [1, 2]], seen=[[False] * 3],
                           clicked=[[True] * 3], users=[3])
    s = seed_mean_scores(emb, proto)
    # item 0: mean (0.5, 0.5) -> cos((3,4),(1,1)) = 7/(5√2); item 1: (1,0) -> 3/5;
    # item 2: mean (0.5, 1) -> (1.5+4)/(5·√1.25)
    assert s.shape == (1, 3)
    assert s[0].tolist() == pytest.approx([7 / (5 * 2 ** 0.5), 0.6, 5.5 / (5 * 1.25 ** 0.5)])


def test_local_and_global_ablations_by_hand(split: tuple[Dataset, Dataset]) -> None:
    """combine(0, 1) = cos(E_u, E_local), combine(1, 0) = cos(E_u, E_global), (0.3, 0.7) = score."""
    cfg = RalmConfig.tiny()
    model = RalmModel.new(cfg, FeatureSpace.build(split[0], cfg.history_len))  # random weights
    rng = np.random.default_rng(0)
    h, k = cfg.dim, 3
    users = rng.normal(size=(2, h)).astype(np.float32)
    cent = rng.normal(size=(4, k, h)).astype(np.float32)
    counts = np.array([[2, 1, 0], [1, 1, 1], [3, 0, 0], [1, 2, 5]], np.float32)
    parts = ralm_parts(model, users, cent, counts)
    la = model.lookalike
    w_l = la.local_w.weight.detach().numpy().T
    w_g = la.global_proj.weight.detach().numpy()
    v_g = la.global_w.weight.detach().numpy()[0]
    for b, u in enumerate(users):
        for c in range(len(cent)):
            mask = counts[c] > 0
            local = _softmax(np.tanh(u @ w_l @ cent[c].T), mask) @ cent[c]
            glob = _softmax(np.tanh(cent[c] @ w_g.T) @ v_g, mask) @ cent[c]
            assert parts.combine(0, 1)[b, c] == pytest.approx(_cos(u, local), abs=1e-5)
            assert parts.combine(1, 0)[b, c] == pytest.approx(_cos(u, glob), abs=1e-5)
    full = np.stack([model.score_user(u, cent, counts) for u in users])
    np.testing.assert_allclose(parts.combine(cfg.alpha, cfg.beta), full, atol=1e-5)


# ---------------------------------------------------------------- the harness


def test_harness_quick_writes_every_output(tmp_path: Path) -> None:
    ds = generate(SPEC)
    cfg = RalmConfig.tiny(user_epochs=2, lookalike_epochs=1)
    result = run_lookalike_task(ds, seeds=(0, 1, 2), quick=True, out_dir=tmp_path,
                                progress=False, config=cfg, k_values=(2, 4))
    files = {p.name for p in tmp_path.iterdir()}
    assert {"lookalike-task.json", "lookalike-task.md", "prec-vs-k.png",
            "audience-by-seeds.png"} <= files
    for png in ("prec-vs-k.png", "audience-by-seeds.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "lookalike-task.json").read_text())
    assert saved["settings"]["seeds"] == [0, 1]  # quick: two seeds
    assert len(saved["per_seed"]) == 2
    rows = set(MAIN_ROWS) | set(ablation_rows((2, 4), cfg))
    assert set(saved["summary"]) == rows == set(saved["rows"])
    for row in rows:
        for metric in METRICS:
            cell = saved["summary"][row][metric]
            assert {"mean", "std", "values"} <= set(cell) and len(cell["values"]) == 2
    assert saved["summary"]["ralm_both"] == saved["summary"]["ralm"]
    assert saved["summary"]["ralm_k4"] == saved["summary"]["ralm"]  # tiny config: k = 4
    assert set(saved["audience_by_seeds"]) == set(MAIN_ROWS)
    assert set(saved["audience_by_seeds"]["ralm"]) == set(bucket_labels())
    assert set(saved["paper_wechat"]) >= {"LR", "YouTube DNN", "RALM with average", "RALM"}
    md = (tmp_path / "lookalike-task.md").read_text()
    for label in list(MAIN_ROWS.values()) + ["YouTube DNN", "k=2", "local only"]:
        assert label in md
    assert result["summary"]["lr"]["auc"]["mean"] == saved["summary"]["lr"]["auc"]["mean"]


def test_cli_has_the_command() -> None:
    out = CliRunner().invoke(app, ["evaluate", "lookalike-task", "--help"])
    assert out.exit_code == 0
    assert "--quick" in out.output and "--seeds" in out.output
    bad = CliRunner().invoke(app, ["evaluate", "lookalike-task", "--seeds", "0"])
    assert bad.exit_code != 0
