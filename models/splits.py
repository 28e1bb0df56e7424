"""Train/validation/test splits of a `Dataset`, as per-user interaction sequences.

Why a module of its own: every model family is compared on a named protocol
(docs/models.md), and the protocol starts with the split. Two splits serve them:

- `leave_one_out`: per user, in time order, the last click is the test target,
  the one before it the validation target, everything earlier is training
  (the sequential protocol of SASRec and RecBole's ``LS: valid_and_test``).
- `random_split`: per user, a random 8:1:1 share of the clicks (RecBole's
  ``RS`` with order ``RO``; the general-CF protocol).
- `strong_generalization`: Mult-VAE's protocol for inductive models: whole users are
  held out of training; each held-out user's clicks are split at random into a fold-in
  80% (what the model sees) and 20% to rank.

Everything is in dense item indices (the `Dataset`'s); `Split.item_ids` maps
them back to external ids. Sequences are stored ragged (`Ragged`: one flat
array and row offsets), so a million users cost two arrays, not a million.

Example:
    >>> import numpy as np
    >>> r = Ragged.from_rows([np.array([3, 1]), np.array([2])])
    >>> r[0].tolist(), r.lengths.tolist()
    ([3, 1], [2, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from engine.data import Dataset


@dataclass(frozen=True, eq=False)
class Ragged:
    """Rows of int64 of different lengths: row i is ``values[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray  # (n + 1,) int64, offsets[0] == 0
    values: np.ndarray  # (offsets[-1],) int64

    def __post_init__(self) -> None:
        object.__setattr__(self, "offsets", np.asarray(self.offsets, dtype=np.int64))
        object.__setattr__(self, "values", np.asarray(self.values, dtype=np.int64))
        if self.offsets.ndim != 1 or not len(self.offsets) or self.offsets[0] != 0:
            raise ValueError("offsets must be 1-D and start at 0")
        if np.any(np.diff(self.offsets) < 0) or self.offsets[-1] != len(self.values):
            raise ValueError("offsets must be non-decreasing and end at len(values)")

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int] | np.ndarray]) -> Ragged:
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        values = (np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
                  if len(rows) else np.zeros(0, np.int64))
        return cls(offsets, values)

    @classmethod
    def from_groups(cls, group: np.ndarray, values: np.ndarray, n_groups: int) -> Ragged:
        """Rows by group index; values keep their given order inside a group (stable sort)."""
        order = np.argsort(group, kind="stable")
        counts = np.bincount(group, minlength=n_groups)
        return cls(np.concatenate([[0], np.cumsum(counts)]), np.asarray(values)[order])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, index: np.ndarray | Sequence[int]) -> list[np.ndarray]:
        return [self[int(i)] for i in index]

    def take(self, index: np.ndarray) -> Ragged:
        """The rows at `index`, in that order, without a Python loop over rows."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        shift = np.repeat(self.offsets[index] - offsets[:-1], lengths)
        return Ragged(offsets, self.values[np.arange(offsets[-1]) + shift])

    @cached_property
    def distinct(self) -> Ragged:
        """Each row's distinct values, sorted (a repeated click counts once); computed
        once per Ragged (it is immutable), so epoch loops do not deduplicate per batch."""
        if not len(self.values):
            return self
        if self.values.min() < 0:
            raise ValueError("distinct needs non-negative values")
        width = int(self.values.max()) + 1
        keys = np.unique(np.repeat(np.arange(len(self)), self.lengths) * width + self.values)
        counts = np.bincount(keys // width, minlength=len(self))
        return Ragged(np.concatenate([[0], np.cumsum(counts)]), keys % width)


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Users to evaluate: what the model sees of each (history) and what it must find (targets).

    Row i of `history` and `targets` belong to dense user `users[i]`; history is in time order.
    """

    users: np.ndarray  # (n,) int64 dense user indices
    history: Ragged
    targets: Ragged
    target_ratings: np.ndarray | None = None  # float32, aligned with targets.values

    def __post_init__(self) -> None:
        if not len(self.users) == len(self.history) == len(self.targets):
            raise ValueError("users, history and targets differ in length")

    def __len__(self) -> int:
        return len(self.users)

    @property
    def single_target(self) -> bool:
        return bool(np.all(self.targets.lengths == 1))


