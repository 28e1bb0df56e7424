"""Offline training of RALM, in the paper's two stages.

Stage 1, user tower: multi-class classification over items. Each user gives
up to ``positives_per_user`` examples, their most recent training clicks; an
example's input is the user as they were just before that click (profile,
the clicks before it, activity so far). The softmax over all D items is
replaced by a sampled softmax with log-uniform negatives (:class:`LogUniformSampler`).

Stage 2, look-alike tower, user tower frozen. Without leaking the future
into the seeds: inside the training split an inner cut (``inner_cut``
quantile of time) separates the past, whose clickers are each item's seeds,
from the future, whose clicks are the positives; every user is embedded as
of the cut. Negatives are seeded items the user never clicked, drawn
uniformly (default; ``lookalike_sampling`` also offers by seed count, the
paper's impression-like negatives, or half of each: on ml-100k validation
uniform was best, since it is what teaches the tower that rarely seeded
items are rarely clicked). Each
epoch first re-clusters every item's seeds with the current transforming
layer (the paper's iterative training: k-means inside the training loop),
by the clustering worker's own windowed k-means on the seeds in time order,
then fits the towers' attention and the pCTR logit with binary cross-entropy.

Determinism: ``torch.manual_seed(cfg.seed)`` for the weights and one numpy
Generator for every sample, on ``cfg.threads`` torch threads.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.checkpoint import make_version
from models.features import ClickLog, FeatureSpace
from models.ralm import KIND, LookalikeTower, RalmConfig, RalmModel, UserTower
from models.seed_clusters import SeedClusters, window_config
from models.trainer import make_optimiser

if TYPE_CHECKING:
    from engine.data import Dataset

Log = Callable[[str], object]
LATEST = "LATEST"


# ---------------------------------------------------------------- sampling


class LogUniformSampler:
    """Negatives over items ranked by training frequency (rank 0 = most clicked).

    p(k) = (log(k+2) − log(k+1)) / log(D+1), the Zipfian proposal of
    word2vec/TF's ``log_uniform_candidate_sampler``: its CDF is
    log(k+2)/log(D+1), so k = ⌊(D+1)^U⌋ − 1 for U ~ Uniform[0, 1).
    """

    def __init__(self, n: int, rng: np.random.Generator):
        if n < 1:
            raise ValueError("need at least one item to sample")
        self.n = n
        self.rng = rng
        self._log_n1 = math.log(n + 1)

    def probs(self) -> np.ndarray:
        """[D] p(k) for every rank."""
        k = np.arange(self.n, dtype=np.float64)
        return (np.log(k + 2) - np.log(k + 1)) / self._log_n1

    def log_prob(self, ranks: np.ndarray) -> np.ndarray:
        """log p(k) elementwise."""
        k = np.asarray(ranks, np.float64)
        return np.log(np.log1p(1.0 / (k + 1)) / self._log_n1)

    def sample(self, shape: tuple[int, ...]) -> np.ndarray:
        """Ranks (int64) drawn i.i.d. from p."""
        u = self.rng.random(shape)
        return np.minimum(np.floor(np.exp(u * self._log_n1)).astype(np.int64) - 1, self.n - 1)


def sampled_softmax_loss(
    logits: torch.Tensor, log_q: torch.Tensor, accidental: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the true item (column 0) against sampled negatives.

    logits [B, 1+S] (column 0 the positive), log_q [B, 1+S] log sampling
    probability of each candidate, accidental [B, 1+S] True where a negative
    equals the positive. Subtracting log Q (the logQ correction of Bengio &
    Senécal / Jean et al.) makes the sampled softmax an unbiased-in-the-limit
    estimate of the full softmax: without it, popular items, sampled often as
    negatives, would be pushed down too hard. Accidental hits are removed.
    """
    corrected = (logits - log_q).masked_fill(accidental, -1e9)
    return F.cross_entropy(corrected, torch.zeros(len(logits), dtype=torch.long))


# ---------------------------------------------------------------- helpers


