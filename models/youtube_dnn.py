"""YouTube DNN: candidate generation by extreme multiclass softmax, served by ANN, and a
watch-time-weighted ranker.

Why: the engine needs a candidate generator that turns a user's clicks (and, where
known, their profile) into one vector, so that the top-N items are an inner-product
search over item vectors: an ANN index answers it in sub-linear time at any catalogue
size, and a new user needs no retraining (their vector comes from their clicks).

Candidate generation (Covington, Adams and Sargin, section 3; choices marked *):

- Input: the mean of the *input* ("watch") embeddings of the user's last
  `max_history` clicks (the paper's bag of recent watches), concatenated with the
  *example age* features [a, a^2, sqrt(a)] and, when a profile table is attached
  (`use_profiles`), the embeddings of gender, occupation, zip prefix (geography) and
  age bucket (`PROFILE_FIELDS`). *Example age: the zoo's splits carry no timestamps,
  so the age of a training example is its distance from the end of the user's
  training history in clicks, a = log1p(#later training clicks) / log1p(100); a = 0
  when serving (the next click is "now"), as the paper feeds 0 at serving time.
- Tower: `layers` ReLU layers of width `hidden`, then a linear layer to `dim`: the
  user vector u (B, D). *The paper's last layer is also ReLU; a linear last layer
  lets u point anywhere, which the inner-product search needs.
- Output: item output embeddings w_i (I, D) and biases b_i (separate from the input
  table); logit(u, i) = u . w_i + b_i. Served as [u, 1] . [w_i, b_i].
- Loss: softmax over all items, approximated by sampled softmax: each batch shares
  `negatives` items drawn with replacement from q ~ (training clicks + 1)^0.75;
  with `logq` every logit is corrected by -log(K q_i) (Jean et al. / TF's
  ``sampled_softmax_loss``) and a negative equal to the example's target is masked.
- Examples: every training click after a user's first is the target of one example
  whose input is the clicks before it (the paper's "predict the next watch",
  never a held-out watch in the middle of the history).

Serving (`CandidateIndex`): Faiss inner-product ANN (HNSW or IVF-flat) over the
item vectors [w_i, b_i]; `ann_vs_exact` measures what the ANN keeps of exact search.

Ranking (`RankingNet`, `fit_ranker`): an MLP over the CTR rows of models/ctr_data.py
(user, item and their fields, pooled genres, age and activity counts) plus two
context features (log hours since the user's previous rating, first-rating flag),
trained with weighted logistic regression: a positive row (rating >= 4) weighs its
rating (4 or 5, the watch-time proxy: how much the user liked what they "watched"),
a negative weighs 1, so the learned odds track the expected rating-weighted clicks
(the paper's expected watch time). Evaluated by AUC on the time split.

Example:
    >>> import numpy as np
    >>> model = YouTubeDNN(dim=8, hidden=16)
    >>> model.prepare(np.array([10, 20, 30]))
    >>> model.score_many([np.array([0, 2])]).shape
    torch.Size([1, 3])

References:
    Paul Covington, Jay Adams and Emre Sargin. *Deep Neural Networks for YouTube
    Recommendations*. RecSys 2016. https://doi.org/10.1145/2959100.2959190
    Sébastien Jean, Kyunghyun Cho, Roland Memisevic and Yoshua Bengio. *On Using Very
    Large Target Vocabulary for Neural Machine Translation*. ACL 2015 (sampled softmax).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from models.recommender import Recommender, register
from models.splits import EvalSet, Ragged

if TYPE_CHECKING:
    from engine.data import Users

AGE_SCALE = 100.0  # clicks: log1p(age) / log1p(AGE_SCALE) is ~1 for 100 later clicks
PROFILE_FIELDS = ("gender", "occupation", "zip", "age")
AGE_BUCKETS = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups


class YouTubeDNNConfig(BaseModel):
    """Architecture and sampling; optimisation lives in `TrainerConfig`."""

    dim: int = Field(64, ge=1, description="D: item embeddings and the user vector")
    hidden: int = Field(256, ge=1, description="width of each ReLU layer of the tower")
    layers: int = Field(1, ge=0, description="ReLU layers before the linear output")
    max_history: int = Field(5, ge=1, description="recent clicks averaged")
    negatives: int = Field(200, ge=1, description="K: sampled negatives per batch")
    sample_power: float = Field(0.75, ge=0, description="q ~ (clicks + 1)^power")
    logq: bool = Field(True, description="correct logits by -log(K q)")
    example_age: bool = Field(True, description="feed the example-age features")
    batch_size: int = Field(512, ge=1, description="examples per step")
    profile_dim: int = Field(8, ge=1, description="width of each profile field")
    # set by `use_profiles` (and saved with the config, so a checkpoint rebuilds them)
    profile_sizes: list[int] = Field(default_factory=list, description="table rows per field")
    profile_users: int = Field(0, ge=0, description="rows of the attached profile table")


# --------------------------------------------------------------------------- network


@dataclass(frozen=True)
class Bags:
    """Histories as one flat tensor of items and the start of each row (EmbeddingBag)."""

    items: torch.Tensor  # (nnz,) int64
    offsets: torch.Tensor  # (B,) int64

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def of(cls, histories: Sequence[np.ndarray], max_history: int) -> Bags:
        """Each history's last `max_history` items."""
        tails = [np.asarray(h, dtype=np.int64)[-max_history:] for h in histories]
        lengths = np.array([len(t) for t in tails], dtype=np.int64)
        flat = np.concatenate(tails) if tails else np.zeros(0, np.int64)
        return cls(torch.from_numpy(flat), torch.from_numpy(np.cumsum(lengths) - lengths))

    @classmethod
    def window(cls, values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> Bags:
        """Rows ``values[starts[b]:starts[b] + lengths[b]]``, gathered in one pass."""
        offsets = np.cumsum(lengths) - lengths
        flat = np.arange(int(lengths.sum())) - np.repeat(offsets - starts, lengths)
        return cls(torch.from_numpy(values[flat]), torch.from_numpy(offsets))


def mean_bags(table: nn.Embedding, bags: Bags) -> torch.Tensor:
    """(B, D) mean input embedding of each bag (zeros for an empty one)."""
    return F.embedding_bag(bags.items, table.weight, bags.offsets, mode="mean")


def age_features(age: np.ndarray) -> torch.Tensor:
    """(B, 3) [a, a^2, sqrt(a)] of example ages in clicks (0 = serving time)."""
    a = np.log1p(np.maximum(np.asarray(age, dtype=np.float64), 0)) / np.log1p(AGE_SCALE)
    return torch.from_numpy(np.stack([a, a * a, np.sqrt(a)], axis=1).astype(np.float32))


class ProfileEmbedding(nn.Module):
    """Per-user categorical profile codes (U, F) kept as a buffer -> (B, F * d) vectors;
    a user outside the table (index -1 or >= U) gets code 0 (unknown) in every field."""

    def __init__(self, sizes: Sequence[int], n_users: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("codes", torch.zeros(n_users, len(sizes), dtype=torch.int64))
        self.tables = nn.ModuleList(nn.Embedding(s, dim, padding_idx=0) for s in sizes)

    @property
    def width(self) -> int:
        return sum(t.embedding_dim for t in self.tables)

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        codes: torch.Tensor = self.codes  # type: ignore[assignment]
        known = (users >= 0) & (users < len(codes))
        rows = codes[users.clamp(0, max(len(codes) - 1, 0))] * known.unsqueeze(1)
        return torch.cat([t(rows[:, f]) for f, t in enumerate(self.tables)], dim=1)


class YouTubeDNNNet(nn.Module):
    """Histories (+ example age, + users' profiles) -> user vectors (B, D); item output
    vectors (I, D) and biases (I,) for the softmax."""

    def __init__(self, n_items: int, cfg: YouTubeDNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.watch = nn.Embedding(n_items, cfg.dim)
        nn.init.normal_(self.watch.weight, std=0.1)
        self.profiles = (ProfileEmbedding(cfg.profile_sizes, cfg.profile_users, cfg.profile_dim)
                         if cfg.profile_sizes else None)
        width = cfg.dim + (3 if cfg.example_age else 0) + (
            self.profiles.width if self.profiles is not None else 0)
        tower: list[nn.Module] = []
        for _ in range(cfg.layers):
            tower += [nn.Linear(width, cfg.hidden), nn.ReLU()]
            width = cfg.hidden
        self.tower = nn.Sequential(*tower, nn.Linear(width, cfg.dim))
        self.out = nn.Embedding(n_items, cfg.dim)
        nn.init.normal_(self.out.weight, std=0.1)
        self.bias = nn.Parameter(torch.zeros(n_items))

    def user_vector(self, histories: Bags, age: np.ndarray | None = None,
                    users: np.ndarray | None = None) -> torch.Tensor:
        """(B, D) u: tower([mean watch embedding, age features, profile embeddings]);
        no age means serving time (0), no users means nobody's profile is known."""
        parts = [mean_bags(self.watch, histories)]
        if self.cfg.example_age:
            parts.append(age_features(np.zeros(len(histories)) if age is None else age))
        if self.profiles is not None:
            u = np.full(len(histories), -1) if users is None else np.asarray(users)
            parts.append(self.profiles(torch.from_numpy(u.astype(np.int64))))
        return self.tower(torch.cat(parts, dim=1))

    def item_vectors(self) -> torch.Tensor:
        """(I, D + 1) [w_i, b_i]: what the ANN index holds (query: [u, 1])."""
        return torch.cat([self.out.weight, self.bias.unsqueeze(1)], dim=1)

    def scores(self, u: torch.Tensor) -> torch.Tensor:
        """(B, I) full softmax logits u . w_i + b_i (exact search, and the evaluator)."""
        return u @ self.out.weight.T + self.bias


def sampled_softmax_loss(u: torch.Tensor, out: torch.Tensor, bias: torch.Tensor,
                         target: torch.Tensor, sampled: torch.Tensor,
                         log_kq: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy of each target against the batch's shared sampled negatives.

    u (B, D); out (I, D), bias (I,); target (B,); sampled (K,) item indices;
    log_kq (I,) log(K q_i) subtracted from every logit (logQ correction) or None.
    A sampled item equal to the row's target is masked out (an "accidental hit").
    """
    pos = (u * out[target]).sum(1, keepdim=True) + bias[target].unsqueeze(1)  # (B, 1)
    neg = u @ out[sampled].T + bias[sampled]  # (B, K)
    if log_kq is not None:
        pos = pos - log_kq[target].unsqueeze(1)
        neg = neg - log_kq[sampled]
    neg = neg.masked_fill(sampled.unsqueeze(0) == target.unsqueeze(1), -torch.inf)
    logits = torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.int64))


# --------------------------------------------------------------------------- zoo model


@dataclass(frozen=True)
class Examples:
    """One batch of training examples: the clicks before each target, the target, the
    example's age in clicks, its user, and the batch's shared negatives."""

    histories: Bags
    target: torch.Tensor
    age: np.ndarray
    users: np.ndarray
    sampled: torch.Tensor


def training_examples(train: Ragged) -> tuple[np.ndarray, np.ndarray]:
    """(user, position) of every click after a user's first: one example each."""
    per_user = np.maximum(train.lengths - 1, 0)
    users = np.repeat(np.arange(len(per_user)), per_user)
    first = np.repeat(np.cumsum(per_user) - per_user, per_user)
    return users.astype(np.int64), (np.arange(len(users)) - first + 1).astype(np.int64)


@register
class YouTubeDNN(Recommender):
    """YouTube DNN candidate generation (Covington et al. 2016) behind the zoo interface;
    see the module docstring. User-bound only for the optional profile table: without
    one (the `lookalike train` path) a user is their clicks alone."""

    name = "youtube-dnn"
    Config = YouTubeDNNConfig
    config: YouTubeDNNConfig
    split = "loo"
    user_bound = True  # rows carry the dense user, to look up the attached profiles
    # chosen on ml-100k's validation users (docs/youtube_dnn.md)
    trainer_defaults: ClassVar[dict[str, Any]] = {"lr": 2e-3}

    def use_profiles(self, users: Users) -> YouTubeDNN:
        """Attach the demographic and geographic fields of `users` (the dataset's table,
        dense user order): gender, occupation, zip prefix (2 chars), age bucket."""
        codes, sizes = encode_profiles(users)
        self.config = self.config.model_copy(update={"profile_sizes": sizes,
                                                     "profile_users": len(codes)})
        self._profile_codes = codes
        return self

    def build(self, n_items: int) -> nn.Module:
        net = YouTubeDNNNet(n_items, self.config)
        codes = getattr(self, "_profile_codes", None)
        if net.profiles is not None and codes is not None:
            net.profiles.codes.copy_(torch.from_numpy(codes))
        self._log_kq: torch.Tensor | None = None  # log(K q_i), set by `_proposal`
        return net

    @property
    def net(self) -> YouTubeDNNNet:
        self._check_fitted()
        assert isinstance(self.module_, YouTubeDNNNet)
        return self.module_

    def batches(self, train: Ragged, rng: np.random.Generator) -> Iterator[Examples]:
        """Shuffled examples; K negatives per batch drawn from q (see `_proposal`)."""
        users, pos = training_examples(train)
        q = self._proposal(train)
        order = rng.permutation(len(users))
        lengths = train.lengths
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start:start + self.config.batch_size]
            u, t = users[rows], pos[rows]
            begin = train.offsets[u]
            size = np.minimum(t, self.config.max_history)
            yield Examples(Bags.window(train.values, begin + t - size, size),
                           torch.from_numpy(train.values[begin + t]),
                           lengths[u] - 1 - t, u,
                           torch.from_numpy(rng.choice(len(q), self.config.negatives, p=q)))

    def _proposal(self, train: Ragged) -> np.ndarray:
        """q_i ~ (training clicks of i + 1)^power; log(K q) cached for the loss."""
        counts = np.bincount(train.values, minlength=self.n_items).astype(np.float64)
        q = (counts + 1.0) ** self.config.sample_power
        q /= q.sum()
        self._log_kq = torch.from_numpy(np.log(self.config.negatives * q)).float()
        return q

    def loss(self, batch: Examples) -> torch.Tensor:
        net = self.net
        u = net.user_vector(batch.histories, batch.age, batch.users)
        log_kq = self._log_kq if self.config.logq else None
        return sampled_softmax_loss(u, net.out.weight, net.bias, batch.target, batch.sampled,
                                    log_kq)

    def score_index(self, histories: Sequence[np.ndarray],  # type: ignore[override]
                    users: np.ndarray | None = None) -> torch.Tensor:
        """Exact full-softmax logits at serving time (example age 0)."""
        net = self.net
        return net.scores(net.user_vector(Bags.of(histories, self.config.max_history), None,
                                          users))

    def user_vectors(self, histories: Sequence[np.ndarray],
                     users: np.ndarray | None = None) -> np.ndarray:
        """(B, D + 1) ANN queries [u, 1] (eval mode, no grad)."""
        net = self.net
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                u = net.user_vector(Bags.of(histories, self.config.max_history), None, users)
        finally:
            net.train(was)
        return torch.cat([u, torch.ones(len(u), 1)], dim=1).numpy()

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"config": {"dim": 16, "hidden": 32, "max_history": 4, "negatives": 10,
                           "batch_size": 64},
                "trainer": {"epochs": 15, "lr": 1e-2}}


def encode_profiles(users: Users) -> tuple[np.ndarray, list[int]]:
    """(U, 4) int64 codes of gender, occupation, zip prefix, age bucket (0 = unknown)
    and each field's table size (vocabulary + 1)."""
    from models.features import zip_prefix

    def vocab(values: list[str]) -> tuple[np.ndarray, int]:
        known = sorted({v for v in values if v})
        lookup = {v: i + 1 for i, v in enumerate(known)}
        return np.array([lookup.get(v, 0) for v in values], dtype=np.int64), len(known) + 1

    zips = [(zip_prefix(z) or "")[:2] for z in users.zip_code]
    ages = np.asarray(users.age, dtype=np.float64)
    age_code = np.where(np.isnan(ages), 0,
                        np.searchsorted(AGE_BUCKETS, np.nan_to_num(ages), side="right") + 1)
    columns = [vocab(list(users.gender)), vocab(list(users.occupation)), vocab(zips),
               (age_code.astype(np.int64), len(AGE_BUCKETS) + 2)]
    codes = np.stack([c for c, _ in columns], axis=1) if len(users.ids) else np.zeros(
        (0, len(columns)), np.int64)
    return codes, [s for _, s in columns]


# --------------------------------------------------------------------------- serving


class CandidateIndex:
    """Faiss inner-product index over item vectors [w_i, b_i]: top-N candidates for
    queries [u, 1]. ``kind``: "hnsw" (graph), "ivf" (IVF-flat) or "exact" (flat scan,
    the reference)."""

    def __init__(self, vectors: np.ndarray, kind: Literal["hnsw", "ivf", "exact"] = "hnsw",
                 *, hnsw_m: int = 32, ef_search: int = 128, nlist: int = 32,
                 nprobe: int = 4, seed: int = 0) -> None:
        import faiss

        x = np.ascontiguousarray(vectors, dtype=np.float32)
        d = x.shape[1]
        self.kind = kind
        if kind == "exact":
            self.index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
        elif kind == "ivf":
            self.quantizer = faiss.IndexFlatIP(d)
            nlist = max(1, min(nlist, len(x) // 39 or 1))  # faiss wants ~39 points per list
            self.index = faiss.IndexIVFFlat(self.quantizer, d, nlist,
                                            faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = seed
            self.index.train(x)
            self.index.nprobe = nprobe
        else:
            raise ValueError(f"kind must be 'hnsw', 'ivf' or 'exact', got {kind!r}")
        self.index.add(x)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item indices), each (B, k), best first; -1 where fewer were found."""
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, k)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def ann_vs_exact(model: YouTubeDNN, data: EvalSet, ks: Sequence[int] = (50, 100),
                 kinds: Sequence[str] = ("hnsw", "ivf"),
                 options: dict[str, dict[str, Any]] | None = None,
                 catalogue: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Recall@K of the ANN candidates and of exact search on single-target `data`
    (history not masked: the retrieval step), their ratio ("kept"), the overlap of the
    two top-K lists, and search time per query.

    `catalogue`: pad the item vectors with synthetic items drawn from a Gaussian with the
    real vectors' mean and covariance up to this many, to see the index at a size where
    ANN matters (the targets stay real items)."""
    if not data.single_target:
        raise ValueError("ann_vs_exact wants one target per user (leave-one-out)")
    queries = model.user_vectors(data.history.rows(range(len(data))), data.users)
    items = model.net.item_vectors().detach().numpy()
    if catalogue is not None and catalogue > len(items):
        rng = np.random.default_rng(seed)
        extra = rng.multivariate_normal(items.mean(axis=0), np.cov(items.T),
                                        catalogue - len(items))
        items = np.concatenate([items, extra.astype(np.float32)])
    return compare_indexes(queries, items, data.targets.values, ks, kinds, options or {})


def compare_indexes(queries: np.ndarray, items: np.ndarray, target: np.ndarray,
                    ks: Sequence[int], kinds: Sequence[str],
                    options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Exact search and each ANN `kind` on the same queries (see `ann_vs_exact`)."""
    k_max = max(ks)
    found: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {"users": len(queries), "items": len(items), "options": options,
                           "kinds": {}}
    for kind in ("exact", *kinds):
        t0 = time.perf_counter()
        index = CandidateIndex(items, kind, **options.get(kind, {}))  # type: ignore[arg-type]
        t1 = time.perf_counter()
        _, ids = index.search(queries, k_max)
        seconds = time.perf_counter() - t1
        found[kind] = ids
        recall = {f"recall@{k}": float(np.mean((ids[:, :k] == target[:, None]).any(axis=1)))
                  for k in ks}
        out["kinds"][kind] = {**recall, "ms_per_query": 1e3 * seconds / max(len(queries), 1),
                              "build_seconds": t1 - t0}
    for kind in kinds:
        row = out["kinds"][kind]
        for k in ks:
            exact = out["kinds"]["exact"][f"recall@{k}"]
            row[f"kept@{k}"] = row[f"recall@{k}"] / exact if exact else float("nan")
            row[f"overlap@{k}"] = float(np.mean([
                len(np.intersect1d(a[:k], b[:k])) / k
                for a, b in zip(found[kind], found["exact"], strict=True)]))
    return out
