"""Sanity evaluation of a trained RALM with the paper's look-alike protocol.

Time split: an item's seeds are the users who clicked it in ``train`` (the
most recent ``max_seeds``, as the online window keeps them); every user is
embedded from their training history and profile, each item is represented
by the centroids of its seeds' embeddings, clustered by the clustering
worker's own code on the training clicks in time order. For each user who appears
in ``test``, all items with seeds are ranked by ``RalmModel.score``.

Choices (the paper leaves them open):

- candidates are the items with at least one seed (others cannot be scored);
  a user's own training items are removed from the ranking *and* from S_i;
- S_i = the candidates user i clicks in ``test``; users with empty S_i are skipped;
- prec@K = |R_K ∩ S_i| / min(K, |S_i|) (the paper's eq. 12), averaged over users;
- ``auc`` pools every (test user, candidate) pair; ``user_auc`` averages per user;
- ``audience_auc``: for each item, its non-seed test users ranked by score,
  positives = its test clickers (the audience-expansion view), averaged over items.

The same numbers for a popularity ranking (seed count) are reported as
``pop_*``; the audience view's baseline ranks users by activity (``active_*``).

:class:`Protocol` computes the split once (test users, candidates, seeds,
seen/clicked masks) and :func:`protocol_metrics` scores any [U, C] matrix on
it: the baselines and ablations of ``lookalike.experiments.lookalike_task`` go through the
same code as RALM.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import rankdata

from models.features import ClickLog
from models.ralm import RalmModel
from models.seed_clusters import cluster_seeds
from models.train_ralm import item_seeds

if TYPE_CHECKING:
    from engine.data import Dataset


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties get half credit); NaN if one class."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at(ranked: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """|top-k ∩ relevant| / min(k, |relevant|): ``ranked`` are candidate positions, best first."""
    return float(relevant[ranked[:k]].sum() / min(k, int(relevant.sum())))


def _user_items(data: Dataset, n_items: int) -> np.ndarray:
    """Sorted unique user·n_items + item codes of a dataset's clicks."""
    return np.unique(data.user.astype(np.int64) * n_items + data.item)


# ---------------------------------------------------------------- the split, once


@dataclass(frozen=True)
class Protocol:
    """The look-alike split, computed once, shared by RALM and every baseline.

    ``users`` [U] are the test users (dense indices), ``candidates`` [C] the
    items with at least one seed, ``seeds`` every item's seed window (dense
    item index -> dense user indices, newest last), ``seen`` [U, C] the pairs
    clicked in ``train``, ``clicked`` [U, C] the pairs first clicked in ``test``.
    """

    train: Dataset
    test: Dataset
    users: np.ndarray
    candidates: np.ndarray
    seeds: list[np.ndarray]
    seen: np.ndarray
    clicked: np.ndarray

    @classmethod
    def build(cls, train: Dataset, test: Dataset, max_seeds: int) -> Protocol:
        n_items = len(train.items.ids)
        users = np.unique(test.user)
        seeds = item_seeds(train.user, train.item, train.ts, n_items, max_seeds)
        cands = np.flatnonzero([len(s) > 0 for s in seeds])
        code = users[:, None] * n_items + cands[None, :]  # [U, C] user·n_items + item
        seen = np.isin(code, _user_items(train, n_items))
        clicked = np.isin(code, _user_items(test, n_items)) & ~seen
        return cls(train, test, users, cands, seeds, seen, clicked)

    @property
    def n_seeds(self) -> np.ndarray:
        """[C] seed count (window size) of each candidate."""
        return np.array([len(self.seeds[i]) for i in self.candidates])

    @property
    def activity(self) -> np.ndarray:
        """[U] training clicks of each test user."""
        counts = np.bincount(self.train.user, minlength=len(self.train.users.ids))
        return counts[self.users].astype(np.float64)

    def candidate_seeds(self) -> list[np.ndarray]:
        return [self.seeds[i] for i in self.candidates]


def protocol_metrics(
    proto: Protocol, scores: np.ndarray, k_list: Sequence[int] = (10, 50),
    audience_scores: np.ndarray | None = None,
) -> dict[str, float]:
    """Every figure of one score matrix [U, C] on the split: user view and audience view.

    The user view's first prec@K is also given for returning users (with
    training clicks) and new users (profile only): on a time split most test
    users are new, and no look-alike score can read a history they do not have.

    ``audience_scores`` (default ``scores``) rank the users of each item: for
    popularity, whose user view is a constant per item, it is user activity.
    """
    out = user_view("", scores, proto.seen, proto.clicked, k_list)
    for group, rows in (("returning", proto.activity > 0), ("new", proto.activity == 0)):
        rows &= proto.clicked.any(1)
        part = (user_view("", scores[rows], proto.seen[rows], proto.clicked[rows], k_list[:1])
                if rows.any() else {f"prec@{k_list[0]}": float("nan")})
        out[f"prec@{k_list[0]}_{group}"] = part[f"prec@{k_list[0]}"]
    aud = scores if audience_scores is None else audience_scores
    out["audience_auc"] = _audience_auc(aud, proto.seen, proto.clicked)
    for k in k_list:
        _, per_item = audience_per_item(aud, proto.seen, proto.clicked, k)
        out[f"audience_prec@{k}"] = float(np.mean(per_item)) if len(per_item) else float("nan")
    return out


