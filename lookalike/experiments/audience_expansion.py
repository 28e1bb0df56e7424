"""Cold-item audience expansion: the engine's main look-alike figure.

The task the engine exists for: an item (an ad, a new film) has a handful of
seed users, and the engine must find the users most like them. Protocol:

- items with at least ``MIN_RATERS`` distinct raters, in ``n_folds`` random
  folds; a fold's items are removed from all training and from every user's
  history (``Fold.train``): to every model they are new items;
- for each fold item and each N of ``N_VALUES``: the seeds are its first N
  raters by time, the positives its later raters, the pool every other user,
  represented by their history on training items;
- audience view (per item, mean over items with positives): the pool ranked
  by score; prec@10 and prec@50 as the RALM paper's eq. 12 (hits / min(K,
  |positives|)) and AUC;
- user view (secondary): each user ranks the fold's items they are not a
  seed of (all with exactly N seeds); prec@10 over users with a positive.

Transductive in user time: a pool user's history may hold clicks made after
the seeds' clicks. ml-100k forces it: it is a sign-up burst log (68% of users
rate everything within a day of joining), so any cut in time leaves most of
the later raters without a history before it (docs/ralm.md).

A model is a :class:`Scorer`: ``fit(fold)`` on the fold's training data, then
``scores(items, seeds)`` [I, n_users] for fold items and their seed users.

Why one module of this size: the protocol, its baselines' adapters, the per-fold
RALM runs and the report are one experiment, read top to bottom.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.evaluate_lookalike import auc, precision_at
from models.ralm import RalmConfig

if TYPE_CHECKING:
    from engine.data import Dataset

N_VALUES = (1, 2, 5, 10, 20, 50)
MIN_RATERS = 30
K_LIST = (10, 50)


# ---------------------------------------------------------------- folds


@dataclass(frozen=True)
class Fold:
    """One fold: its test items, and the data every model trains on without them.

    ``raters[j]`` are item ``items[j]``'s distinct raters in the order of their
    first click, ``rated_at[j]`` those clicks' times.
    """

    index: int
    items: np.ndarray
    train: Dataset
    raters: list[np.ndarray]
    rated_at: list[np.ndarray]

    @property
    def n_users(self) -> int:
        return len(self.train.users.ids)

    def task(self, n: int) -> Task:
        """The fold at N seeds: items with at least one positive left."""
        keep = [j for j, r in enumerate(self.raters) if len(r) > n]
        return Task(self, n, self.items[keep], [self.raters[j][:n] for j in keep],
                    [self.rated_at[j][:n] for j in keep], [self.raters[j][n:] for j in keep])


@dataclass(frozen=True)
class Task:
    """One fold at N seeds: per item its seeds (with their click times) and positives."""

    fold: Fold
    n: int
    items: np.ndarray
    seeds: list[np.ndarray]
    seed_ts: list[np.ndarray]
    positives: list[np.ndarray]


def raters_in_order(ds: Dataset, item: int) -> tuple[np.ndarray, np.ndarray]:
    """An item's distinct raters by their first click (ties in log order), with its times."""
    rows = np.flatnonzero(ds.item == item)
    rows = rows[np.argsort(ds.ts[rows], kind="stable")]
    _, first = np.unique(ds.user[rows], return_index=True)
    first = np.sort(first)
    return ds.user[rows][first].astype(np.int64), ds.ts[rows][first].astype(np.float64)


def inner_folds(folds: list[Fold], seed: int = 0) -> list[Fold]:
    """For tuning: per fold, the first of ``len(folds)`` folds of its own training items
    (carrying the outer fold's index). A choice made on these never saw the fold's test
    items; it may have seen other folds' test items, so a choice is kept only where it
    holds on every fold's inner figure."""
    return [replace(make_folds(f.train, len(folds), seed + 1 + f.index)[0], index=f.index)
            for f in folds]


