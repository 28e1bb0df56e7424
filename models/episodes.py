"""Stage-2 training on the audience task itself: episodes (as in MetaHeac, Zhu et al. 2021).

Why: the paper's stage-2 examples (an item's clickers before a time cut,
against unclicked items) teach the towers to tell items apart for one user.
The engine's task runs the other way: from an item's first N seeds, rank
every other user. Trained the paper's way, RALM's audience ranking was at
chance (AUC 0.52, docs/ralm.md). An episode is that task on training items:

- draw ``episode_items`` training items and a seed count N for each;
- hide those items from every user's history, as a new item is absent from
  them at serving time;
- embed every user with the user tower and the transforming layer, cluster
  each item's first N raters with the worker's own k-means
  (``engine.clustering`` through :class:`models.train_ralm.SeedClusters`),
  and score every user for every item with RALM's attention;
- audience term: per item, a softmax over the users who are not its seeds,
  its later raters the targets; item term (``episode_item_weight``): per
  positive user, a softmax over the episode's items, which keeps the user
  view (each user ranking items).

Both towers learn (the user tower starts from stage 1). Centroids are means
of the seeds' embeddings under a fixed assignment, so the gradient reaches
the seed side as well as the scored side.

Cost: every step embeds and scores every user (943 on ml-100k: ~70 ms a
step on one thread). With millions of users an episode would score its
items' seeds, positives and a sample of the other users instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from models.features import ClickLog, UserBatch
from models.seed_clusters import SeedClusters, window_config
from models.trainer import make_optimiser

if TYPE_CHECKING:
    from engine.data import Dataset
    from models.ralm import RalmConfig, RalmModel

Log = Callable[[str], object]
MIN_RATERS = 3  # an episode item needs a seed and a positive at N = 1, and one to spare


def first_raters(user: np.ndarray, item: np.ndarray, ts: np.ndarray,
                 n_items: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per item, its distinct users by first click (ties in log order), and those times."""
    order = np.lexsort((np.arange(len(ts)), ts, item))  # by item, then time, then log order
    u, i, t = user[order], item[order], ts[order]
    key = i.astype(np.int64) * (int(u.max(initial=0)) + 1) + u
    _, first = np.unique(key, return_index=True)
    first = np.sort(first)  # still by item, then time
    u, i, t = u[first].astype(np.int64), i[first], t[first].astype(np.float64)
    bounds = np.searchsorted(i, np.arange(n_items + 1))
    return ([u[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
            [t[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


@dataclass(frozen=True)
class Episode:
    """Items (dense), their seeds (first N raters, with times) and positives (later raters)."""

    items: np.ndarray
    seeds: list[np.ndarray]
    seed_ts: list[np.ndarray]
    positives: list[np.ndarray]


class EpisodeData:
    """What episodes draw from: every user's history as of the end of training (catalogue
    rows, so items can be hidden), profiles, and each item's raters in order."""

    def __init__(self, clicks: ClickLog, dataset: Dataset, cfg: RalmConfig):
        self.features = clicks.features
        self.n_users = len(dataset.users.ids)
        everyone = np.arange(self.n_users)
        ends = clicks.indptr[1:]
        self.rows = clicks.windows(everyone, ends)  # [U, L]
        self.categorical = clicks.profile_cat
        self.continuous = self.features.continuous(clicks.age, ends - clicks.indptr[:-1])
        self.activity = torch.from_numpy(np.log1p(np.diff(clicks.indptr)).astype(np.float32))
        self.item_rows = self.features.catalog_rows(dataset.items.ids)  # dense item -> row
        self.raters, self.rated_at = first_raters(dataset.user, dataset.item, dataset.ts,
                                                  len(dataset.items.ids))
        self.eligible = np.flatnonzero([len(r) >= MIN_RATERS for r in self.raters])
        self.seed_counts = np.asarray(cfg.episode_seeds, np.int64)
        self.window = window_config(cfg)

    def sample(self, n_items: int, rng: np.random.Generator) -> Episode:
        """Distinct eligible items, each with N drawn from the seed counts below its raters."""
        items = rng.choice(self.eligible, size=min(n_items, len(self.eligible)), replace=False)
        seeds, seed_ts, positives = [], [], []
        for i in items:
            r = self.raters[i]
            allowed = self.seed_counts[self.seed_counts < len(r)]
            n = int(rng.choice(allowed)) if len(allowed) else 1
            seeds.append(r[:n])
            seed_ts.append(self.rated_at[i][:n])
            positives.append(r[n:])
        return Episode(items, seeds, seed_ts, positives)

    def batch_without(self, items: np.ndarray) -> UserBatch:
        """Every user, the episode's items hidden from their histories."""
        rows = np.where(np.isin(self.rows, self.item_rows[items]), 0, self.rows)
        return self.features.batch(self.categorical, self.continuous, rows)


def _masks(ep: Episode, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, U] seeds and positives of each episode item."""
    seed = torch.zeros((len(ep.items), n_users), dtype=torch.bool)
    pos = torch.zeros_like(seed)
    for b, (s, p) in enumerate(zip(ep.seeds, ep.positives, strict=True)):
        seed[b, torch.from_numpy(s)] = True
        pos[b, torch.from_numpy(p)] = True
    return seed, pos


def episode_logits(model: RalmModel, data: EpisodeData, ep: Episode) -> torch.Tensor:
    """[B, U] audience logits τ·score (+ γ·log(1 + clicks)) of every user for the items."""
    z = model.lookalike.transform(model.user_tower(data.batch_without(ep.items)))
    items = np.repeat(ep.items, [len(s) for s in ep.seeds])
    clusters = SeedClusters(np.concatenate(ep.seeds), items, np.concatenate(ep.seed_ts),
                            int(ep.items.max()) + 1, data.n_users, data.window)
    clusters.recluster(z.detach().numpy())
    cent, mask = clusters.centroids(z, ep.items)
    tower = model.lookalike
    n_seeds = torch.tensor([float(len(s)) for s in ep.seeds])[:, None]
    logits = tower.scale(n_seeds) * tower.score_all(z, cent, mask).T
    prior = getattr(tower, "prior", None)
    return logits if prior is None else logits + prior * data.activity[None]


def episode_loss(logits: torch.Tensor, seed: torch.Tensor, pos: torch.Tensor,
                 item_weight: float) -> torch.Tensor:
    """Audience softmax over users (+ ``item_weight`` × softmax over items per user)."""
    masked = logits.masked_fill(seed, -1e9)
    per_item = -(torch.log_softmax(masked, 1) * pos).sum(1) / pos.sum(1).clamp(min=1)
    loss = per_item.mean()
    if item_weight:
        per_user = torch.log_softmax(masked, 0)
        loss = loss + item_weight * -(per_user * pos).sum() / pos.sum().clamp(min=1)
    return loss


def train_episodes(model: RalmModel, clicks: ClickLog, dataset: Dataset, cfg: RalmConfig,
                   rng: np.random.Generator, *, progress: bool = True,
                   log: Log = print) -> list[float]:
    """Stage 2 by episodes; the mean loss over each tenth of them."""
    data = EpisodeData(clicks, dataset, cfg)
    if not len(data.eligible):
        raise ValueError(f"no training item has {MIN_RATERS} raters: nothing to draw episodes "
                         "from")
    params = [*model.user_tower.parameters(), *model.lookalike.parameters()]
    opt = make_optimiser(params, "adam", cfg.lookalike_lr or cfg.lr)
    model.user_tower.train()
    model.lookalike.train()
    losses, running = [], []
    chunk = max(1, cfg.episode_steps // 10)
    for step in tqdm(range(cfg.episode_steps), desc="episodes", disable=not progress):
        ep = data.sample(cfg.episode_items, rng)
        seed, pos = _masks(ep, data.n_users)
        loss = episode_loss(episode_logits(model, data, ep), seed, pos, cfg.episode_item_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running.append(float(loss.detach()))
        if len(running) == chunk or step == cfg.episode_steps - 1:
            losses.append(float(np.mean(running)))
            running = []
            log(f"episodes {step + 1}/{cfg.episode_steps}: loss {losses[-1]:.4f}")
    model.user_tower.eval()
    model.lookalike.eval()
    return losses