# ---------------------------------------------------------------- RALM scores


def embed_everyone(model: RalmModel, train: Dataset, batch: int = 1024) -> np.ndarray:
    """[n_users, h] look-alike embeddings of every user as of the end of ``train``."""
    clicks = ClickLog(train, model.features)
    everyone = np.arange(len(train.users.ids))
    return np.concatenate([model.embed_batch(clicks.encode(everyone[s:s + batch],
                                                           clicks.indptr[1:][s:s + batch]))
                           for s in range(0, len(everyone), batch)])


def score_matrix(model: RalmModel, train: Dataset, users: np.ndarray) -> dict[str, np.ndarray]:
    """Look-alike scores of ``users`` against every seeded item: scores [U, C] and friends."""
    cfg = model.config
    emb = embed_everyone(model, train)
    seeds = item_seeds(train.user, train.item, train.ts, len(train.items.ids), cfg.max_seeds)
    cands = np.flatnonzero([len(s) > 0 for s in seeds])
    cent, counts = cluster_seeds(cfg, train.user, train.item, train.ts, emb, cands)
    glob = model.item_global(cent, counts)
    scores = np.stack([model.score_user(emb[u], cent, counts, glob) for u in users])
    return {"scores": scores, "candidates": cands, "item_global": glob,
            "embeddings": emb[users], "n_seeds": np.array([len(seeds[i]) for i in cands])}


def evaluate_lookalike(
    model: RalmModel, train: Dataset, test: Dataset, k_list: Sequence[int] = (10, 50)
) -> dict[str, float]:
    """prec@K and AUC of RALM and of popularity on the time split (train, test)."""
    started = time.perf_counter()
    proto = Protocol.build(train, test, model.config.max_seeds)
    sm = score_matrix(model, train, proto.users)
    scores, seen, clicked = sm["scores"], proto.seen, proto.clicked
    pop = np.broadcast_to(sm["n_seeds"].astype(np.float64), scores.shape)
    out: dict[str, float] = {}
    for name, s in (("", scores), ("pop_", pop)):
        out.update(user_view(name, s, seen, clicked, k_list))
    activity = np.broadcast_to(proto.activity[:, None], scores.shape)
    for name, s in (("", scores), ("active_", activity)):
        out[f"{name}audience_auc"] = _audience_auc(s, seen, clicked)
    out["users"] = float((clicked.any(1)).sum())
    out["candidates"] = float(len(proto.candidates))
    out["seconds"] = time.perf_counter() - started
    return out


# ---------------------------------------------------------------- views


def user_view(
    prefix: str, scores: np.ndarray, seen: np.ndarray, clicked: np.ndarray, k_list: Sequence[int]
) -> dict[str, float]:
    """Per test user: rank unseen candidates, compare with their test clicks."""
    precs: dict[int, list[float]] = {k: [] for k in k_list}
    aucs: list[float] = []
    for row in np.flatnonzero(clicked.any(1)):
        keep = ~seen[row]
        s, rel = scores[row][keep], clicked[row][keep]
        ranked = np.argsort(-s, kind="stable")
        for k in k_list:
            precs[k].append(precision_at(ranked, rel, k))
        aucs.append(auc(s, rel))
    valid = ~seen & clicked.any(1)[:, None]
    out = {f"{prefix}prec@{k}": float(np.mean(v)) for k, v in precs.items()}
    out[f"{prefix}user_auc"] = float(np.nanmean(aucs))
    out[f"{prefix}auc"] = auc(scores[valid], clicked[valid])
    return out


_user_view = user_view  # the name this module used before


def audience_per_item(
    scores: np.ndarray, seen: np.ndarray, clicked: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per item with test clickers: prec@k of its non-seed test users ranked by score.

    Returns (candidate columns [n], prec@k [n]).
    """
    cols = np.flatnonzero(clicked.any(0))
    precs = np.empty(len(cols))
    for j, c in enumerate(cols):
        keep = ~seen[:, c]
        rel = clicked[keep, c]
        precs[j] = precision_at(np.argsort(-scores[keep, c], kind="stable"), rel, k)
    return cols, precs


def _audience_auc(scores: np.ndarray, seen: np.ndarray, clicked: np.ndarray) -> float:
    """Per item: rank the test users who are not its seeds; mean AUC over items."""
    aucs = [auc(scores[~seen[:, c], c], clicked[~seen[:, c], c])
            for c in np.flatnonzero(clicked.any(0))]
    return float(np.nanmean(aucs)) if aucs else float("nan")
