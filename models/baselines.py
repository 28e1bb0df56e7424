"""Baselines of the look-alike task, scored on the same split as RALM.

Every scorer returns a score matrix [U, C] over a :class:`Protocol`'s test
users (rows) and seeded candidate items (columns); ``protocol_metrics`` turns
it into the paper's figures. What each one is:

- **popularity**: the item's seed count (user view); in the audience view the
  users are ranked by their training activity (a constant per item ranks nothing).
- **LR** (:class:`ItemLR`): logistic regression on user features crossed with
  the item id, i.e. one weight vector per item over the user's features
  (profile one-hots, age bucket, genre mix of their clicks, activity) plus an
  item bias; trained on the training-period clicks against sampled non-clicks.
  Its L2 strength is chosen on a validation split carved from the training
  period (:func:`tune_item_lr`), never on the test split.
- **YouTube-DNN-style tower** (:func:`youtube_scores`): RALM's user tower with
  concatenated fields (``merge="concat"``); user–item score = the universal
  embedding · the item's row of the tower's sampled-softmax output table.
- **RALM with average** (:func:`seed_mean_scores`): the trained RALM, each item
  represented by the mean of its seeds' transformed embeddings instead of
  attention over centroids; score = cos(E_u, mean). An inference-time ablation
  of the same model, not a separately trained one.
- **RALM parts** (:func:`ralm_parts`): cos(E_u, E_global) and cos(E_u, E_local)
  separately, so that α·global + β·local gives RALM (0.3, 0.7), local only
  (0, 1) and global only (1, 0) from one pass, for any k of the re-clustering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from models.evaluate_lookalike import Protocol, embed_everyone, protocol_metrics
from models.features import ClickLog, FeatureSpace
from models.ralm import RalmModel
from models.seed_clusters import cluster_seeds

if TYPE_CHECKING:
    from engine.data import Dataset

#: ML-1M's age groups, reused as one-hot buckets for LR
AGE_EDGES = (18, 25, 35, 45, 50, 56)


# ---------------------------------------------------------------- popularity


def popularity_scores(proto: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """(user view: seed count per item [U, C], audience view: user activity [U, C])."""
    shape = proto.seen.shape
    return (np.broadcast_to(proto.n_seeds.astype(np.float64), shape),
            np.broadcast_to(proto.activity[:, None], shape))


# ---------------------------------------------------------------- LR


def user_feature_matrix(train: Dataset, features: FeatureSpace | None = None) -> np.ndarray:
    """[n_users, d] float32 user features as of the end of ``train``.

    One-hot gender, occupation, zip prefix (index 0 = unknown), one-hot age
    bucket (plus unknown), the genre mix of the user's recent clicks
    (normalised to sum 1), and the continuous fields of the user tower
    (age/100, age known, activity).
    """
    features = features or FeatureSpace.build(train)
    clicks = ClickLog(train, features)
    everyone = np.arange(len(train.users.ids))
    batch = clicks.encode(everyone, clicks.indptr[1:])
    blocks = []
    for col, card in enumerate(features.cardinalities()):
        blocks.append(np.eye(card, dtype=np.float32)[batch.categorical[:, col].numpy()])
    age = np.asarray(train.users.age, np.float32)
    bucket = np.where(np.isfinite(age), np.searchsorted(AGE_EDGES, np.nan_to_num(age),
                                                        side="right") + 1, 0)
    blocks.append(np.eye(len(AGE_EDGES) + 2, dtype=np.float32)[bucket])
    genres = batch.genres.numpy()[:, 1:]
    blocks.append(genres / np.maximum(genres.sum(1, keepdims=True), 1.0))
    blocks.append(batch.continuous.numpy())
    return np.concatenate(blocks, axis=1).astype(np.float32)


@dataclass
class ItemLR:
    """logit(u, i) = x_u · W_i + b_i: logistic regression on user features × item id."""

    weight: np.ndarray  # [n_items, d]
    bias: np.ndarray  # [n_items]
    x: np.ndarray  # [n_users, d] the features it was trained (and scores) with

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """[U, C] logits of users × items (dense indices)."""
        return self.x[users] @ self.weight[items].T + self.bias[items][None, :]


def fit_item_lr(
    train: Dataset,
    *,
    l2: float = 1e-4,
    epochs: int = 4,
    negatives: int = 4,
    lr: float = 0.03,
    batch_size: int = 4096,
    seed: int = 0,
    x: np.ndarray | None = None,
) -> ItemLR:
    """Fit :class:`ItemLR` on ``train``'s distinct clicks vs ``negatives`` sampled non-clicks each.

    Negatives are uniform over the clicked items, resampled when the user did
    click them. Adam on the mean BCE plus ``l2``·(‖W‖² mean over the batch's rows).
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_items = len(train.items.ids)
    x = user_feature_matrix(train) if x is None else x
    pairs = np.unique(train.user.astype(np.int64) * n_items + train.item)
    pos_u, pos_i = pairs // n_items, pairs % n_items
    pool = np.unique(train.item)
    w = torch.zeros((n_items, x.shape[1]), requires_grad=True)
    b = torch.zeros(n_items, requires_grad=True)
    xt = torch.from_numpy(x)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(epochs):
        neg_u = np.repeat(pos_u, negatives)
        neg_i = pool[rng.integers(len(pool), size=len(neg_u))]
        for _ in range(5):
            hit = np.isin(neg_u * n_items + neg_i, pairs)
            if not hit.any():
                break
            neg_i[hit] = pool[rng.integers(len(pool), size=int(hit.sum()))]
        users = np.concatenate([pos_u, neg_u])
        items = np.concatenate([pos_i, neg_i])
        labels = np.concatenate([np.ones(len(pos_u)), np.zeros(len(neg_u))]).astype(np.float32)
        order = rng.permutation(len(users))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ui, ii = torch.from_numpy(users[idx]), torch.from_numpy(items[idx])
            wi = w[ii]
            logit = (xt[ui] * wi).sum(1) + b[ii]
            loss = F.binary_cross_entropy_with_logits(logit, torch.from_numpy(labels[idx]))
            loss = loss + l2 * (wi * wi).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ItemLR(w.detach().numpy().copy(), b.detach().numpy().copy(), x)


def tune_item_lr(
    train: Dataset,
    grid: Sequence[float] = (1e-3, 1e-2, 1e-1),
    *,
    val_split: float = 0.8,
    max_seeds: int = 256,
    metric: str = "auc",
    seed: int = 0,
    **fit: object,
) -> tuple[ItemLR, dict[str, object]]:
    """Choose the L2 strength on a validation split carved from ``train``, refit on all of it.

    ``train`` is split in time at its ``val_split`` quantile; each l2 of
    ``grid`` is fitted on the earlier part and scored with the look-alike
    protocol on the later part; the best ``metric`` wins. Returns the refit
    model and {"grid", "val", "chosen"}.
    """
    inner, val = train.time_split(val_split)
    proto = Protocol.build(inner, val, max_seeds)
    x_inner = user_feature_matrix(inner)
    val_scores: dict[str, float] = {}
    for l2 in grid:
        m = fit_item_lr(inner, l2=l2, seed=seed, x=x_inner, **fit)  # type: ignore[arg-type]
        s = m.scores(proto.users, proto.candidates)
        val_scores[repr(l2)] = protocol_metrics(proto, s, (10,))[metric]
    chosen = max(grid, key=lambda v: val_scores[repr(v)])
    model = fit_item_lr(train, l2=chosen, seed=seed, **fit)  # type: ignore[arg-type]
    return model, {"grid": list(grid), "metric": metric, "val": val_scores, "chosen": chosen}


# ---------------------------------------------------------------- YouTube-DNN tower


@torch.inference_mode()
def universal_embeddings(model: RalmModel, train: Dataset, batch: int = 1024) -> np.ndarray:
    """[n_users, m] universal embeddings (user-tower output) as of the end of ``train``."""
    clicks = ClickLog(train, model.features)
    everyone = np.arange(len(train.users.ids))
    out = [model.user_tower(clicks.encode(everyone[s:s + batch], clicks.indptr[1:][s:s + batch]))
           for s in range(0, len(everyone), batch)]
    return torch.cat(out).numpy()


@torch.inference_mode()
def youtube_scores(model: RalmModel, proto: Protocol, batch: int = 32) -> np.ndarray:
    """[U, C] universal embedding · the item's sampled-softmax output embedding.

    The output table is indexed by the feature space's item index (1..D);
    every candidate was clicked in training, so every one has a row. The
    score is the tower's own softmax logit (whatever form the output layer
    computes it in) minus the item bias: serving is by dot product (ANN), as
    in the paper, and a per-item constant would only add popularity.
    """
    u = torch.from_numpy(universal_embeddings(model, proto.train)[proto.users])
    ids = proto.train.items.ids[proto.candidates]
    rows = torch.from_numpy(model.features.item_index(ids))
    out = model.user_tower.output
    parts = []
    for s in range(0, len(u), batch):
        items = rows[None, :].expand(len(u[s:s + batch]), -1)
        parts.append(out(u[s:s + batch], items) - out.bias(items).squeeze(-1))
    return torch.cat(parts).numpy() if parts else np.zeros((0, len(rows)), np.float32)


# ---------------------------------------------------------------- RALM variants


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def seed_mean_scores(emb: np.ndarray, proto: Protocol) -> np.ndarray:
    """[U, C] cos(E_u, mean of the item's seeds' transformed embeddings): RALM with average."""
    means = np.stack([emb[s].mean(0) for s in proto.candidate_seeds()])
    return _normalise(emb[proto.users]) @ _normalise(means).T


@dataclass
class RalmParts:
    """cos(E_u, E_global) and cos(E_u, E_local), [U, C] each, for one clustering."""

    cos_global: np.ndarray
    cos_local: np.ndarray

    def combine(self, alpha: float, beta: float) -> np.ndarray:
        return alpha * self.cos_global + beta * self.cos_local


@torch.inference_mode()
def ralm_parts(
    model: RalmModel, emb: np.ndarray, centroids: np.ndarray, counts: np.ndarray
) -> RalmParts:
    """Both cosines of RALM's score for users ``emb`` [U, h] over items ``centroids`` [C, k, h].

    Uses the tower's own ``global_attention`` and ``local_attention``, so
    ``combine(α, β)`` equals ``model.score`` for the model's α, β.
    """
    tower = model.lookalike
    cent = torch.from_numpy(np.ascontiguousarray(centroids, np.float32))
    mask = torch.from_numpy(np.asarray(counts) > 0)
    glob = tower.global_attention(cent, mask).numpy()  # [C, h], L2-normalised
    un = _normalise(np.asarray(emb, np.float32))
    local = np.empty((len(emb), len(cent)), np.float32)
    for r, u in enumerate(torch.from_numpy(np.ascontiguousarray(emb, np.float32))):
        e = tower.local_attention(u[None], cent[None], mask[None])[0]  # [C, h]
        local[r] = _normalise(e.numpy()) @ un[r]
    return RalmParts(un @ glob.T, local)


def ralm_clusters(
    model: RalmModel, emb: np.ndarray, proto: Protocol, k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate's seeds clustered as the worker does (k default: the model's)
    -> centroids, counts."""
    t = proto.train
    return cluster_seeds(model.config, t.user, t.item, t.ts, emb, proto.candidates, k)


def ralm_embeddings(model: RalmModel, proto: Protocol) -> np.ndarray:
    """[n_users, h] transformed embeddings of every user at the end of the training period."""
    return embed_everyone(model, proto.train)
