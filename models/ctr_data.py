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
ITEM_FIELDS = ("item", "year")
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
    features: FeatureTable | None = field(default=None, repr=False)

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


@dataclass(frozen=True, eq=False)
class FeatureTable:
    """How to build a CTR row for any (user, item) from ids and a profile: what serving
    needs of the training data, kept in every CTR checkpoint.

    Why: a ranker in the scoring worker sees a user id, the profile the stream carries
    and candidate item ids, not the training Dataset. The table holds the training
    vocabularies (or the hash), each item's codes, genres and training count, each
    user's training count, and the dense standardisation; `rows` then gives exactly the
    features `build_ctr_data` gives the same pair (tests/test_ctr_ranker.py checks it).
    """

    zip_prefix: int
    year_bucket: int
    hash_buckets: int | None
    vocab: dict[str, dict[str, int]]  # USER_FIELDS -> value -> code (empty when hashed)
    user_count: dict[int, int]  # external user id -> training rows
    item_ids: np.ndarray  # (I,) external ids
    item_codes: np.ndarray  # (I, 2) the item and year codes
    item_genres: np.ndarray  # (I, G) genre codes, 0 = pad
    item_count: np.ndarray  # (I,) training rows
    mean: np.ndarray  # (3,) dense standardisation
    std: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "_item_pos", {int(x): i for i, x in
                                               enumerate(self.item_ids.tolist())})

    def code(self, field_name: str, value: str) -> int:
        """A user field's code: its hash bucket + 1, or its training code (0: unknown)."""
        if self.hash_buckets is not None:
            return int(stable_hash(field_name, [value], self.hash_buckets)[0]) + 1
        return self.vocab[field_name].get(value, 0) if value else 0

    def rows(self, user_id: int, profile: dict[str, object] | None, item_ids: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sparse (n, F), genres (n, G), dense (n, 3)) of one user against `item_ids`.

        ``profile``: age, gender, occupation, zip_code, each optional (missing: the
        unknown code, the training mean age). An item outside the table gets the
        unknown codes and a count of 0: scored from the user's side alone.
        """
        prof = profile or {}
        user_values = {"user": str(user_id), "gender": str(prof.get("gender") or ""),
                       "occupation": str(prof.get("occupation") or ""),
                       "zip": str(prof.get("zip_code") or "")[:self.zip_prefix]}
        user_codes = {f: self.code(f, v) for f, v in user_values.items()}
        pos = np.array([self._item_pos.get(int(i), -1) for i in item_ids], np.int64)  # type: ignore[attr-defined]
        known = pos >= 0
        safe = np.maximum(pos, 0)
        item_codes = np.where(known[:, None], self.item_codes[safe], 0)
        n = len(pos)
        sparse = np.empty((n, len(SPARSE_FIELDS)), np.int64)
        for j, name in enumerate(SPARSE_FIELDS):
            sparse[:, j] = (user_codes[name] if name in USER_FIELDS
                            else item_codes[:, ITEM_FIELDS.index(name)])
        genres = np.where(known[:, None], self.item_genres[safe], 0)
        age = prof.get("age")
        raw = np.empty((n, 3), np.float64)
        raw[:, 0] = self.mean[0] if age is None else float(age)  # type: ignore[arg-type]
        raw[:, 1] = np.log1p(self.user_count.get(int(user_id), 0))
        raw[:, 2] = np.log1p(np.where(known, self.item_count[safe], 0))
        dense = ((raw - self.mean) / self.std).astype(np.float32)
        return sparse, genres, dense

    def to_payload(self) -> dict:
        """Plain values and tensors: loadable by a weights-only checkpoint reader."""
        import torch

        return {"zip_prefix": self.zip_prefix, "year_bucket": self.year_bucket,
                "hash_buckets": self.hash_buckets, "vocab": self.vocab,
                "user_count": [list(self.user_count), list(self.user_count.values())],
                **{k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)))
                   for k in ("item_ids", "item_codes", "item_genres", "item_count", "mean",
                             "std")}}

    @classmethod
    def from_payload(cls, p: dict) -> FeatureTable:
        ids, counts = p["user_count"]
        return cls(p["zip_prefix"], p["year_bucket"], p["hash_buckets"], p["vocab"],
                   dict(zip(ids, counts)),
                   *(p[k].numpy() for k in ("item_ids", "item_codes", "item_genres",
                                            "item_count", "mean", "std")))


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
            hash_buckets: int | None) -> tuple[np.ndarray, int, dict[str, int]]:
    """(index per value, table size, vocabulary): the training vocabulary (0 = unknown)
    or the hash (and an empty vocabulary).

    `seen` marks the users/items of the training rows: a value only the validation or
    test part has (a user who joined later) maps to 0, a row every model keeps at zero.
    """
    if hash_buckets is not None:  # bucket + 1: row 0 stays the models' zero row
        return stable_hash(field_name, values, hash_buckets) + 1, hash_buckets + 1, {}
    vocab = sorted({v for v, ok in zip(values, seen) if ok and v != ""})
    lookup = {v: i + 1 for i, v in enumerate(vocab)}
    return (np.array([lookup.get(v, 0) for v in values], dtype=np.int64), len(vocab) + 1,
            lookup)


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
    codes, sizes, vocab = {}, {}, {}
    for name in SPARSE_FIELDS:
        seen = user_seen if name in USER_FIELDS else item_seen
        codes[name], sizes[name], vocab[name] = _encode(name, per_value[name], seen,
                                                        hash_buckets)
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

    user_count = np.bincount(data.user[train_rows], minlength=len(data.users))
    features = FeatureTable(
        zip_prefix, year_bucket, hash_buckets, {n: vocab[n] for n in USER_FIELDS},
        {int(u): int(c) for u, c in zip(data.users.ids.tolist(), user_count.tolist()) if c},
        data.items.ids.copy(), np.stack([codes[n] for n in ITEM_FIELDS], axis=1), genre_codes,
        np.bincount(data.item[train_rows], minlength=len(data.items)), mean, std)
    return CTRData(frame(train_rows), frame(valid_rows), frame(test_rows), sizes, protocol,
                   seed, hash_buckets, mean.astype(np.float32), std.astype(np.float32),
                   features)


def id_space(data: Dataset) -> int:
    """Distinct user + item ids: the id space the hashing experiment shrinks."""
    return len(data.users) + len(data.items)