def make_folds(ds: Dataset, n_folds: int = 5, seed: int = 0,
               min_raters: int = MIN_RATERS) -> list[Fold]:
    """Items with >= ``min_raters`` distinct raters in ``n_folds`` random folds."""
    n_raters = np.bincount(ds.item[np.unique(ds.user * len(ds.items.ids) + ds.item,
                                             return_index=True)[1]],
                           minlength=len(ds.items.ids))
    eligible = np.flatnonzero(n_raters >= min_raters)
    if len(eligible) < n_folds:
        raise ValueError(f"{len(eligible)} items with >= {min_raters} raters: too few for "
                         f"{n_folds} folds")
    order = np.random.default_rng(seed).permutation(eligible)
    folds = []
    for f, items in enumerate(np.array_split(order, n_folds)):
        items = np.sort(items)
        held = [raters_in_order(ds, int(i)) for i in items]
        folds.append(Fold(f, items, ds.subset(~np.isin(ds.item, items)),
                          [r for r, _ in held], [t for _, t in held]))
    return folds


# ---------------------------------------------------------------- metrics


def audience_view(task: Task, scores: np.ndarray,
                  k_list: Sequence[int] = K_LIST) -> dict[str, np.ndarray]:
    """Per item of the task: prec@K of the pool ranked by ``scores`` [I, U], and AUC."""
    out: dict[str, np.ndarray] = {f"prec@{k}": np.empty(len(task.items)) for k in k_list}
    out["auc"] = np.empty(len(task.items))
    n_users = scores.shape[1]
    for j in range(len(task.items)):
        pool = np.ones(n_users, bool)
        pool[task.seeds[j]] = False
        rel = np.zeros(n_users, bool)
        rel[task.positives[j]] = True
        s, r = scores[j][pool], rel[pool]
        ranked = np.argsort(-s, kind="stable")
        for k in k_list:
            out[f"prec@{k}"][j] = precision_at(ranked, r, k)
        out["auc"][j] = auc(s, r)
    return out


def user_view(task: Task, scores: np.ndarray, k: int = 10) -> float:
    """Mean prec@k of users ranking the task's items (each user's own seed items left out)."""
    n_users = scores.shape[1]
    rel = np.zeros((len(task.items), n_users), bool)
    seed = np.zeros_like(rel)
    for j in range(len(task.items)):
        rel[j, task.positives[j]] = True
        seed[j, task.seeds[j]] = True
    precs = []
    for u in np.flatnonzero(rel.any(0)):
        keep = ~seed[:, u]
        ranked = np.argsort(-scores[keep, u], kind="stable")
        precs.append(precision_at(ranked, rel[keep, u], k))
    return float(np.mean(precs)) if precs else float("nan")


# ---------------------------------------------------------------- models


class Scorer:
    """A look-alike model under this protocol: fit on a fold, score its items' pools."""

    name = ""

    def fit(self, fold: Fold) -> None:
        self.n_users = fold.n_users

    def scores(self, task: Task) -> np.ndarray:  # [I, n_users]
        raise NotImplementedError


def click_matrix(ds: Dataset) -> np.ndarray:
    """[n_users, n_items] 1 where the user clicked the item (float32)."""
    x = np.zeros((len(ds.users.ids), len(ds.items.ids)), np.float32)
    x[ds.user, ds.item] = 1.0
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class RandomScorer(Scorer):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def scores(self, task: Task) -> np.ndarray:
        rng = np.random.default_rng([self.seed, task.fold.index, task.n])
        return rng.random((len(task.items), self.n_users))


class ActivityScorer(Scorer):
    """The most active users first (training clicks), whatever the item."""

    name = "activity"

    def fit(self, fold: Fold) -> None:
        super().fit(fold)
        self.activity = np.bincount(fold.train.user, minlength=fold.n_users).astype(float)

    def scores(self, task: Task) -> np.ndarray:
        return np.broadcast_to(self.activity, (len(task.items), self.n_users))


class SeedMeanScorer(Scorer):
    """Cosine between a user's click vector and the mean of the seeds' (unit) click vectors."""

    name = "seed_mean"

    def fit(self, fold: Fold) -> None:
        super().fit(fold)
        self.x = _unit(click_matrix(fold.train))

    def scores(self, task: Task) -> np.ndarray:
        means = _unit(np.stack([self.x[s].mean(0) for s in task.seeds]))
        return means @ self.x.T


