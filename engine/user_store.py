"""What a scoring worker keeps per user: recent clicks (catalogue rows for the model,
item ids for history and the items never recommended again), the profile, the click
count and the embedding of the latest click.

Plain state, no Kafka: the scoring stage feeds it clicks, the audience service and
the cold-start study read it, snapshots export and restore it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson

from engine.codec import Click, Profile

ID_BLOCK = 4096  # users per block of item-id rings


@dataclass(slots=True)
class UserState:
    """What the worker keeps per user, besides their rows of the store's arrays.

    ``slot``: the user's row of ``UserStore.rows`` (catalogue rows of recent
    clicks, the model's view) and ``UserStore.ids`` (item ids of recent
    clicks: the history, and the items never to recommend again).
    """

    store: UserStore
    slot: int
    profile: Profile | None = None
    clicks: int = 0
    partition: int = -1  # of the clicks topic: the state leaves with it
    last_ts: float = 0.0

    @property
    def history(self) -> list[int]:
        """Item ids of the last ``history_len`` clicks, oldest first."""
        return self.store.recent_ids(self, self.store.history_len)

    @property
    def seen(self) -> np.ndarray:
        """Item ids of the last ``max_seen`` clicks (repeats possible): never recommended."""
        return self.store.id_ring(self.slot)[:min(self.clicks, self.store.id_len)]


class UserStore:
    """Users of this worker's partitions, least recently active evicted first.

    Per user, two rings in store-wide arrays (click i at ``i % len``):
    ``rows[slot]`` the catalogue rows of the last ``ring_len`` clicks, so the
    user tower's input for a whole batch is one gather; ``id_ring(slot)`` the
    item ids of the last max(``max_seen``, ``history_len``) clicks, in blocks
    of ``ID_BLOCK`` users (growing by copying would move gigabytes). Why arrays:
    per-user Python containers cost ~75 KB for a full user (a 1,000-entry
    dict of int objects), 70 GB at a million users; the rings cost 8 bytes per
    remembered click, so memory is bounded by ``max_users`` × (``max_seen`` ×
    8 + ``ring_len`` × 4 + h × 4 + ~300) bytes, as ``lookalike bench scale``
    measures (h × 4: the user's latest embedding, which audiences search).
    """

    def __init__(self, history_len: int, max_users: int, max_seen: int,
                 ring_len: int | None = None):
        self.history_len, self.max_users, self.max_seen = history_len, max_users, max_seen
        self.ring_len = ring_len or history_len
        self.id_len = max(max_seen, history_len)
        self.users: OrderedDict[int, UserState] = OrderedDict()
        cap = min(1024, max_users + 1)
        self.rows = np.zeros((cap, self.ring_len), np.int32)
        # per slot: its user (-1: free) and last embedding, for audiences (engine/audience.py)
        self.user_of = np.full(cap, -1, np.int64)
        self.vecs = np.zeros((cap, 0), np.float32)  # [cap, h] once the first is stored
        self.fresh = np.zeros(cap, bool)  # vecs[slot] is the user's embedding now
        self.n_clicks = np.zeros(cap, np.int64)  # the user's clicks (an audience prior)
        self._ids: list[np.ndarray] = []  # blocks of ID_BLOCK users' id rings
        self._free: list[int] = []
        self._next_slot = 0
        #: clicks partition -> the offset after the last click applied from it: a click
        #: at a lower offset (a retried batch, a replay) has been applied and changes nothing
        self.applied: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.users)

    def get(self, user: int) -> UserState | None:
        return self.users.get(user)

    def drop(self, pred: Callable[[UserState], bool]) -> None:
        """Forget the users for whom ``pred(state)`` (their partition moved away)."""
        for user in [u for u, st in self.users.items() if pred(st)]:
            self._release(self.users.pop(user).slot)

    def _release(self, slot: int) -> None:
        self.user_of[slot] = -1
        self.fresh[slot] = False
        self._free.append(slot)

    def _take_slot(self) -> int:
        if self._free:
            slot = self._free.pop()
            self.rows[slot] = 0
            return slot
        if self._next_slot == len(self.rows):
            cap = min(2 * len(self.rows), self.max_users + 1)
            self.rows, self.vecs = _grown(self.rows, cap), _grown(self.vecs, cap)
            self.user_of = np.r_[self.user_of, np.full(cap - len(self.user_of), -1, np.int64)]
            self.fresh = _grown(self.fresh, cap)
            self.n_clicks = _grown(self.n_clicks, cap)
        if self._next_slot == ID_BLOCK * len(self._ids):
            self._ids.append(np.zeros((ID_BLOCK, self.id_len), np.int64))
        self._next_slot += 1
        return self._next_slot - 1

    def click(self, c: Click, partition: int = -1, row: int = 0) -> UserState:
        """Apply one click; ``row`` is the item's catalogue row (0: unknown to the model)."""
        st = self.users.get(c.user_id)
        if st is None:
            st = UserState(self, self._take_slot())
            self.users[c.user_id] = st
            self.user_of[st.slot] = c.user_id
            if len(self.users) > self.max_users:
                self._release(self.users.popitem(last=False)[1].slot)
        else:
            self.users.move_to_end(c.user_id)
        self.fresh[st.slot] = False
        st.partition = partition
        self.rows[st.slot, st.clicks % self.ring_len] = row
        self._ids[st.slot // ID_BLOCK][st.slot % ID_BLOCK, st.clicks % self.id_len] = c.item_id
        st.clicks += 1
        self.n_clicks[st.slot] = st.clicks
        if c.ts > st.last_ts:
            st.last_ts = c.ts
        if c.profile is not None:
            st.profile = c.profile
        return st

    def remap_rows(self, catalog_rows: Callable[[np.ndarray], np.ndarray]) -> None:
        """Rebuild every user's catalogue-row ring from the item-id ring: rows are a
        model's (its catalogue); a new model's catalogue orders items differently."""
        for st in self.users.values():
            n = min(st.clicks, self.ring_len)
            clicks = np.arange(st.clicks - n, st.clicks)
            ids = self.id_ring(st.slot)[clicks % self.id_len]
            self.rows[st.slot] = 0
            self.rows[st.slot, clicks % self.ring_len] = catalog_rows(ids)

    def set_vectors(self, states: list[UserState], vecs: np.ndarray) -> None:
        """The users' embeddings after their latest clicks (the seeds the worker just made)."""
        if self.vecs.shape[1] != vecs.shape[1]:
            self.vecs = np.zeros((len(self.rows), vecs.shape[1]), np.float32)
            self.fresh[:] = False
        slots = np.fromiter((st.slot for st in states), np.int64, len(states))
        self.vecs[slots] = vecs
        self.fresh[slots] = True

    def clicked(self, slots: np.ndarray, item: int) -> np.ndarray:
        """[len(slots)] whether each slot's user clicked ``item`` within its last
        ``id_len`` clicks (the ring's unwritten entries are not clicks)."""
        out = np.zeros(len(slots), bool)
        for j, slot in enumerate(slots.tolist()):
            st = self.users[int(self.user_of[slot])]
            out[j] = bool((self.id_ring(slot)[:min(st.clicks, self.id_len)] == item).any())
        return out

    def export(self, partition: int) -> dict[str, np.ndarray]:
        """The users of one clicks partition as flat arrays (a snapshot's body), least
        recently active first: rings as stored, so ``restore`` puts back the same state."""
        users = [(u, st) for u, st in self.users.items() if st.partition == partition]
        slots = np.array([st.slot for _, st in users], np.int64)
        h = self.vecs.shape[1]
        return {
            "user": np.array([u for u, _ in users], np.int64),
            "clicks": np.array([st.clicks for _, st in users], np.int64),
            "last_ts": np.array([st.last_ts for _, st in users], np.float64),
            "profile": np.array([orjson.dumps(st.profile.to_json()).decode() if st.profile
                                 else "" for _, st in users], dtype=np.str_),
            "ids": (np.stack([self.id_ring(int(x)) for x in slots]) if len(slots)
                    else np.zeros((0, self.id_len), np.int64)),
            "rows": self.rows[slots], "vecs": self.vecs[slots] if h else
            np.zeros((len(slots), 0), np.float32), "fresh": self.fresh[slots],
        }

    def restore(self, arrays: dict[str, np.ndarray], partition: int) -> int:
        """Put ``export``'s users back (replacing what is held of them); how many."""
        if arrays["ids"].shape[1] != self.id_len or arrays["rows"].shape[1] != self.ring_len:
            raise ValueError(f"snapshot rings of {arrays['ids'].shape[1]}/"
                             f"{arrays['rows'].shape[1]} clicks, the store keeps "
                             f"{self.id_len}/{self.ring_len} (max_seen/history_len changed)")
        vecs = arrays["vecs"]
        if vecs.shape[1] and self.vecs.shape[1] != vecs.shape[1]:
            self.vecs = np.zeros((len(self.rows), vecs.shape[1]), np.float32)
            self.fresh[:] = False
        for j, user in enumerate(arrays["user"].tolist()):
            old = self.users.pop(user, None)
            if old is not None:
                self._release(old.slot)
            prof = str(arrays["profile"][j])
            st = UserState(self, self._take_slot(), Profile(**orjson.loads(prof)) if prof
                           else None, int(arrays["clicks"][j]), partition,
                           float(arrays["last_ts"][j]))
            self.users[user] = st
            self.user_of[st.slot] = user
            self.n_clicks[st.slot] = st.clicks
            self.id_ring(st.slot)[:] = arrays["ids"][j]
            self.rows[st.slot] = arrays["rows"][j]
            if vecs.shape[1] and vecs.shape[1] == self.vecs.shape[1]:
                self.vecs[st.slot], self.fresh[st.slot] = vecs[j], arrays["fresh"][j]
            if len(self.users) > self.max_users:
                self._release(self.users.popitem(last=False)[1].slot)
        return len(arrays["user"])

    def recent_ids(self, st: UserState, n: int) -> list[int]:
        """Item ids of the user's last ``n`` clicks (at most ``id_len``), oldest first."""
        n = min(n, st.clicks, self.id_len)
        pos = (np.arange(st.clicks - n, st.clicks)) % self.id_len
        return self.id_ring(st.slot)[pos].tolist()

    def id_ring(self, slot: int) -> np.ndarray:
        """[id_len] the item-id ring of a slot (click i at ``i % id_len``)."""
        return self._ids[slot // ID_BLOCK][slot % ID_BLOCK]

    def nbytes(self) -> int:
        """Bytes of the store's arrays (the Python objects per user come on top)."""
        return (self.rows.nbytes + sum(b.nbytes for b in self._ids) + self.vecs.nbytes
                + self.user_of.nbytes + self.fresh.nbytes + self.n_clicks.nbytes)

    def model_rows(self, states: list[UserState | None]) -> tuple[np.ndarray, np.ndarray]:
        """[B, ring_len] catalogue rows of each user's recent clicks, in ring order (the
        user tower's means do not depend on the order; zeros pad), and [B] click
        counts; None: no clicks."""
        slots = np.fromiter((-1 if s is None else s.slot for s in states), np.int64, len(states))
        clicks = np.fromiter((0 if s is None else s.clicks for s in states), np.int64,
                             len(states))
        rows = self.rows[np.maximum(slots, 0)]
        rows[slots < 0] = 0
        return rows, clicks


def _grown(a: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out
