"""CTR rows from MovieLens: (sparse fields, genres, dense fields, label) per rating.

Why a dataset of its own: DLRM, FM and logistic regression are point-wise models of
one (user, item) impression, not rankers over a user's history, so they read feature
rows, not the per-user sequences of models/splits.py.

- **Label** = rating >= 4 (``LABEL_THRESHOLD``), RecBole's CTX labelling of ml-100k
  (``threshold: {rating: 4}``): 55% of the ratings are positive.
- **Sparse fields** (``SPARSE_FIELDS``): user id, item id, gender, occupation, zip prefix
  (first ``zip_prefix`` characters), release-year bucket (``year_bucket`` years); each a
  dense index into its own table. The vocabularies hold the values of the training
  rows only; 0 = a value they lack (on the time split, the users who joined later),
  kept as a zero vector by the models, so an unseen user is scored from the other
  fields instead of from an untrained random embedding. **Genres** are
  multi-hot (``genres``: padded indices, 0 = padding) and pooled by the models.
- **Dense fields** (``DENSE_FIELDS``): age, log(1 + the user's rating count), log(1 + the
  item's rating count). Counts come from the *training* rows only (a test row's own
  rating is never counted) and every dense column is standardised with the training
  mean and std, so nothing of the validation or test part leaks into the features.
- **Splits**: ``time`` sorts by timestamp and cuts 80/10/10 (the issue's protocol: the
  future is predicted from the past); ``ctx`` is RecBole's CTX protocol, a random 8:1:1
  split of the labelled rows (seeded), to compare with its DeepFM/DCN figures.
- **Hashing trick** (``hash_buckets``): every sparse value, genres included, goes
  through a fixed hash of ``"<field>=<value>"`` (BLAKE2b, not Python's salted ``hash``)
  into ``hash_buckets`` trained rows (+ the zero row 0), whatever the vocabulary: an
  unbounded id space in fixed memory, at the price of collisions. The hash depends on
  the value only, so a value never seen in training still gets the same row in every
  process (and shares it with the training values that collide with it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from engine.data import Dataset

LABEL_THRESHOLD = 4.0
SPARSE_FIELDS = ("user", "item", "gender", "occupation", "zip", "year")
USER_FIELDS = ("user", "gender", "occupation", "zip")
GENRE_FIELD = "genre"
DENSE_FIELDS = ("age", "user_count", "item_count")
Protocol = Literal["time", "ctx"]
PROTOCOLS: tuple[str, ...] = ("time", "ctx")


@dataclass(frozen=True, eq=False)
class CTRFrame:
    """N labelled rows: sparse (N, F) int64, genres (N, G) int64 (0 = pad), dense (N, 3)."""

    sparse: np.ndarray
    genres: np.ndarray
    dense: np.ndarray
    label: np.ndarray  # float32 0/1
    rows: np.ndarray  # int64 positions in the source Dataset (for baselines and audits)

    def __len__(self) -> int:
        return len(self.label)

    def take(self, index: np.ndarray) -> CTRFrame:
        return CTRFrame(self.sparse[index], self.genres[index], self.dense[index],
                        self.label[index], self.rows[index])


@dataclass(frozen=True, eq=False)
class CTRData:
    """Train/valid/test frames and what a model needs to size its tables."""

    train: CTRFrame
    valid: CTRFrame
    test: CTRFrame
    field_sizes: dict[str, int]  # SPARSE_FIELDS + GENRE_FIELD -> table rows
    protocol: str
    seed: int
    hash_buckets: int | None
    dense_mean: np.ndarray = field(repr=False)
    dense_std: np.ndarray = field(repr=False)

    @property
    def n_dense(self) -> int:
        return self.train.dense.shape[1]

    def summary(self) -> str:
        parts = ", ".join(f"{name} {len(f):,} rows ({f.label.mean():.1%} positive)"
                          for name, f in (("train", self.train), ("valid", self.valid),
                                          ("test", self.test)))
        hashed = f", hashed into {self.hash_buckets} buckets" if self.hash_buckets else ""
        return f"CTR {self.protocol} split: {parts}{hashed}"

    def describe(self) -> dict:
        """Plain values for a report or a checkpoint."""
        return {"protocol": self.protocol, "seed": self.seed, "hash_buckets": self.hash_buckets,
                "field_sizes": dict(self.field_sizes), "n_dense": self.n_dense,
                "rows": {"train": len(self.train), "valid": len(self.valid),
                         "test": len(self.test)},
                "positive_rate": {"train": float(self.train.label.mean()),
                                  "valid": float(self.valid.label.mean()),
                                  "test": float(self.test.label.mean())}}


def stable_hash(field_name: str, values: list[str], buckets: int) -> np.ndarray:
    """Bucket in [0, buckets) of each ``"<field>=<value>"``: same in every process."""
    if buckets < 1:
        raise ValueError(f"hash buckets must be >= 1, got {buckets}")
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        digest = hashlib.blake2b(f"{field_name}={v}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") % buckets
    return out


def split_rows(data: Dataset, protocol: str, seed: int = 0,
               fractions: tuple[float, float] = (0.8, 0.9)) -> tuple[np.ndarray, ...]:
    """(train, valid, test) row positions: by time (rows are time-sorted) or at random."""
    n = len(data)
    a, b = int(fractions[0] * n), int(fractions[1] * n)
    if protocol == "time":
        order = np.arange(n)
    elif protocol == "ctx":
        order = np.random.default_rng(seed).permutation(n)
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return np.sort(order[:a]), np.sort(order[a:b]), np.sort(order[b:])


def _values(data: Dataset, zip_prefix: int, year_bucket: int) -> dict[str, list[str]]:
    """Per sparse field, the raw value (as text) of every user or item in the tables."""
    u, it = data.users, data.items
    years = [str(y // year_bucket * year_bucket) if y > 0 else "" for y in it.year.tolist()]
    return {"user": [str(i) for i in u.ids.tolist()], "item": [str(i) for i in it.ids.tolist()],
            "gender": list(u.gender), "occupation": list(u.occupation),
            "zip": [z[:zip_prefix] for z in u.zip_code], "year": years}


def _encode(field_name: str, values: list[str], seen: np.ndarray,
            hash_buckets: int | None) -> tuple[np.ndarray, int]:
    """(index per value, table size): the training vocabulary (0 = unknown) or the hash.

    `seen` marks the users/items of the training rows: a value only the validation or
    test part has (a user who joined later) maps to 0, a row every model keeps at zero.
    """
    if hash_buckets is not None:  # bucket + 1: row 0 stays the models' zero row
        return stable_hash(field_name, values, hash_buckets) + 1, hash_buckets + 1
    vocab = sorted({v for v, ok in zip(values, seen) if ok and v != ""})
    lookup = {v: i + 1 for i, v in enumerate(vocab)}
    return np.array([lookup.get(v, 0) for v in values], dtype=np.int64), len(vocab) + 1


def _genre_matrix(data: Dataset, seen: np.ndarray,
                  hash_buckets: int | None) -> tuple[np.ndarray, int]:
    """(n_items, G) genre indices, 0-padded (hashed: bucket + 1, so 0 stays padding)."""
    names = sorted({g for gs in data.items.genres for g in gs})
    train_names = {g for gs, ok in zip(data.items.genres, seen) if ok for g in gs}
    if hash_buckets is not None:
        codes = dict(zip(names, (stable_hash(GENRE_FIELD, names, hash_buckets) + 1).tolist()))
        size = hash_buckets + 1
    else:
        known = sorted(train_names)
        codes = {g: known.index(g) + 1 if g in train_names else 0 for g in names}
        size = len(known) + 1
    width = max([len(gs) for gs in data.items.genres] + [1])
    out = np.zeros((len(data.items), width), dtype=np.int64)
    for i, gs in enumerate(data.items.genres):
        out[i, :len(gs)] = [codes[g] for g in gs]
    return out, size


def dense_features(data: Dataset, rows: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """(len(rows), 3) raw dense features; the activity counts from `train_rows` only."""
    user_count = np.bincount(data.user[train_rows], minlength=len(data.users))
    item_count = np.bincount(data.item[train_rows], minlength=len(data.items))
    age = data.users.age[data.user[rows]].astype(np.float64)
    return np.stack([age, np.log1p(user_count[data.user[rows]]),
                     np.log1p(item_count[data.item[rows]])], axis=1)


def build_ctr_data(data: Dataset, protocol: str = "time", *, seed: int = 0,
                   hash_buckets: int | None = None, zip_prefix: int = 2,
                   year_bucket: int = 5) -> CTRData:
    """The CTR frames of `data` under `protocol` (see the module docstring)."""
    if hash_buckets is not None and hash_buckets < 1:
        raise ValueError(f"hash_buckets must be >= 1 or None, got {hash_buckets}")
    train_rows, valid_rows, test_rows = split_rows(data, protocol, seed)
    per_value = _values(data, zip_prefix, year_bucket)
    user_seen = np.bincount(data.user[train_rows], minlength=len(data.users)) > 0
    item_seen = np.bincount(data.item[train_rows], minlength=len(data.items)) > 0
    codes, sizes = {}, {}
    for name in SPARSE_FIELDS:
        seen = user_seen if name in USER_FIELDS else item_seen
        codes[name], sizes[name] = _encode(name, per_value[name], seen, hash_buckets)
    genre_codes, sizes[GENRE_FIELD] = _genre_matrix(data, item_seen, hash_buckets)

    raw_train = dense_features(data, train_rows, train_rows)
    mean = np.nanmean(raw_train, axis=0)
    std = np.nanstd(raw_train, axis=0)
    std[std == 0] = 1.0

    def frame(rows: np.ndarray) -> CTRFrame:
        u, it = data.user[rows], data.item[rows]
        sparse = np.stack([codes[n][u if n in USER_FIELDS else it]
                           for n in SPARSE_FIELDS], axis=1)
        dense = dense_features(data, rows, train_rows)
        dense = np.where(np.isnan(dense), mean, dense)  # unknown age: the training mean
        dense = ((dense - mean) / std).astype(np.float32)
        label = (data.rating[rows] >= LABEL_THRESHOLD).astype(np.float32)
        return CTRFrame(sparse, genre_codes[it], dense, label, rows.astype(np.int64))

    return CTRData(frame(train_rows), frame(valid_rows), frame(test_rows), sizes, protocol,
                   seed, hash_buckets, mean.astype(np.float32), std.astype(np.float32))


def id_space(data: Dataset) -> int:
    """Distinct user + item ids: the id space the hashing experiment shrinks."""
    return len(data.users) + len(data.items)