def _batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled index batches over n examples."""
    order = rng.permutation(n)
    for start in range(0, n, size):
        yield order[start:start + size]


def _bar(n: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=n, desc=desc, unit="ex", leave=False, disable=not progress)


def _run_epoch(n: int, size: int, rng: np.random.Generator, opt: torch.optim.Optimizer,
               loss_of: Callable[[np.ndarray], torch.Tensor], desc: str, progress: bool) -> float:
    """One pass over n examples in shuffled mini-batches; the mean loss per example."""
    total, bar = 0.0, _bar(n, desc, progress)
    for idx in _batches(n, size, rng):
        loss = loss_of(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        bar.update(len(idx))
    bar.close()
    return total / max(n, 1)


def user_examples(clicks: ClickLog, per_user: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 examples: (user, absolute click position) of each user's last ``per_user`` clicks."""
    counts = np.diff(clicks.indptr)
    n = np.minimum(counts, per_user)
    users = np.repeat(np.arange(len(counts)), n)
    first = np.repeat(clicks.indptr[1:] - n, n)
    offset = np.arange(len(users)) - np.repeat(np.cumsum(n) - n, n)
    return users, first + offset


@torch.no_grad()
def universal_at(
    tower: UserTower, clicks: ClickLog, users: np.ndarray, ends: np.ndarray, batch: int = 1024
) -> torch.Tensor:
    """[len(users), m] universal embeddings of users as of absolute positions ``ends``."""
    tower.eval()
    out = [tower(clicks.encode(users[s:s + batch], ends[s:s + batch]))
           for s in range(0, len(users), batch)]
    return torch.cat(out) if out else torch.zeros((0, tower.mlp[-1].out_features))


def item_seeds(
    user: np.ndarray, item: np.ndarray, ts: np.ndarray, n_items: int, max_seeds: int
) -> list[np.ndarray]:
    """Per dense item, its distinct clickers, most recent ``max_seeds`` (newest last).

    Mirrors the online seed window: a user counts once, at their latest click.
    """
    order = np.lexsort((ts, item))
    user, item = user[order], item[order]
    bounds = np.searchsorted(item, np.arange(n_items + 1))
    seeds = []
    for i in range(n_items):
        us = user[bounds[i]:bounds[i + 1]][::-1]
        _, first = np.unique(us, return_index=True)  # latest click of each user
        seeds.append(us[np.sort(first)][:max_seeds][::-1].copy())
    return seeds


def train_user_tower(
    tower: UserTower,
    clicks: ClickLog,
    cfg: RalmConfig,
    rng: np.random.Generator,
    *,
    progress: bool = True,
    log: Log = print,
) -> list[float]:
    """Sampled-softmax training of the user tower; returns the mean loss per epoch."""
    features = clicks.features
    users, ends = user_examples(clicks, cfg.positives_per_user)
    targets = features.item_of_rows(clicks.rows[ends])
    keep = targets > 0
    users, ends, targets = users[keep], ends[keep], targets[keep]
    sampler = LogUniformSampler(features.n_items, rng)
    opt = make_optimiser(tower.parameters(), "adam", cfg.lr)
    losses: list[float] = []

    def loss_of(idx: np.ndarray) -> torch.Tensor:
        pos = targets[idx]
        neg_ranks = sampler.sample((len(idx), cfg.negatives))
        cands = np.concatenate([pos[:, None], neg_ranks + 1], axis=1)  # rank r -> index r+1
        log_q = torch.from_numpy(sampler.log_prob(cands - 1)).float()
        accidental = torch.from_numpy(cands == pos[:, None])
        accidental[:, 0] = False
        u = tower(clicks.encode(users[idx], ends[idx]))
        return sampled_softmax_loss(tower.output(u, torch.from_numpy(cands)), log_q, accidental)

    for epoch in range(cfg.user_epochs):
        tower.train()
        desc = f"user tower {epoch + 1}/{cfg.user_epochs}"
        losses.append(_run_epoch(len(users), cfg.batch_size, rng, opt, loss_of, desc, progress))
        log(f"user tower epoch {epoch + 1}/{cfg.user_epochs}: loss {losses[-1]:.4f}")
    tower.eval()
    return losses


# ---------------------------------------------------------------- stage 2


