"""The default-pipeline study scores users as the scoring worker's pipelines rank them."""

import numpy as np
import pytest

from consumers.pipelines import Pool, rank_user, top_unseen
from engine.config import PipelineConfig
from lookalike.experiments.default_pipeline import served_scores


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0])
def test_served_scores_rank_as_the_worker_does(w: float) -> None:
    rng = np.random.default_rng(0)
    users, cands, per_source = 6, 40, 8
    ralm, cos = rng.normal(size=(users, cands)), rng.normal(size=(users, cands))
    n_seeds = rng.integers(1, 30, size=cands)
    seen = rng.random((users, cands)) < 0.2
    got = served_scores(ralm, cos, n_seeds, seen, w, per_source)
    p = (PipelineConfig() if w == 0 else
         PipelineConfig(sources=["ralm", "popular"], ranker="blend",
                        blend={"ralm": 1.0, "popular": w}))
    by_seeds = np.argsort(-n_seeds, kind="stable")
    for u in range(users):
        s = set(np.flatnonzero(seen[u]).tolist())
        pool = Pool()
        pool.add("ralm", top_unseen(np.arange(cands), cos[u], s, per_source))
        if w:
            pool.add("popular", top_unseen(by_seeds, None, s, per_source))
        items = np.array(pool.items)
        terms = {"ralm": ralm[u, items], "popular": np.log1p(n_seeds[items].astype(float))}
        want = [i for i, _ in rank_user(p, pool, 10, terms, False, None, None).items]
        finite = np.flatnonzero(np.isfinite(got[u]))
        assert set(finite.tolist()) == set(pool.items)  # the same pool
        mine = finite[np.argsort(-got[u][finite], kind="stable")][:10].tolist()
        assert mine == want