@dataclass(frozen=True, eq=False)
class Split:
    """A protocol's data: training sequences per user, validation and test sets."""

    protocol: str  # "loo", "random" or "strong"
    item_ids: np.ndarray  # dense item index -> external id
    user_ids: np.ndarray  # dense user index -> external id
    train: Ragged  # one row per dense user, time order
    valid: EvalSet
    test: EvalSet
    train_ratings: np.ndarray | None = None  # float32, aligned with train.values (AutoRec)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def summary(self) -> str:
        return (f"{self.protocol}: {len(self.train.values):,} training clicks of "
                f"{int(np.sum(self.train.lengths > 0)):,} users, {self.n_items:,} items; "
                f"{len(self.valid):,} validation and {len(self.test):,} test users")


def user_sequences(ds: Dataset) -> Ragged:
    """Each user's clicks in time order (ties in the Dataset's (ts, user, item) order)."""
    return Ragged.from_groups(ds.user, ds.item, len(ds.users))


def leave_one_out(ds: Dataset, min_clicks: int = 3) -> Split:
    """Last click = test, second to last = validation, the rest = training, per user.

    Users with fewer than `min_clicks` clicks keep them all for training and are not
    evaluated. The test history includes the validation click (as in SASRec and RecBole).
    """
    seqs = user_sequences(ds)
    n = seqs.lengths
    evaluated = np.flatnonzero(n >= max(min_clicks, 3))
    keep = np.where(n >= max(min_clicks, 3), n - 2, n)
    train = Ragged.from_rows([seqs[u][:keep[u]] for u in range(len(seqs))])
    valid = EvalSet(evaluated, Ragged.from_rows([seqs[u][:-2] for u in evaluated]),
                    Ragged.from_rows([seqs[u][-2:-1] for u in evaluated]))
    test = EvalSet(evaluated, Ragged.from_rows([seqs[u][:-1] for u in evaluated]),
                   Ragged.from_rows([seqs[u][-1:] for u in evaluated]))
    return Split("loo", ds.items.ids, ds.users.ids, train, valid, test)


def random_split(ds: Dataset, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 seed: int = 0) -> Split:
    """Per user, a random share of the clicks for training, validation and test.

    The validation history is the training clicks; the test history adds the validation
    clicks. Users with no validation (test) click are left out of that set.
    """
    if len(ratios) != 3 or min(ratios) < 0 or not np.isclose(sum(ratios), 1.0):
        raise ValueError(f"ratios must be three non-negative shares summing to 1, got {ratios}")
    rng = np.random.default_rng(seed)
    seqs = user_sequences(ds)
    rated = Ragged.from_groups(ds.user, np.arange(len(ds)), len(ds.users))  # rows of ds
    cuts = [_positions(len(seqs[u]), ratios, rng) for u in range(len(seqs))]

    def ratings(part: int, users: np.ndarray | range) -> np.ndarray:
        rows = [rated[u][cuts[u][part]] for u in users]
        return ds.rating[np.concatenate(rows)] if rows else np.zeros(0, np.float32)
    train = [seqs[u][c[0]] for u, c in enumerate(cuts)]
    valid = [seqs[u][c[1]] for u, c in enumerate(cuts)]
    known = [seqs[u][np.sort(np.concatenate(c[:2]))] for u, c in enumerate(cuts)]
    test = [seqs[u][c[2]] for u, c in enumerate(cuts)]
    has_valid = np.flatnonzero([len(v) > 0 for v in valid])
    has_test = np.flatnonzero([len(t) > 0 for t in test])
    return Split(
        "random", ds.items.ids, ds.users.ids, Ragged.from_rows(train),
        EvalSet(has_valid, Ragged.from_rows([train[u] for u in has_valid]),
                Ragged.from_rows([valid[u] for u in has_valid]), ratings(1, has_valid)),
        EvalSet(has_test, Ragged.from_rows([known[u] for u in has_test]),
                Ragged.from_rows([test[u] for u in has_test]), ratings(2, has_test)),
        ratings(0, range(len(seqs))),
    )