class ItemKnnScorer(Scorer):
    """Item-based kNN: the new item's cosine to every training item from its seeds alone
    (|seeds ∩ raters(j)| / sqrt(N |raters(j)|)), summed over a user's history."""

    name = "item_knn"

    def fit(self, fold: Fold) -> None:
        super().fit(fold)
        self.x = click_matrix(fold.train)
        self.raters = self.x.sum(0)

    def scores(self, task: Task) -> np.ndarray:
        out = np.empty((len(task.items), self.n_users))
        for j, s in enumerate(task.seeds):
            sim = self.x[s].sum(0) / np.sqrt(len(s) * np.maximum(self.raters, 1.0))
            out[j] = self.x @ sim
        return out


class ItemLogisticScorer(Scorer):
    """The classic look-alike: per item, logistic regression of seeds against every other
    user on the unit-length click vector (balanced classes, inverse L2 strength ``c``).
    Unit rows: on raw counts every item a non-seed clicked weighs against, so the most
    active users, who are most of the positives, came last (AUC 0.28 at N = 1). ``c`` =
    0.1 was chosen on the inner folds from {0.01, 0.03, 0.1, 0.3, 1, 3, 10}: above 1 at
    every N (docs/ralm.md)."""

    name = "item_lr"

    def __init__(self, c: float = 0.1):
        self.c = c

    def fit(self, fold: Fold) -> None:
        from scipy.sparse import csr_matrix

        super().fit(fold)
        self.x = csr_matrix(_unit(click_matrix(fold.train)))  # liblinear, sparse: ~50x lbfgs

    def scores(self, task: Task) -> np.ndarray:
        from sklearn.linear_model import LogisticRegression

        out = np.empty((len(task.items), self.n_users))
        for j, s in enumerate(task.seeds):
            y = np.zeros(self.n_users, int)
            y[s] = 1
            m = LogisticRegression(C=self.c, class_weight="balanced", solver="liblinear")
            out[j] = m.fit(self.x, y).decision_function(self.x)
        return out


BASELINES: dict[str, Callable[[], Scorer]] = {
    "random": RandomScorer, "activity": ActivityScorer, "seed_mean": SeedMeanScorer,
    "item_knn": ItemKnnScorer, "item_lr": ItemLogisticScorer,
}


# ---------------------------------------------------------------- the run


