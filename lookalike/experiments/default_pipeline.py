"""Which pipeline serves requests that name none: chosen by measurement.

Why: a newcomer's first recommendations come from the default pipeline, and
on the time split of ml-100k (the protocol of docs/ralm.md) most test users
are new (profile only), where popularity is hard to beat. The candidates are
RALM alone and blends of RALM with popularity, each scored as the scoring
worker serves it (``consumers/pipelines.py``): per user, a pool of each
source's best ``per_source`` unseen items (RALM: cosine to the items' global
vectors; popular: seed count), then the blend of standardised terms over that
pool (RALM's score, log(1 + seeds)). The popularity weight is chosen on a
validation split carved from the training period (its own 0.8 time quantile);
the test split is scored once, with the chosen weight.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from consumers.pipelines import standardised
from models.evaluate_lookalike import Protocol, score_matrix, user_view
from models.ralm import RalmConfig
from models.train_ralm import fit_ralm, validation_split

if TYPE_CHECKING:
    from engine.data import Dataset
    from models.ralm import RalmModel

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # popularity's weight against RALM's 1
PER_SOURCE = 200  # PipelineConfig.per_source


def _top_unseen(order: np.ndarray, seen: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` columns of ``order`` the user has not seen."""
    keep = order[~seen[order]]
    return keep[:n]


def served_scores(ralm: np.ndarray, global_cos: np.ndarray, n_seeds: np.ndarray,
                  seen: np.ndarray, popular_weight: float,
                  per_source: int = PER_SOURCE) -> np.ndarray:
    """[U, C] what each user's default pipeline ranks by (-inf: not in the pool).

    ``popular_weight`` 0: RALM alone (source ralm, ranker ralm); else sources
    ralm + popular, ranker blend {ralm: 1, popular: w}.
    """
    out = np.full(ralm.shape, -np.inf)
    by_seeds = np.argsort(-n_seeds, kind="stable")
    pop = np.log1p(n_seeds.astype(np.float64))
    for u in range(len(ralm)):
        pool = _top_unseen(np.argsort(-global_cos[u], kind="stable"), seen[u], per_source)
        if popular_weight == 0:
            out[u, pool] = ralm[u, pool]
            continue
        pool = np.union1d(pool, _top_unseen(by_seeds, seen[u], per_source))
        out[u, pool] = standardised(ralm[u, pool]) + popular_weight * standardised(pop[pool])
    return out


def _terms(model: RalmModel, proto: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """RALM's score and the global-vector cosine of every test user × candidate."""
    sm = score_matrix(model, proto.train, proto.users)
    assert np.array_equal(sm["candidates"], proto.candidates)  # the same seed windows
    users = sm["embeddings"]
    unit = users / np.maximum(np.linalg.norm(users, axis=1, keepdims=True), 1e-12)
    return sm["scores"], unit @ sm["item_global"].T


def _prec(model: RalmModel, proto: Protocol, weights: Sequence[float]) -> dict[float, float]:
    ralm, cos = _terms(model, proto)
    n_seeds = proto.n_seeds
    return {w: user_view("", served_scores(ralm, cos, n_seeds, proto.seen, w), proto.seen,
                         proto.clicked, (10,))["prec@10"] for w in weights}


def choose(ds: Dataset, cfg: RalmConfig, out_dir: Path, *, weights: Sequence[float] = WEIGHTS,
           split: float = 0.8, progress: bool = True,
           log: Callable[[str], object] = print) -> dict:
    """Train RALM on the validation split's fit part and pick the weight there; train on
    the whole training part and score the test split with RALM alone, popularity alone
    and the chosen blend. Writes ``default-pipeline.json``."""
    train, test = ds.time_split(split)
    fit, valid = validation_split(train)
    quiet = {"progress": progress, "log": lambda *_: None}
    val = _prec(fit_ralm(fit, cfg, **quiet), Protocol.build(fit, valid, cfg.max_seeds),
                weights)
    best = max(weights, key=lambda w: (val[w], -w))
    log(f"validation prec@10 by popularity weight: {val}; chosen {best}")
    proto = Protocol.build(train, test, cfg.max_seeds)
    got = _prec(fit_ralm(train, cfg, **quiet), proto, sorted({0.0, best}))
    pop = user_view("", np.broadcast_to(proto.n_seeds.astype(float), proto.seen.shape),
                    proto.seen, proto.clicked, (10,))["prec@10"]
    result = {"validation": {str(w): v for w, v in val.items()}, "chosen_weight": best,
              "test": {"ralm": got[0.0], "blend": got[best], "popularity": pop},
              "config": cfg.model_dump(), "split": split, "per_source": PER_SOURCE}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "default-pipeline.json").write_text(json.dumps(result, indent=1))
    log(f"test prec@10: RALM {got[0.0]:.4f}, blend (popularity weight {best}) "
        f"{got[best]:.4f}, popularity {pop:.4f}")
    return result