class LookalikeData:
    """Stage-2 data: frozen embeddings of seeds and of queries, positives, negatives.

    Two ways to build it (``RalmConfig.lookalike_examples``):

    - ``"inner_cut"``: an inner cut (``inner_cut`` quantile of time) splits
      the training period; clickers before it are the seeds, clicks after it
      the positives, and every user (seed or query) is embedded as of the cut.
    - ``"leave_out"``: every training click is a positive; the query is the
      user as they were just before that click, and the item's seeds are all
      its training clickers but that user, embedded as of the end of
      training. This is the test-time situation (the seeds are the item's
      window, the scored user has not clicked it yet) on all 80k clicks
      instead of the 20% after an inner cut, and it includes users with no
      history yet, as are most of a time split's test users.

    ``queries`` [Q, m] are the scored side's universal embeddings and
    ``query_user`` [Q] whose they are; the seed side is ``universal`` [n_users, m].
    """

    def __init__(self, tower: UserTower, clicks: ClickLog, dataset: Dataset, cfg: RalmConfig):
        n_users, n_items = len(dataset.users.ids), len(dataset.items.ids)
        self.n_items = n_items
        self.leave_out = cfg.lookalike_examples == "leave_out"
        everyone = np.arange(n_users)
        if self.leave_out:
            seeds = item_seeds(dataset.user, dataset.item, dataset.ts, n_items, cfg.max_seeds)
            self.universal = universal_at(tower, clicks, everyone, clicks.indptr[1:])
            pos = np.arange(len(clicks.user))
            self.query_user = clicks.user.astype(np.int64)
            self.queries = universal_at(tower, clicks, self.query_user, pos)
            sole = np.array([len(s) == 1 for s in seeds])  # nobody left once the clicker is out
            keep = ~sole[clicks.dense_item]
            self.pos_query, self.pos_item = pos[keep], clicks.dense_item[keep].astype(np.int64)
        else:
            cut = float(np.quantile(dataset.ts, cfg.inner_cut))
            self.universal = universal_at(tower, clicks, everyone,
                                          clicks.position_before(everyone, cut))
            self.queries, self.query_user = self.universal, everyone
            past = dataset.ts < cut
            seeds = item_seeds(dataset.user[past], dataset.item[past], dataset.ts[past],
                               n_items, cfg.max_seeds)
            has_seeds = np.array([len(s) > 0 for s in seeds])
            future = ~past & has_seeds[dataset.item]
            self.pos_query, self.pos_item = dataset.user[future], dataset.item[future]
        used = np.ones(len(dataset.user), bool) if self.leave_out else past
        self.clusters = SeedClusters(dataset.user[used], dataset.item[used], dataset.ts[used],
                                     n_items, n_users, window_config(cfg))
        self.seeded = np.flatnonzero([len(s) > 0 for s in seeds])
        self.clicked = np.unique(dataset.user.astype(np.int64) * n_items + dataset.item)
        n_seeds = np.array([len(seeds[i]) for i in self.seeded], np.float64)
        self.popularity = n_seeds / n_seeds.sum() if len(n_seeds) else n_seeds
        self.sampling = cfg.lookalike_sampling
        self.negative_side = cfg.lookalike_negative_side
        self.user_sampling = cfg.lookalike_user_sampling
        clicks_of = np.bincount(dataset.user, minlength=n_users)[self.query_user].astype(float)
        self.query_weight = (clicks_of + 1.0) / (clicks_of + 1.0).sum()

    @property
    def n_positives(self) -> int:
        return len(self.pos_query)

    def negatives(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` seeded items: uniform, proportional to seed count, or half and half."""
        if self.sampling == "uniform":
            return self.seeded[rng.integers(len(self.seeded), size=n)]
        by_pop = rng.choice(self.seeded, size=n, p=self.popularity)
        if self.sampling == "popularity":
            return by_pop
        uniform = self.seeded[rng.integers(len(self.seeded), size=n)]
        return np.where(rng.random(n) < 0.5, uniform, by_pop)

    def user_negatives(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` queries: uniform, by their user's training clicks (+1), or half and half."""
        uniform = rng.integers(len(self.query_user), size=n)
        if self.user_sampling == "uniform":
            return uniform
        by_activity = rng.choice(len(self.query_user), size=n, p=self.query_weight)
        if self.user_sampling == "activity":
            return by_activity
        return np.where(rng.random(n) < 0.5, uniform, by_activity)

    def _redraw(self, new_item: np.ndarray, new_user: np.ndarray, items: np.ndarray,
                queries: np.ndarray, rng: np.random.Generator) -> None:
        """New items where ``new_item``, new users where ``new_user`` (no draw for an
        empty side: the random stream of a one-sided setting stays as it was)."""
        if new_item.any():
            items[new_item] = self.negatives(int(new_item.sum()), rng)
        if new_user.any():
            queries[new_user] = self.user_negatives(int(new_user.sum()), rng)

    def examples(
        self, n_neg: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positives plus ``n_neg`` negatives each: queries, items, labels.

        A negative keeps the positive's query and takes an unclicked seeded
        item (``negative_side="item"``), or keeps the item and takes another
        query whose user never clicked it (``"user"``: the paper's contrast,
        an item's clickers against users who did not click it); ``"both"``
        draws each negative's side at random, half and half.
        """
        queries = np.repeat(self.pos_query, n_neg)
        items = np.repeat(self.pos_item, n_neg)
        # which negatives change the item (the rest change the user)
        item_side = np.full(len(queries), self.negative_side == "item")
        if self.negative_side == "both":
            item_side = rng.random(len(queries)) < 0.5
        self._redraw(item_side, ~item_side, items, queries, rng)
        for _ in range(10):  # resample the few negatives the user did click
            hit = np.isin(self.query_user[queries].astype(np.int64) * self.n_items + items,
                          self.clicked)
            if not hit.any():
                break
            self._redraw(hit & item_side, hit & ~item_side, items, queries, rng)
        labels = np.concatenate([np.ones(len(self.pos_query)), np.zeros(len(queries))])
        return (np.concatenate([self.pos_query, queries]), np.concatenate([self.pos_item, items]),
                labels.astype(np.float32))


def _scores(tower: LookalikeTower, data: LookalikeData, queries: np.ndarray,
            items: np.ndarray) -> torch.Tensor:
    """[B] look-alike scores of (query, item) pairs with the current clusters."""
    z = tower.transform(data.universal)  # [n_users, h]: the seed side
    zq = tower.transform(data.queries[torch.from_numpy(queries)])
    if data.leave_out:  # every pair has its own seed set
        cent, mask = data.clusters.centroids(z, items, exclude=data.query_user[queries])
        g = tower.global_attention(cent, mask)[:, None]
        return tower.score(zq, cent[:, None], mask[:, None], g).squeeze(1)
    uniq, inv = np.unique(items, return_inverse=True)
    cent, mask = data.clusters.centroids(z, uniq)
    inv_t = torch.from_numpy(inv.reshape(-1))
    g = tower.global_attention(cent, mask)[inv_t][:, None]
    return tower.score(zq, cent[inv_t][:, None], mask[inv_t][:, None], g).squeeze(1)


@torch.no_grad()
def _calibrate_bias(tower: LookalikeTower, data: LookalikeData, users: np.ndarray,
                    items: np.ndarray, labels: np.ndarray, n: int = 4096) -> None:
    """Start the pCTR logit at the base rate: b = logit(mean label) − τ·mean score.

    With b = 0 every pair starts near pCTR ≈ sigmoid(τ·cos) ≫ the base rate,
    and the quickest way down for non-negative (ReLU) embeddings is to zero
    them: most of the transforming layer died in the first epoch.
    """
    pick = np.linspace(0, len(users) - 1, min(n, len(users))).astype(np.int64)
    p = float(np.clip(labels.mean(), 1e-6, 1 - 1e-6))
    mean_score = float(_scores(tower, data, users[pick], items[pick]).mean())
    tower.bias.fill_(math.log(p / (1 - p)) - float(tower.tau) * mean_score)


def train_lookalike_tower(
    tower: LookalikeTower,
    data: LookalikeData,
    cfg: RalmConfig,
    rng: np.random.Generator,
    *,
    progress: bool = True,
    log: Log = print,
) -> list[float]:
    """BCE training of the look-alike tower, re-clustering the seeds before every epoch.

    Mean loss per epoch. Per batch the transforming layer runs over all users
    once (seeds and scored users alike): cheap at this scale (~1k users); at
    millions of users, transform only the union of the batch items' seeds.
    """
    opt = make_optimiser(tower.parameters(), "adam", cfg.lookalike_lr or cfg.lr)
    losses: list[float] = []
    for epoch in range(cfg.lookalike_epochs):
        with torch.no_grad():
            data.clusters.recluster(tower.transform(data.universal).numpy())
        users, items, labels = data.examples(cfg.lookalike_negatives, rng)
        if epoch == 0:
            _calibrate_bias(tower, data, users, items, labels)
        tower.train()

        def loss_of(idx: np.ndarray, users=users, items=items, labels=labels) -> torch.Tensor:
            score = _scores(tower, data, users[idx], items[idx])
            return F.binary_cross_entropy_with_logits(
                tower.logit(score), torch.from_numpy(labels[idx]))

        desc = f"look-alike tower {epoch + 1}/{cfg.lookalike_epochs}"
        size = cfg.lookalike_batch_size or cfg.batch_size
        losses.append(_run_epoch(len(users), size, rng, opt, loss_of, desc, progress))
        log(f"look-alike tower epoch {epoch + 1}/{cfg.lookalike_epochs}: loss {losses[-1]:.4f}")
    tower.eval()
    return losses


# ---------------------------------------------------------------- entry points


def validation_split(train: Dataset, quantile: float = 0.8) -> tuple[Dataset, Dataset]:
    """(fit, valid) carved from the training period only: the test split is never touched.

    ``fit`` = the clicks of ``train`` before its own ``quantile`` of time,
    ``valid`` = the rest. Every tuning decision is taken on
    ``evaluate_lookalike(model, fit, valid)``; test figures are reported once,
    for the configuration chosen here.
    """
    return train.time_split(quantile)



def fit_ralm(
    dataset: Dataset, cfg: RalmConfig, *, progress: bool = True, log: Log = print
) -> RalmModel:
    """Train both stages on ``dataset`` (the training split) and return the model."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    features = FeatureSpace.build(dataset, cfg.history_len)
    clicks = ClickLog(dataset, features)
    model = RalmModel.new(cfg, features)
    user_losses = train_user_tower(model.user_tower, clicks, cfg, rng, progress=progress, log=log)
    stage1 = time.perf_counter() - started
    if cfg.lookalike_examples == "episodes":
        from models.episodes import train_episodes

        la_losses = train_episodes(model, clicks, dataset, cfg, rng, progress=progress, log=log)
        positives = 0
    else:
        data = LookalikeData(model.user_tower, clicks, dataset, cfg)
        la_losses = train_lookalike_tower(model.lookalike, data, cfg, rng, progress=progress,
                                          log=log)
        positives = data.n_positives
    model.version = make_version(
        KIND, model.user_tower.state_dict(), model.lookalike.state_dict())
    model.metrics = {
        "user_tower_loss": user_losses,
        "lookalike_loss": la_losses,
        "train_clicks": int(len(dataset.user)),
        "lookalike_positives": positives,
        "user_tower_seconds": stage1,
        "train_seconds": time.perf_counter() - started,
    }
    log(f"trained {model.version} in {model.metrics['train_seconds']:.1f}s")
    return model


def train_ralm(
    dataset: Dataset, cfg: RalmConfig, out: Path, *, progress: bool = True, log: Log = print
) -> Path:
    """Train on ``dataset`` and save ``out/<version>.pt``; ``out/LATEST`` names it."""
    model = fit_ralm(dataset, cfg, progress=progress, log=log)
    out = Path(out)
    path = model.save(out / f"{model.version}.pt")
    _write_atomic(out / LATEST, path.name + "\n")
    log(f"saved {path}")
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``LATEST`` names, else the newest ``ralm-*.pt``; None if there is none."""
    out_dir = Path(out_dir)
    pointer = out_dir / LATEST
    if pointer.is_file():
        named = out_dir / pointer.read_text().strip()
        if named.is_file():
            return named
    found = sorted(out_dir.glob(f"{KIND}-*.pt"))  # versions sort by time
    return found[-1] if found else None


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