def _positions(n: int, ratios: tuple[float, float, float],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random 3-way partition of positions 0..n-1; each part sorted (keeps time order).

    Sizes follow RecBole's ``_calcu_split_ids`` so both sides rank the same number of
    targets: validation and test are rounded down, training takes the rest, and a tail
    part whose share is below one click gets one while training keeps more than one.
    (Rounding each part to nearest instead gave ml-100k's test sets 4.3% more targets.)
    """
    shares = [r / sum(ratios) for r in ratios]
    sizes = [0] + [int(share * n) for share in shares[1:]]
    sizes[0] = n - sum(sizes[1:])
    for part in (2, 1):
        if sizes[0] <= 1:
            break
        if 0 < shares[part] * n < 1:
            sizes[part] += 1
            sizes[0] -= 1
    perm = rng.permutation(n)
    n_train, n_valid = sizes[0], sizes[1]
    return (np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_valid]),
            np.sort(perm[n_train + n_valid:]))


def strong_generalization(ds: Dataset, heldout: tuple[float, float] = (0.1, 0.2),
                          fold_in: float = 0.8, seed: int = 0) -> Split:
    """Mult-VAE's strong generalization: validation and test users never train.

    `heldout`: the shares of users drawn (seeded) for validation and test; every other
    user trains with all their clicks, held-out users have an empty training row. Each
    held-out user's clicks split at random into `fold_in` history (time order kept) and
    targets; a user left with no history or no target is not evaluated.
    """
    if len(heldout) != 2 or min(heldout) < 0 or sum(heldout) >= 1 or not 0 < fold_in < 1:
        raise ValueError(f"heldout shares must sum below 1 and fold_in lie in (0, 1), "
                         f"got {heldout}, {fold_in}")
    rng = np.random.default_rng(seed)
    seqs = user_sequences(ds)
    order = rng.permutation(len(seqs))
    n_valid, n_test = (int(round(share * len(seqs))) for share in heldout)
    valid_users = np.sort(order[:n_valid])
    test_users = np.sort(order[n_valid:n_valid + n_test])
    heldout_users = set(order[:n_valid + n_test].tolist())
    train = [np.zeros(0, np.int64) if u in heldout_users else seqs[u] for u in range(len(seqs))]
    return Split("strong", ds.items.ids, ds.users.ids, Ragged.from_rows(train),
                 _folded(seqs, valid_users, fold_in, rng), _folded(seqs, test_users, fold_in, rng))


def _folded(seqs: Ragged, users: np.ndarray, fold_in: float,
            rng: np.random.Generator) -> EvalSet:
    """Held-out users: a random `fold_in` share of each one's clicks as history, the rest
    as targets (both in time order)."""
    kept, history, targets = [], [], []
    for u in users:
        s = seqs[int(u)]
        perm = rng.permutation(len(s))
        k = int(round(fold_in * len(s)))
        if 0 < k < len(s):
            kept.append(u)
            history.append(s[np.sort(perm[:k])])
            targets.append(s[np.sort(perm[k:])])
    return EvalSet(np.array(kept, dtype=np.int64), Ragged.from_rows(history),
                   Ragged.from_rows(targets))


def make_split(ds: Dataset, protocol: str, seed: int = 0) -> Split:
    """The split a model family is evaluated on: "loo", "random" (8:1:1, seeded) or
    "strong" (held-out users, seeded)."""
    if protocol == "loo":
        return leave_one_out(ds)
    if protocol == "random":
        return random_split(ds, seed=seed)
    if protocol == "strong":
        return strong_generalization(ds, seed=seed)
    raise ValueError(f"unknown split {protocol!r}; expected 'loo', 'random' or 'strong'")
