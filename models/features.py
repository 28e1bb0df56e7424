"""Feature space of RALM's user tower: vocabularies, normalisers, batch encoding.

A :class:`FeatureSpace` is built once from the training split and travels in the
checkpoint as plain Python (:meth:`FeatureSpace.to_state`). It turns what an
online worker knows about a user (a :class:`Profile` and the external ids of
their recent clicks) into a :class:`UserBatch` of tensors. Anything unknown
(a new occupation, an item id never seen in training) maps to index 0, which
every embedding treats as padding: online users send anything, and encoding
never raises on it.

Fields (n = 6 once embedded by the user tower):

- univalent categorical: gender, occupation, zip prefix (first 3 characters);
- multivalent: the clicked items' ids and the genres of the clicked items;
- continuous: age/100 clipped to [0, 1] (0 when unknown), an age-known flag,
  and activity = log1p(#clicks) / log1p(max #clicks of a training user), clipped.

Encoding is vectorised: history ids are mapped with one ``searchsorted`` over
the sorted catalogue, genres are summed from a multi-hot table, so a few
hundred users encode in about a millisecond.

Example:
    >>> fs = FeatureSpace(genders=("F", "M"), occupations=("writer",), zip_prefixes=("551",),
    ...     genres=("Drama",), catalog_ids=(10, 20), catalog_genres=((1,), ()),
    ...     item_ids=(20, 10), item_counts=(5, 2), max_activity=7)
    >>> b = fs.encode([Profile(age=49, gender="M", zip_code="55105")], [[10, 99, 20]])
    >>> b.categorical.tolist(), b.items.tolist()
    ([[2, 0, 1]], [[2, 0, 1]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.codec import Profile

if TYPE_CHECKING:
    from engine.data import Dataset

__all__ = ["FeatureSpace", "Profile", "UserBatch", "ClickLog", "zip_prefix"]

#: order of the columns of ``UserBatch.categorical``
CATEGORICAL = ("gender", "occupation", "zip_prefix")
#: order of the columns of ``UserBatch.continuous``
CONTINUOUS = ("age", "age_known", "activity")
ZIP_PREFIX_LEN = 3


def zip_prefix(zip_code: str | None) -> str | None:
    """First 3 characters: the US sectional centre, coarse enough to generalise."""
    if not zip_code:
        return None
    return str(zip_code).strip()[:ZIP_PREFIX_LEN].upper() or None


@dataclass(frozen=True)
class UserBatch:
    """Encoded users, ready for the user tower.

    - ``categorical`` [B, 3] int64: gender, occupation, zip prefix (0 = unknown)
    - ``items`` [B, L] int64: clicked item indices, 0 = padding/unknown
    - ``genres`` [B, G+1] float32: how often each genre occurs in the history
      (column 0 never set)
    - ``continuous`` [B, 3] float32: age, age known, activity
    """

    categorical: torch.Tensor
    items: torch.Tensor
    genres: torch.Tensor
    continuous: torch.Tensor

    def __len__(self) -> int:
        return int(self.categorical.shape[0])


def _vocab(values: Sequence[str | None]) -> tuple[str, ...]:
    """Sorted distinct non-empty values; index in the vocabulary = position + 1."""
    return tuple(sorted({v for v in values if v}))


@dataclass(frozen=True)
class FeatureSpace:
    """Vocabularies and normalisers of the user tower (index 0 = unknown everywhere).

    ``catalog_ids`` are every item the training data knows (for genres);
    ``item_ids`` are the items clicked in training, most clicked first: their
    position + 1 is the item's embedding index, and its rank for the
    log-uniform sampler.
    """

    genders: tuple[str, ...]
    occupations: tuple[str, ...]
    zip_prefixes: tuple[str, ...]
    genres: tuple[str, ...]
    catalog_ids: tuple[int, ...]
    catalog_genres: tuple[tuple[int, ...], ...]  # genre indices per catalog item
    item_ids: tuple[int, ...]
    item_counts: tuple[int, ...]
    max_activity: int
    history_len: int = 50
    _lookup: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._lookup.update(self._derive())

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, dataset: Dataset, history_len: int = 50) -> FeatureSpace:
        """Vocabularies of the training split ``dataset``."""
        users, items = dataset.users, dataset.items
        genres = _vocab([g for gs in items.genres for g in gs])
        g_index = {g: i + 1 for i, g in enumerate(genres)}
        clicks = np.bincount(dataset.item, minlength=len(items.ids))
        order = np.lexsort((items.ids, -clicks))  # most clicked first, ties by id
        order = order[clicks[order] > 0]
        activity = np.bincount(dataset.user, minlength=len(users.ids))
        active = np.flatnonzero(activity > 0)  # a value no training user has stays unknown

        def values(column: Sequence[str | None]) -> tuple[str, ...]:
            return _vocab([column[u] for u in active])

        return cls(
            genders=values(users.gender),
            occupations=values(users.occupation),
            zip_prefixes=values([zip_prefix(z) for z in users.zip_code]),
            genres=genres,
            catalog_ids=tuple(int(i) for i in items.ids),
            catalog_genres=tuple(tuple(g_index[g] for g in gs) for gs in items.genres),
            item_ids=tuple(int(i) for i in items.ids[order]),
            item_counts=tuple(int(c) for c in clicks[order]),
            max_activity=int(activity.max(initial=1)),
            history_len=history_len,
        )

    def _derive(self) -> dict[str, Any]:
        """Lookup tables derived from the vocabularies (never serialised)."""
        cat = np.asarray(self.catalog_ids, np.int64)
        order = np.argsort(cat, kind="stable")
        multi_hot = np.zeros((len(cat) + 1, len(self.genres) + 1), np.float32)
        for row, gs in enumerate(self.catalog_genres, start=1):
            multi_hot[row, list(gs)] = 1.0
        item_of = {int(i): n + 1 for n, i in enumerate(self.item_ids)}
        to_item = np.zeros(len(cat) + 1, np.int64)
        to_item[1:] = [item_of.get(int(i), 0) for i in cat]
        return {
            "gender": {v: i + 1 for i, v in enumerate(self.genders)},
            "occupation": {v: i + 1 for i, v in enumerate(self.occupations)},
            "zip_prefix": {v: i + 1 for i, v in enumerate(self.zip_prefixes)},
            "sorted_ids": cat[order],
            "sorted_rows": order.astype(np.int64) + 1,
            "multi_hot": multi_hot,
            "to_item": to_item,
        }

    # ------------------------------------------------------------ sizes

    @property
    def n_items(self) -> int:
        """Items with an embedding (clicked in training); indices 1..n_items."""
        return len(self.item_ids)

    @property
    def n_genres(self) -> int:
        return len(self.genres)

    def cardinalities(self) -> tuple[int, int, int]:
        """Embedding table sizes (with the unknown row) of the categorical columns."""
        return (len(self.genders) + 1, len(self.occupations) + 1, len(self.zip_prefixes) + 1)

    # ------------------------------------------------------------ serialisation

    def to_state(self) -> dict[str, Any]:
        """Plain Python (lists, str, int): safe for ``torch.load(weights_only=True)``."""
        return {
            "genders": list(self.genders),
            "occupations": list(self.occupations),
            "zip_prefixes": list(self.zip_prefixes),
            "genres": list(self.genres),
            "catalog_ids": list(self.catalog_ids),
            "catalog_genres": [list(g) for g in self.catalog_genres],
            "item_ids": list(self.item_ids),
            "item_counts": list(self.item_counts),
            "max_activity": self.max_activity,
            "history_len": self.history_len,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureSpace:
        return cls(
            genders=tuple(state["genders"]),
            occupations=tuple(state["occupations"]),
            zip_prefixes=tuple(state["zip_prefixes"]),
            genres=tuple(state["genres"]),
            catalog_ids=tuple(int(i) for i in state["catalog_ids"]),
            catalog_genres=tuple(tuple(int(g) for g in gs) for gs in state["catalog_genres"]),
            item_ids=tuple(int(i) for i in state["item_ids"]),
            item_counts=tuple(int(c) for c in state["item_counts"]),
            max_activity=int(state["max_activity"]),
            history_len=int(state["history_len"]),
        )

    # ------------------------------------------------------------ index level

    def catalog_rows(self, ids: np.ndarray) -> np.ndarray:
        """External item ids (any shape) -> catalogue rows (0 = unknown id)."""
        ids = np.asarray(ids, np.int64)
        sorted_ids = self._lookup["sorted_ids"]
        if len(sorted_ids) == 0:
            return np.zeros(ids.shape, np.int64)
        pos = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
        return np.where(sorted_ids[pos] == ids, self._lookup["sorted_rows"][pos], 0)

    def item_index(self, ids: np.ndarray) -> np.ndarray:
        """External item ids -> embedding indices (0 = unknown or never clicked in training)."""
        return self.item_of_rows(self.catalog_rows(ids))

    def lookup_tables(self) -> dict[str, Any]:
        """The derived tables (``multi_hot`` [rows, G+1], ``to_item`` [rows]) for code that
        reads them in bulk (the serving tower); not to be written."""
        return self._lookup

    def item_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Catalogue rows -> embedding indices (0 = padding or never clicked in training)."""
        return self._lookup["to_item"][rows]

    def categorical(self, profiles: Sequence[Profile | None]) -> np.ndarray:
        """[B, 3] int64 gender, occupation, zip-prefix indices (0 = unknown)."""
        g, o, z = (self._lookup[name] for name in CATEGORICAL)
        out = np.zeros((len(profiles), len(CATEGORICAL)), np.int64)
        for row, p in enumerate(profiles):
            if p is not None:
                out[row] = (g.get(p.gender, 0), o.get(p.occupation, 0),
                            z.get(zip_prefix(p.zip_code), 0))
        return out

    def continuous(self, age: np.ndarray, activity: np.ndarray) -> np.ndarray:
        """[B, 3] float32 from raw ages (NaN = unknown) and click counts."""
        age = np.asarray(age, np.float32)
        known = np.isfinite(age)
        act = np.log1p(np.maximum(np.asarray(activity, np.float32), 0))
        return np.stack(
            [
                np.where(known, np.clip(age / 100.0, 0.0, 1.0), 0.0),
                known.astype(np.float32),
                np.clip(act / math.log1p(max(self.max_activity, 1)), 0.0, 1.0),
            ],
            axis=1,
        ).astype(np.float32)

    def batch(
        self, categorical: np.ndarray, continuous: np.ndarray, history_rows: np.ndarray
    ) -> UserBatch:
        """Assemble a batch from index arrays; ``history_rows`` [B, L] are catalogue rows."""
        rows = np.asarray(history_rows, np.int64)
        return UserBatch(
            categorical=torch.from_numpy(np.ascontiguousarray(categorical, np.int64)),
            items=torch.from_numpy(self.item_of_rows(rows)),
            genres=torch.from_numpy(self._lookup["multi_hot"][rows].sum(axis=1)),
            continuous=torch.from_numpy(np.ascontiguousarray(continuous, np.float32)),
        )

    # ------------------------------------------------------------ online entry point

    def encode(
        self,
        profiles: Sequence[Profile | None],
        histories: Sequence[Sequence[int]],
        activity: Sequence[int] | None = None,
    ) -> UserBatch:
        """Encode B users: profiles and external item ids, most recent last.

        Histories keep their last ``history_len`` clicks. ``activity`` is each
        user's total click count; by default the length of the given history.
        """
        if len(profiles) != len(histories):
            raise ValueError(f"{len(profiles)} profiles but {len(histories)} histories")
        n, width = len(histories), self.history_len
        tails = [h[-width:] if width else [] for h in histories]
        lengths = np.fromiter((len(t) for t in tails), np.int64, count=n)
        flat = np.fromiter((i for t in tails for i in t), np.int64, count=int(lengths.sum()))
        rows = np.zeros((n, width), np.int64)
        if len(flat):
            user = np.repeat(np.arange(n), lengths)
            col = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            rows[user, col] = self.catalog_rows(flat)
        ages = np.fromiter(
            (_age(p) for p in profiles), np.float32, count=n
        )
        if activity is None:
            activity = [len(h) for h in histories]
        return self.batch(self.categorical(profiles), self.continuous(ages, activity), rows)


