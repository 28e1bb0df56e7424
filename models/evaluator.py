"""Top-K evaluation of any `Recommender`: full ranking or sampled negatives, per-user metrics.

Why one evaluator: figures from different models are comparable only when the same
code ranks, masks and counts. Two protocols:

- full ranking: every item is a candidate (RecBole's ``full``);
- sampled: the target against `negatives` items drawn uniformly (the SASRec paper's
  100, RecBole's ``uni100``), for single-target sets (leave-one-out).

Two switches change the numbers and are therefore explicit (docs/models.md):
`mask_history` removes the items the user already clicked from the candidates (the
paper and RecBole's general models do; RecBole's sequential models do not), and
`exclude_history` draws sampled negatives outside the history (the paper's code) rather
than only outside the target (RecBole).

Metrics at each K: hit (HR), recall, precision, NDCG (binary relevance) and MRR
(reciprocal rank of the first hit, 0 beyond K). Every user's value is kept, so a
confidence interval (`confidence_interval`) or a paired test can be computed later.
Ties: with one target, its rank counts every other candidate scoring at least as much
(pessimistic, so a constant model scores 0); with several, `torch.topk` decides.

Example:
    >>> import numpy as np
    >>> m = metrics_from_hits(np.array([[False, True, False]]), np.array([1]), ks=(1, 3))
    >>> round(float(m["ndcg@3"][0]), 4), float(m["mrr@3"][0]), float(m["hit@1"][0])
    (0.6309, 0.5, 0.0)

References:
    Kang & McAuley, *Self-Attentive Sequential Recommendation*, ICDM 2018 (sampled
    protocol). Krichene & Rendle, *On Sampled Metrics for Item Recommendation*, KDD 2020
    (why the full-ranking figure is reported beside it).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.splits import EvalSet

if TYPE_CHECKING:
    from models.recommender import Recommender

METRICS = ("hit", "recall", "precision", "ndcg", "mrr")


@dataclass(frozen=True)
class Protocol:
    """How candidates are formed and masked."""

    negatives: int | None = None  # None: full ranking; else sampled negatives per user
    mask_history: bool = False
    exclude_history: bool = False  # sampled negatives avoid the history, not only the target
    seed: int = 0  # of the negative sampling

    @property
    def name(self) -> str:
        base = "full" if self.negatives is None else f"uni{self.negatives}"
        return base + ("-masked" if self.mask_history else "") + (
            "-nohist" if self.negatives is not None and self.exclude_history else "")


# The protocols by name; the sequential ones RecBole's way and the SASRec paper's way
# (docs/models.md).
PROTOCOLS: dict[str, dict[str, Protocol]] = {
    "loo-full": {"recbole": Protocol(None, mask_history=False),
                 "paper": Protocol(None, mask_history=True)},
    "loo-uni100": {"recbole": Protocol(100, mask_history=False, exclude_history=False),
                   "paper": Protocol(100, mask_history=True, exclude_history=True)},
    # general CF on the random 8:1:1 split: full ranking, known clicks masked (both agree)
    "ro-full": {"recbole": Protocol(None, mask_history=True)},
    # strong generalization (held-out users, fold-in 80%): full ranking, the fold-in clicks
    # masked, as Mult-VAE's code; RecBole has no such protocol, so only the paper's variant
    "sg-full": {"paper": Protocol(None, mask_history=True)},
}
_PREFIX = {"loo": "loo-", "random": "ro-", "strong": "sg-"}


def protocols_for(split: str) -> list[str]:
    """The protocol names that apply to a split ("loo", "random" or "strong")."""
    return [p for p in PROTOCOLS if p.startswith(_PREFIX.get(split, "ro-"))]


@dataclass
class EvalResult:
    """Per-user metric values (one array per ``metric@K``) and how they were obtained."""

    protocol: Protocol
    users: np.ndarray
    per_user: dict[str, np.ndarray] = field(default_factory=dict)

    def mean(self) -> dict[str, float]:
        return {name: float(v.mean()) if len(v) else float("nan")
                for name, v in self.per_user.items()}

    def summary(self, method: str = "normal", level: float = 0.95) -> dict[str, dict[str, float]]:
        """``{metric: {"mean", "low", "high"}}`` with a `level` confidence interval."""
        out = {}
        for name, v in self.per_user.items():
            low, high = confidence_interval(v, method=method, level=level)
            out[name] = {"mean": float(v.mean()), "low": low, "high": high}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol.name, "settings": self.protocol.__dict__,
                "users": len(self.users), "metrics": self.mean(), "ci95": self.summary()}


def evaluate_protocol(model: Recommender, data: EvalSet, protocol: str,
                      ks: Sequence[int] = (5, 10, 20), seed: int = 0) -> dict[str, EvalResult]:
    """Both variants (RecBole's and the paper's) of a named protocol in `PROTOCOLS`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return {variant: evaluate(model, data, replace(p, seed=seed), ks)
            for variant, p in PROTOCOLS[protocol].items()}


def evaluate(model: Recommender, data: EvalSet, protocol: Protocol | None = None,
             ks: Sequence[int] = (10,), batch_size: int = 256) -> EvalResult:
    """Rank each user's candidates with `model` and measure every metric at every K."""
    protocol = protocol or Protocol()
    ks = tuple(sorted(set(ks)))
    if protocol.negatives is not None and not data.single_target:
        raise ValueError("sampled negatives need one target per user (leave-one-out)")
    gen = torch.Generator().manual_seed(protocol.seed)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(data), batch_size):
        rows = np.arange(start, min(start + batch_size, len(data)))
        history = data.history.rows(rows)
        targets = data.targets.rows(rows)
        scores = model.score_many(history, users=data.users[rows]).float()
        hits = _hits(scores, history, targets, protocol, max(ks), gen)
        parts.append(metrics_from_hits(hits, np.array([len(t) for t in targets]), ks))
    per_user = {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0)
                for name in _names(ks)}
    return EvalResult(protocol, data.users, per_user)


