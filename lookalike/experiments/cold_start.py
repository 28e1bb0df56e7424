"""Cold start through the streaming state: audience quality as an item's seeds arrive.

The paper motivates look-alike modelling by new items, but measures only a
static split. This replays the test period's clicks in time order through the
same state classes the workers use — the scoring worker's ``UserStore`` (each
user's recent clicks) and the clustering worker's ``ItemClusters`` (seed
window and incremental k-means) — with every item's window empty at the split
time, so every item starts cold. Whenever an item's window reaches n seeds
(n in ``thresholds``), its audience is ranked: every known user who is not a
seed, scored by RALM against the item's current centroids; the positives are
the users who click the item later. prec@K is the paper's eq. 12 on that
audience; the same is computed for the seed-mean variant (cos with the mean
of the seeds, "RALM with average") and for the most active users.

Users start with their training-period clicks, as a worker that has been
running would hold them; the model was trained on the training period only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.clustering import ItemClusters
from engine.codec import Click, SeedBatch
from engine.config import ScoringConfig, WindowConfig
from engine.data import Dataset, profiles_of
from engine.user_store import UserStore
from models.ralm import RalmModel

THRESHOLDS = (1, 2, 5, 10, 20, 50)


@dataclass
class ColdStartCurve:
    """prec@K of an item's audience by the number of seeds it had."""

    k: int
    thresholds: tuple[int, ...]
    ralm: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    seed_mean: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    active: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))

    def table(self) -> list[dict]:
        rows = []
        for n in self.thresholds:
            if not self.ralm.get(n):
                continue
            rows.append({
                "seeds": n, "items": len(self.ralm[n]),
                "ralm": float(np.mean(self.ralm[n])),
                "seed_mean": float(np.mean(self.seed_mean[n])),
                "active_users": float(np.mean(self.active[n])),
            })
        return rows


def _prec(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, kind="stable")[:k]
    return float(positive[top].sum() / min(k, int(positive.sum())))


def _cos(users: np.ndarray, v: np.ndarray) -> np.ndarray:
    un = users / np.maximum(np.linalg.norm(users, axis=1, keepdims=True), 1e-12)
    return un @ (v / max(float(np.linalg.norm(v)), 1e-12))


def cold_start_curve(
    model: RalmModel,
    dataset: Dataset,
    split: float = 0.8,
    thresholds: Sequence[int] = THRESHOLDS,
    k: int = 10,
    window: WindowConfig | None = None,
) -> ColdStartCurve:
    """Replay the clicks after ``split`` through the streaming state; see the module doc."""
    window = window or WindowConfig(k=model.k)
    cfg = ScoringConfig()
    t = dataset.split_time(split)
    before = dataset.ts < t
    users = UserStore(cfg.history_len, cfg.max_users, cfg.max_seen)
    profiles = profiles_of(dataset)
    uid, iid = dataset.users.ids, dataset.items.ids
    for u, i, ts in zip(dataset.user[before], dataset.item[before], dataset.ts[before]):
        users.click(Click(int(uid[u]), int(iid[i]), float(ts), profiles[u]))

    after = np.flatnonzero(~before)
    clickers_after: dict[int, list[tuple[int, int]]] = defaultdict(list)  # item -> (pos, user)
    for pos in after:
        clickers_after[int(dataset.item[pos])].append((int(pos), int(dataset.user[pos])))

    clusters = ItemClusters(window)
    curve = ColdStartCurve(k, tuple(thresholds))
    want = set(thresholds)
    activity = np.bincount(dataset.user[before], minlength=len(uid)).astype(np.float64)
    # every user's current embedding; it changes only when the user clicks
    known = np.array([users.get(int(x)) is not None for x in uid])
    emb = np.zeros((len(uid), model.dim), np.float32)
    rows = np.flatnonzero(known)
    states = [users.get(int(uid[v])) for v in rows]
    if len(rows):
        emb[rows] = model.embed_users([s.profile for s in states],
                                      [list(s.history) for s in states],
                                      [s.clicks for s in states])
    for pos in after:
        u, i = int(dataset.user[pos]), int(dataset.item[pos])
        st = users.click(Click(int(uid[u]), int(iid[i]), float(dataset.ts[pos]), profiles[u]))
        vec = model.embed_users([st.profile], [list(st.history)], [st.clicks])
        emb[u], known[u] = vec[0], True
        batch = SeedBatch(np.array([u]), np.array([dataset.ts[pos]]), vec, model.version)
        if not clusters.apply(i, batch):
            continue
        item = clusters.items[i]
        n = len(item.window)
        if n not in want:
            continue
        seeds = set(item.window.users())
        later = {v for p, v in clickers_after[i] if p > pos} - seeds
        if not later:
            continue
        cand = known.copy()
        cand[list(seeds)] = False
        cand = np.flatnonzero(cand)
        positive = np.isin(cand, list(later))
        if positive.any():
            _score_audience(model, emb[cand], item, positive, activity[cand], n, curve)
    return curve


def _score_audience(model: RalmModel, emb: np.ndarray, item, positive: np.ndarray,
                    activity: np.ndarray, n: int, curve: ColdStartCurve) -> None:
    """Rank every known non-seed user (``emb`` [U, h]) for one item at one moment."""
    cent, counts = item.centroids, item.counts
    g = model.item_global(cent[None], counts[None])  # [1, h]
    scores = model.score(
        emb, np.broadcast_to(cent, (len(emb), *cent.shape))[:, None],
        np.broadcast_to(counts, (len(emb), *counts.shape))[:, None],
        np.broadcast_to(g, (len(emb), 1, g.shape[1])))[:, 0]
    k = curve.k
    curve.ralm[n].append(_prec(scores, positive, k))
    curve.seed_mean[n].append(_prec(_cos(emb, item.window.vectors().mean(0)), positive, k))
    curve.active[n].append(_prec(activity, positive, k))


def plot_curve(curve: ColdStartCurve, path) -> None:
    """PNG: audience prec@K against the number of seeds, RALM vs baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = curve.table()
    xs = [r["seeds"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("ralm", "RALM (local+global attention)"),
                       ("seed_mean", "seed mean (RALM with average)"),
                       ("active_users", "most active users")):
        ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("seeds of the item when its audience was ranked")
    ax.set_ylabel(f"audience prec@{curve.k}")
    ax.set_title("Cold start through the streaming state")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