@dataclass
class Results:
    """Every figure: ``per_fold[model][n]`` is one dict per fold (and training seed)."""

    n_values: tuple[int, ...]
    per_fold: dict[str, dict[int, list[dict[str, float]]]] = field(default_factory=dict)
    per_item: dict[str, dict[int, list[dict[str, list[float]]]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, model: str, n: int, figures: dict[str, float],
            items: dict[str, np.ndarray]) -> None:
        self.per_fold.setdefault(model, {}).setdefault(n, []).append(figures)
        self.per_item.setdefault(model, {}).setdefault(n, []).append(
            {k: v.tolist() for k, v in items.items()})

    def mean_std(self, model: str, n: int, metric: str) -> tuple[float, float]:
        vals = [f[metric] for f in self.per_fold[model][n]]
        return float(np.mean(vals)), float(np.std(vals))

    def paired(self, model: str, ref: str, n: int, metric: str) -> list[float]:
        """Per-fold differences model − ref (same folds, same order)."""
        return [a[metric] - b[metric] for a, b in zip(self.per_fold[model][n],
                                                       self.per_fold[ref][n], strict=True)]


def evaluate_fold(fold: Fold, scorers: dict[str, Scorer], results: Results,
                  n_values: Sequence[int] = N_VALUES,
                  log: Callable[[str], object] = print) -> None:
    """Fit every scorer on the fold, score each N, add the figures."""
    for name, scorer in scorers.items():
        t0 = time.perf_counter()
        scorer.fit(fold)
        for n in n_values:
            task = fold.task(n)
            if not len(task.items):
                continue
            s = np.asarray(scorer.scores(task), np.float64)
            items = audience_view(task, s)
            figures = {k: float(np.nanmean(v)) for k, v in items.items()}
            figures["user_prec@10"] = user_view(task, s)
            figures["items"] = float(len(task.items))
            results.add(name, n, figures, items)
        results.seconds[name] = results.seconds.get(name, 0.0) + time.perf_counter() - t0
        log(f"fold {fold.index}: {name} in {time.perf_counter() - t0:.1f}s")


def table(results: Results, metric: str = "prec@10") -> str:
    """Markdown: one row per model, mean ± std over folds at each N."""
    head = "| model | " + " | ".join(f"N={n}" for n in results.n_values) + " |"
    rows = [head, "|" + " --- |" * (len(results.n_values) + 1)]
    for model, by_n in results.per_fold.items():
        cells = []
        for n in results.n_values:
            if n in by_n:
                m, s = results.mean_std(model, n, metric)
                cells.append(f"{m:.4f} ± {s:.4f}" if not math.isnan(m) else "n/a")
            else:
                cells.append("")
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: Results, path: Path, metric: str = "prec@10") -> None:
    """PNG of ``metric`` against N for every model, with ± std over folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for model, by_n in results.per_fold.items():
        ns = [n for n in results.n_values if n in by_n]
        ms = np.array([results.mean_std(model, n, metric) for n in ns])
        ax.errorbar(ns, ms[:, 0], yerr=ms[:, 1], marker="o", capsize=3, label=model)
    ax.set_xscale("log")
    ax.set_xticks(list(results.n_values), [str(n) for n in results.n_values])
    ax.set_xlabel("seeds per item (N)")
    ax.set_ylabel(f"audience {metric}")
    ax.set_title("Cold-item audience expansion, ml-100k (mean ± std over folds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- RALM and its tower


class _FoldRalm:
    """One RALM per fold (both stages trained without the fold's items), shared by the
    scorers that read it: RALM, RALM with average and the tower with seed means."""

    def __init__(self, cfg: RalmConfig, progress: bool = False):
        self.cfg, self.progress, self.fold = cfg, progress, -1

    def fit(self, fold: Fold) -> None:
        if fold.index == self.fold:
            return
        from models.baselines import universal_embeddings
        from models.evaluate_lookalike import embed_everyone
        from models.train_ralm import fit_ralm

        self.model = fit_ralm(fold.train, self.cfg, progress=self.progress,
                              log=lambda *_: None)
        self.emb = embed_everyone(self.model, fold.train)  # transformed: what seeds carry
        self.universal = universal_embeddings(self.model, fold.train)
        self.clicks = np.bincount(fold.train.user, minlength=fold.n_users)
        self.fold = fold.index

    def prior(self, n_seeds: int) -> np.ndarray:
        """[n_users] the model's activity prior for an item with ``n_seeds`` seeds."""
        return self.model.audience_prior(self.clicks, n_seeds)


class _RalmFamily(Scorer):
    def __init__(self, shared: _FoldRalm):
        self.shared = shared

    def fit(self, fold: Fold) -> None:
        super().fit(fold)
        self.shared.fit(fold)


class RalmScorer(_RalmFamily):
    """The served score: 0.3·cos(global) + 0.7·cos(local) over the item's centroids, the
    centroids clustered from the seeds in click order by the worker's own code."""

    name = "ralm"

    def scores(self, task: Task) -> np.ndarray:
        from engine.clustering import cluster_clicks
        from models.baselines import ralm_parts
        from models.seed_clusters import window_config

        m, emb = self.shared.model, self.shared.emb
        items = np.repeat(task.items, [len(s) for s in task.seeds])
        users, ts = np.concatenate(task.seeds), np.concatenate(task.seed_ts)
        state = cluster_clicks(window_config(m.config), items, users, ts, emb[users])
        cent, counts = state.stack(task.items, emb.shape[1])
        score = ralm_parts(m, emb, cent, counts).combine(m.config.alpha, m.config.beta).T
        return score + self.shared.prior(task.n)[None]


class RalmAverageScorer(_RalmFamily):
    """RALM with average: cos(E_u, mean of the seeds' transformed embeddings), plus the
    model's activity prior where it has one: only the attention differs from RALM."""

    name = "ralm_average"

    def scores(self, task: Task) -> np.ndarray:
        emb = self.shared.emb
        means = _unit(np.stack([emb[s].mean(0) for s in task.seeds]))
        return means @ _unit(emb).T + self.shared.prior(task.n)[None]


class TowerSeedMeanScorer(_RalmFamily):
    """The YouTube-DNN-style user tower, the item vector the mean of its seeds' universal
    embeddings (cosine, as the tower's softmax was trained)."""

    name = "tower_seed_mean"

    def scores(self, task: Task) -> np.ndarray:
        u = self.shared.universal
        means = _unit(np.stack([u[s].mean(0) for s in task.seeds]))
        return means @ _unit(u).T


def scorers(names: Sequence[str], cfg: RalmConfig, progress: bool = False) -> dict[str, Scorer]:
    """The named models, the RALM family sharing one training per fold."""
    shared = _FoldRalm(cfg, progress)
    family = {"ralm": RalmScorer, "ralm_average": RalmAverageScorer,
              "tower_seed_mean": TowerSeedMeanScorer}
    out: dict[str, Scorer] = {}
    for name in names:
        if name in BASELINES:
            out[name] = BASELINES[name]()
        elif name in family:
            out[name] = family[name](shared)
        else:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return out


MODELS = (*BASELINES, "ralm", "ralm_average", "tower_seed_mean")
#: pairs whose per-fold differences the report gives (model, reference)
PAIRS = (("ralm", "ralm_average"), ("ralm", "seed_mean"), ("ralm", "item_knn"),
         ("ralm", "activity"))


def report(results: Results) -> str:
    """The Markdown report: each metric's table, then the paired per-fold differences."""
    parts = []
    for metric, title in (("prec@10", "audience prec@10"), ("prec@50", "audience prec@50"),
                          ("auc", "audience AUC"), ("user_prec@10", "user view prec@10")):
        parts += [f"### {title} (mean ± std over folds)", "", table(results, metric), ""]
    lines = ["### RALM against each reference: per-fold differences of audience prec@10", "",
             "| pair | " + " | ".join(f"N={n}" for n in results.n_values) + " |",
             "|" + " --- |" * (len(results.n_values) + 1)]
    for a, b in PAIRS:
        if a in results.per_fold and b in results.per_fold:
            cells = []
            for n in results.n_values:
                if n not in results.per_fold[a]:
                    cells.append("")
                    continue
                d = np.array(results.paired(a, b, n, "prec@10"))
                cells.append(f"{d.mean():+.4f} ({(d > 0).sum()}/{len(d)} > 0)")
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(parts + lines) + "\n"


def run(ds: Dataset, names: Sequence[str], cfg: RalmConfig, out_dir: Path, *,
        n_folds: int = 5, fold_seed: int = 0, train_seeds: Sequence[int] = (0,),
        n_values: Sequence[int] = N_VALUES, inner: bool = False, progress: bool = True,
        log: Callable[[str], object] = print) -> Results:
    """Every model on every fold (× training seed for the trained ones): ``audience.json``
    (per fold), ``audience-items.json`` (per item), ``audience.md``, ``audience-prec10.png``."""
    import json

    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    folds = make_folds(ds, n_folds, fold_seed)
    if inner:
        folds = inner_folds(folds, fold_seed)
    results = Results(tuple(n_values))
    trained = {"ralm", "ralm_average", "tower_seed_mean"}
    for ts in train_seeds:
        chosen = [n for n in names if n in trained or ts == train_seeds[0]]
        models = scorers(chosen, cfg.model_copy(update={"seed": ts}))
        for fold in tqdm(folds, desc=f"folds (training seed {ts})", disable=not progress):
            evaluate_fold(fold, models, results, n_values, log)
    (out_dir / "audience.json").write_text(json.dumps({
        "protocol": {"n_folds": n_folds, "fold_seed": fold_seed, "min_raters": MIN_RATERS,
                     "inner": inner,
                     "n_values": list(n_values), "train_seeds": list(train_seeds),
                     "items_per_fold": [len(f.items) for f in folds]},
        "config": cfg.model_dump(), "seconds": results.seconds,
        "per_fold": {m: {str(n): v for n, v in by.items()} for m, by in results.per_fold.items()},
    }, indent=1))
    (out_dir / "audience-items.json").write_text(json.dumps(  # per item, for paired analyses
        {m: {str(n): v for n, v in by.items()} for m, by in results.per_item.items()}))
    (out_dir / "audience.md").write_text(report(results))
    plot(results, out_dir / "audience-prec10.png")
    return results