def _hits(scores: torch.Tensor, history: list[np.ndarray], targets: list[np.ndarray],
          protocol: Protocol, k_max: int, gen: torch.Generator) -> np.ndarray:
    """(B, k_max) bool: whether the candidate at each of the top positions is a target."""
    n_items = scores.shape[1]
    seen = _row_mask(history, n_items)
    target = _row_mask(targets, n_items)
    if protocol.mask_history:
        scores = scores.masked_fill(seen & ~target, -torch.inf)
    if len(targets) and all(len(t) == 1 for t in targets):
        t = torch.from_numpy(np.concatenate(targets))
        cand = (torch.ones_like(seen) if protocol.negatives is None
                else _sampled(seen, t, protocol, gen))
        if protocol.mask_history:
            cand &= ~seen | target
        rank = _pessimistic_rank(scores, t, cand)
        hits = torch.zeros(len(t), k_max + 1, dtype=torch.bool)
        hits[torch.arange(len(t)), rank.clamp(max=k_max)] = True
        return hits[:, :k_max].numpy()
    top = torch.topk(scores, min(k_max, n_items)).indices
    hits = target.gather(1, top) & torch.isfinite(scores.gather(1, top))
    pad = torch.zeros(len(top), k_max - top.shape[1], dtype=torch.bool)
    return torch.cat([hits, pad], dim=1).numpy()


def _row_mask(rows: list[np.ndarray], n_items: int) -> torch.Tensor:
    mask = torch.zeros(len(rows), n_items, dtype=torch.bool)
    lengths = [len(r) for r in rows]
    if sum(lengths):
        r = torch.from_numpy(np.repeat(np.arange(len(rows)), lengths))
        mask[r, torch.from_numpy(np.concatenate(rows))] = True
    return mask


def _sampled(seen: torch.Tensor, target: torch.Tensor, protocol: Protocol,
             gen: torch.Generator) -> torch.Tensor:
    """(B, n_items) bool candidates: the target and up to `negatives` uniform draws.

    Draws are with replacement (as in both reference codes), so a user may have fewer
    than `negatives` distinct negatives; excluded items are redrawn.
    """
    b, n_items = seen.shape
    excluded = torch.zeros_like(seen)
    excluded[torch.arange(b), target] = True
    if protocol.exclude_history:
        excluded |= seen
    if bool(excluded.all(dim=1).any()):
        raise ValueError("a user has no item left to sample as a negative")
    assert protocol.negatives is not None
    draws = torch.randint(n_items, (b, protocol.negatives), generator=gen)
    bad = excluded.gather(1, draws)
    while bool(bad.any()):
        draws[bad] = torch.randint(n_items, (int(bad.sum()),), generator=gen)
        bad = excluded.gather(1, draws)
    cand = torch.zeros_like(seen)
    cand[torch.arange(b).unsqueeze(1), draws] = True
    cand[torch.arange(b), target] = True
    return cand


def _pessimistic_rank(scores: torch.Tensor, target: torch.Tensor,
                      cand: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among its candidates; ties count against the target."""
    s = scores.gather(1, target.unsqueeze(1))
    ahead = (scores >= s) & cand
    ahead[torch.arange(len(target)), target] = False
    return ahead.sum(dim=1)


def metrics_from_hits(hits: np.ndarray, n_targets: np.ndarray,
                      ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-user ``metric@K`` from a (B, >=max K) hit matrix and each user's target count."""
    hits = np.asarray(hits, dtype=bool)
    n_targets = np.asarray(n_targets, dtype=np.float64)
    discount = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    ideal = np.concatenate([[0.0], np.cumsum(discount)])
    out = {}
    for k in ks:
        h = hits[:, :k]
        found = h.sum(axis=1)
        first = np.where(h.any(axis=1), h.argmax(axis=1) + 1, np.inf)
        out[f"hit@{k}"] = (found > 0).astype(np.float64)
        out[f"recall@{k}"] = found / np.maximum(n_targets, 1)
        out[f"precision@{k}"] = found / k
        out[f"ndcg@{k}"] = (h * discount[:k]).sum(axis=1) / np.maximum(
            ideal[np.minimum(n_targets, k).astype(int)], 1e-12)
        out[f"mrr@{k}"] = 1.0 / first
    return out


def _names(ks: Sequence[int]) -> list[str]:
    return [f"{m}@{k}" for k in ks for m in METRICS]


def mean_std(values: Sequence[float]) -> str:
    """"mean ± std" over seeds (sample std; 0 for one value): every results table's cell."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def confidence_interval(values: np.ndarray, method: str = "normal", level: float = 0.95,
                        n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """A `level` interval for the mean of per-user values: normal approximation or bootstrap."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    if method == "normal":
        half = NormalDist().inv_cdf(0.5 + level / 2) * v.std(ddof=1) / np.sqrt(len(v))
        return float(v.mean() - half), float(v.mean() + half)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
        tail = (1 - level) / 2
        return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
    raise ValueError(f"method must be 'normal' or 'bootstrap', got {method!r}")