def _age(p: Profile | None) -> float:
    """Raw age, NaN when unknown or not a number."""
    if p is None or p.age is None:
        return math.nan
    try:
        return float(p.age)
    except (TypeError, ValueError):
        return math.nan


class ClickLog:
    """Per-user chronological clicks of a dataset, as catalogue rows (CSR).

    Lets training and evaluation cut any user's history at any point without
    Python loops: :meth:`windows` gathers the last L clicks before given
    positions for a whole batch at once.
    """

    def __init__(self, dataset: Dataset, features: FeatureSpace):
        order = np.lexsort((dataset.ts, dataset.user))  # by user, then time (stable)
        n_users = len(dataset.users.ids)
        self.features = features
        self.user = dataset.user[order]
        self.ts = dataset.ts[order]
        self.dense_item = dataset.item[order]
        self.rows = features.catalog_rows(dataset.items.ids[self.dense_item])
        self.indptr = np.zeros(n_users + 1, np.int64)
        np.cumsum(np.bincount(self.user, minlength=n_users), out=self.indptr[1:])
        self.profile_cat, self.age = _profile_table(dataset, features)

    def position_before(self, users: np.ndarray, t: float) -> np.ndarray:
        """Absolute position (into the flat arrays) of each user's first click at or after t."""
        before = np.bincount(self.user[self.ts < t], minlength=len(self.indptr) - 1)
        users = np.asarray(users, np.int64)
        return self.indptr[users] + before[users]

    def windows(self, users: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """[B, L] catalogue rows of each user's last L clicks before absolute position ``ends``."""
        users, ends = np.asarray(users, np.int64), np.asarray(ends, np.int64)
        width = self.features.history_len
        pos = ends[:, None] - width + np.arange(width)[None, :]
        valid = pos >= self.indptr[users][:, None]
        return np.where(valid, self.rows[np.clip(pos, 0, None)], 0)

    def encode(self, users: np.ndarray, ends: np.ndarray) -> UserBatch:
        """The users as they were just before absolute click positions ``ends``."""
        users, ends = np.asarray(users, np.int64), np.asarray(ends, np.int64)
        activity = ends - self.indptr[users]
        cont = self.features.continuous(self.age[users], activity)
        return self.features.batch(self.profile_cat[users], cont, self.windows(users, ends))


def _profile_table(dataset: Dataset, features: FeatureSpace) -> tuple[np.ndarray, np.ndarray]:
    """[n_users, 3] categorical indices and [n_users] ages of the dataset's users."""
    u = dataset.users
    profiles = [
        Profile(gender=g, occupation=o, zip_code=z)
        for g, o, z in zip(u.gender, u.occupation, u.zip_code, strict=True)
    ]
    return features.categorical(profiles), np.asarray(u.age, np.float32)

