"""Serving pipelines: candidate sources, then one ranker, picked per request.

A pipeline (``scoring.pipelines`` in the config) names its candidate sources
and its ranker:

- sources: ``ralm`` (Faiss over RALM's item vectors, the worker's fast path),
  ``popular`` (the items with the most seeds in their windows now: recent
  popularity, for users with no clicks), or a zoo model loaded from
  ``scoring.models`` (SASRec, Mult-VAE, LFM, ...: every registered model scores
  items from a user's clicks, read live from the worker's user state, so a
  click changes the next request's candidates);
- ranker: ``ralm`` (the look-alike attention score over the item's seed
  centroids; a candidate without centroids cannot be scored and is dropped),
  a source's own scores, a CTR model of ``scoring.rankers`` (DLRM, FM, LR:
  P(click) from the user's id and profile and the item's id), or ``blend``:
  a weighted sum of each term standardised over the user's candidates (a term
  that cannot score an item gives it its lowest standardised value).

Pipelines whose sources and terms are all the table's (``ralm``, ``popular``:
the default blend, ``ralm`` alone) run batched over table slots
(``consumers/ranking.py``); the others run here, a user at a time. The batched
path is tested equal to this one (``tests/test_table_pipelines.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.config import PipelineConfig

if TYPE_CHECKING:
    from engine.centroid_table import CentroidTable
    from models.ctr_ranker import CTRRanker
    from models.ralm import RalmModel
    from models.recommender import Recommender


@dataclass
class Pool:
    """One user's candidates in first-proposed order, and who proposed each."""

    items: list[int] = field(default_factory=list)
    by: dict[int, list[str]] = field(default_factory=dict)

    def add(self, source: str, items: list[int]) -> None:
        for i in items:
            who = self.by.get(i)
            if who is None:
                self.by[i] = [source]
                self.items.append(i)
            elif source not in who:
                who.append(source)


@dataclass
class Ranked:
    """A user's recommendations: (item, score) best first, with explanations if asked."""

    items: list[tuple[int, float]]
    why: list[dict] | None = None


def load_zoo(paths: dict[str, Path]) -> dict[str, Recommender]:
    """The zoo models ``scoring.models`` names, loaded safely (weights only)."""
    if not paths:
        return {}
    from models.recommender import Recommender

    out = {}
    for name, path in paths.items():
        model = Recommender.load(Path(path).expanduser())
        model.module_.eval()
        out[name] = model
    return out


def load_rankers(paths: dict[str, Path]) -> dict[str, CTRRanker]:
    """The CTR rankers ``scoring.rankers`` names, loaded safely (weights only)."""
    if not paths:
        return {}
    from models.ctr_ranker import CTRRanker

    return {name: CTRRanker(path) for name, path in paths.items()}


def popular_items(table: CentroidTable) -> np.ndarray:
    """Item ids of the servable items, most seeds first (ties: lower slot first)."""
    return table.item_ids[table.popular_slots()]


def popularity(table: CentroidTable, slots: np.ndarray) -> np.ndarray:
    """The ``popular`` term of table ``slots`` (any shape; -1: no item): log(1 + seeds),
    NaN where there is no item."""
    n = table.n_seeds[np.maximum(slots, 0)].astype(np.float64)
    return np.where(slots >= 0, np.log1p(n), np.nan)


def top_unseen(items: np.ndarray, scores: np.ndarray | None, seen: set[int], n: int) -> list[int]:
    """The first ``n`` of ``items`` (ordered by ``scores`` if given) the user did not click."""
    order = items if scores is None else items[np.argsort(-scores, kind="stable")]
    out = []
    for i in order.tolist():
        if i not in seen:
            out.append(i)
            if len(out) == n:
                break
    return out


def ralm_scores(model: RalmModel, table: CentroidTable, user: np.ndarray,
                items: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(full RALM score [C] (NaN: no centroids), attention [C, k], counts [C, k])."""
    slots = np.array([table.slot_of.get(i, -1) for i in items], np.int64)
    ok = table.servable(slots)
    scores, att = model.score_table(user[None], slots[None], ok[None], table.centroids,
                                    table.counts, table.global_vec, table.gram, explain=True)
    assert att is not None
    counts = np.where(ok[:, None], table.counts[np.maximum(slots, 0)], np.float32(0.0))
    return scores[0], att[0], counts


def standardised(x: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Row by row of ``x`` [..., C]: (x - mean) / std over the finite entries among
    ``valid`` (default: all); the other valid entries get the row's lowest value, a
    row with no finite entry zeros. Entries outside ``valid`` are left 0."""
    x = np.asarray(x, np.float64)
    valid = np.ones(x.shape, bool) if valid is None else valid
    ok = np.isfinite(x) & valid
    n = np.maximum(ok.sum(-1, keepdims=True), 1)
    v = np.where(ok, x, 0.0)
    mean = v.sum(-1, keepdims=True) / n
    std = np.sqrt((np.where(ok, v - mean, 0.0) ** 2).sum(-1, keepdims=True) / n)
    z = (v - mean) / np.where(std > 0, std, 1.0)
    low = np.where(ok, z, np.inf).min(-1, keepdims=True)
    low = np.where(np.isfinite(low), low, 0.0)
    return np.where(ok, z, np.where(valid, low, 0.0))


def rank_user(p: PipelineConfig, pool: Pool, k: int, terms: dict[str, np.ndarray],
              explain: bool, attention: np.ndarray | None,
              counts: np.ndarray | None) -> Ranked:
    """Order one user's pool by the pipeline's ranker. ``terms``: each term's score of
    every pooled item (NaN: that term cannot score it)."""
    if p.ranker == "blend":
        score = sum(w * standardised(terms[t]) for t, w in p.blend.items())
        score = np.asarray(score, np.float64)
    else:
        score = terms[p.ranker].astype(np.float64)
    keep = np.flatnonzero(np.isfinite(score))
    order = keep[np.argsort(-score[keep], kind="stable")][:k]
    items = [(pool.items[j], float(score[j])) for j in order]
    if not explain:
        return Ranked(items)
    ralm = terms.get("ralm")
    why = [explanation(pool.by[pool.items[j]], p.ranker,
                       None if ralm is None or not np.isfinite(ralm[j]) or attention is None
                       else attention[j], None if counts is None else counts[j])
           for j in order]
    return Ranked(items, why)


def explanation(sources: list[str], ranker: str, attention: np.ndarray | None,
                counts: np.ndarray | None) -> dict:
    """Why an item is recommended: the sources that proposed it, what ranked it and,
    where RALM scored it, the seed cluster (centroid) its local attention weighs most."""
    out: dict = {"sources": sources, "ranker": ranker}
    if attention is not None and counts is not None:
        c = int(np.argmax(attention))
        out["seed_cluster"] = {"index": c, "weight": round(float(attention[c]), 4),
                               "seeds": float(counts[c])}
    return out
