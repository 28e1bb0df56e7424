"""Item-side state: each item's seed window and its k centroids.

This is the state a clustering worker owns for the items of its partitions,
and the one implementation of the clustering: training and the offline
evaluations run it too (``cluster_clicks``). New seeds go into the window
(idempotently) and, when accepted, into the item's centroids by the windowed
k-means of ``engine.kmeans`` (leave, join, and a Lloyd refresh every
``WindowConfig.refresh_every`` seeds).

Layout, for throughput. All items' centroids, counts and seed labels sit in
one preallocated table per embedding size ([capacity, k, d], [capacity, k],
[capacity, longest window]; an item owns a row), beside a store of their
windows indexed by the same row (``engine.seed_window``). A poll's seed
records are decoded into columns at once (``SeedColumns``); its admissions
into the windows are one compiled call, and so are its k-means steps, which
update the touched rows in place. No per-seed work is left in Python. Window
vectors are the biggest part of the state: their dtype is
``WindowConfig.vector_dtype``.

Why one module of this size: the window, the k-means step and the refresh share one
table of rows per item, and the worker's hot path (``apply_columns``) updates all
three per seed; decoding seed records into columns sits beside it because it feeds
that path without a copy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from engine import kmeans
from engine.codec import (
    MAX_DIM,
    SEED_HEAD_WITH_VERSION,
    SEED_MAGIC,
    BadEvent,
    SeedBatch,
    SeedPack,
    decode_seed_pack,
    decode_seeds,
    encode_centroid_rows,
)
from engine.config import WindowConfig
from engine.seed_window import SeedWindow, WindowStore, admit

_HEAD = SEED_HEAD_WITH_VERSION

class _Table:
    """Centroids, counts and seed labels of many items, one row each; grows by doubling.

    ``labels[row, r]`` is the slot of the seed in window row ``r`` of the item
    that owns ``row`` (-1: no seed there); ``since[row]`` counts the seeds the
    item accepted since its last refresh.
    """

    def __init__(self, k: int, dim: int, size: int, dtype: str = "float32",
                 capacity: int = 64):
        self.windows = WindowStore(size, dim, dtype, capacity)
        self.centroids = np.zeros((capacity, k, dim), np.float32)
        self.counts = np.zeros((capacity, k), np.float32)
        self.sqnorms = np.zeros((capacity, k), np.float32)  # |centroid|², kept current
        # as wide as the longest window so far (<= size): a huge window setting costs
        # memory only once some item's window grows that long
        self.labels = np.full((capacity, min(size, 64)), -1, np.int16)
        self.since = np.zeros(capacity, np.int64)
        self.owner: dict[int, ItemState] = {}  # row -> the item state holding it
        # each row's item and model version (interned): a poll's items are looked up in
        # a sorted copy of ``item_of`` (``find``), not one dictionary lookup per run
        self.item_of = np.full(capacity, -1, np.int64)
        self.version_of = np.full(capacity, -1, np.int64)
        self._sorted_items = np.zeros(0, np.int64)
        self._sorted_rows = np.zeros(0, np.int64)
        self._new_rows = 0  # rows taken since the sorted copy was made
        # scratch of ``apply_columns``, kept (a poll's cost must not grow with the items
        # held): seeds each row may take before its refresh; rows stopped for one (all
        # False between calls)
        self.room = np.zeros(capacity, np.int64)
        self.stopped = np.zeros(capacity, np.bool_)
        self._free: list[int] = []
        self._next = 0

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next == len(self.counts):
            self.reserve(len(self.counts))
        self._next += 1
        return self._next - 1

    def reserve(self, n: int) -> None:
        """Room for ``n`` more rows in one step. Why: a restore takes thousands of rows,
        and growing a wide ``labels`` by doubling copied it a dozen times (seconds,
        past the poll interval, on a 10k-item partition)."""
        grow = self._next + n - len(self.counts) - len(self._free)
        if grow <= 0:
            return
        grow = max(grow, len(self.counts))  # still doubling when taken one by one

        def more(a: np.ndarray, fill: float) -> np.ndarray:
            return np.concatenate([a, np.full((grow, *a.shape[1:]), fill, a.dtype)])

        self.centroids, self.counts = more(self.centroids, 0.0), more(self.counts, 0.0)
        self.sqnorms, self.since = more(self.sqnorms, 0.0), more(self.since, 0)
        self.labels = more(self.labels, -1)
        self.item_of, self.version_of = more(self.item_of, -1), more(self.version_of, -1)
        self.room, self.stopped = more(self.room, 0), more(self.stopped, False)
        self.windows.grow_rows(len(self.counts))

    def widen(self, width: int) -> None:
        """Room for window rows 0..width-1 in ``labels``."""
        if width > self.labels.shape[1]:
            wider = np.full((len(self.labels), max(width, 2 * self.labels.shape[1])), -1,
                            np.int16)
            wider[:, :self.labels.shape[1]] = self.labels
            self.labels = wider

    def release(self, row: int) -> None:
        self.centroids[row] = 0.0
        self.counts[row] = 0.0
        self.sqnorms[row] = 0.0
        self.labels[row] = -1
        self.since[row] = 0
        self.item_of[row] = self.version_of[row] = -1
        self.windows.release(row)
        self.owner.pop(row, None)
        self._free.append(row)

    def hold(self, row: int, item: int, version: int) -> None:
        self.item_of[row], self.version_of[row] = item, version
        self._new_rows += 1

    def find(self, items: np.ndarray, version: int) -> np.ndarray:
        """[len(items)] each item's row if it holds one of ``version``, else -1. The sorted
        copy is remade once rows taken since outnumber an eighth of it (amortised); an
        item it does not know yet is a miss, found by the caller's slower path."""
        if self._new_rows > max(256, len(self._sorted_items) // 8):
            rows = np.flatnonzero(self.item_of >= 0)
            order = np.argsort(self.item_of[rows], kind="stable")
            self._sorted_items, self._sorted_rows = self.item_of[rows][order], rows[order]
            self._new_rows = 0
        if not len(self._sorted_items):
            return np.full(len(items), -1, np.int64)
        at = np.minimum(np.searchsorted(self._sorted_items, items), len(self._sorted_items) - 1)
        rows = self._sorted_rows[at]
        ok = (self.item_of[rows] == items) & (self.version_of[rows] == version)
        return np.where(ok, rows, -1)

    @property
    def used(self) -> int:
        return self._next - len(self._free)

    def set(self, rows: np.ndarray | int, centroids: np.ndarray, counts: np.ndarray) -> None:
        self.centroids[rows], self.counts[rows] = centroids, counts
        self.sqnorms[rows] = (self.centroids[rows].astype(np.float64) ** 2).sum(-1)


class ItemState:
    """One item: a row of its table and of its windows (``centroids``/``counts`` are views)."""

    __slots__ = ("window", "model_version", "row", "dim", "item", "_table")

    def __init__(self, table: _Table, row: int, model_version: str = "", item: int = -1,
                 version_id: int = -1):
        table.hold(row, item, version_id)
        self.window = SeedWindow(table.windows, row)
        self.item = item
        self.model_version = model_version
        self.row = row
        self.dim = table.centroids.shape[2]
        self._table = table
        table.owner[row] = self

    @property
    def last_seed_ts(self) -> float:
        """The newest accepted seed's click time (0: none yet)."""
        return float(self._table.windows.last_ts[self.row])

    @last_seed_ts.setter
    def last_seed_ts(self, ts: float) -> None:
        self._table.windows.last_ts[self.row] = ts

    @property
    def centroids(self) -> np.ndarray:  # [k, d]
        return self._table.centroids[self.row]

    @property
    def counts(self) -> np.ndarray:  # [k]
        return self._table.counts[self.row]

    def labels(self) -> np.ndarray:
        """[n] the slot of each seed, in window order (``window.users()``)."""
        return self._table.labels[self.row][self._table.windows.order(self.row)].astype(
            np.int64)


@dataclass
class SeedColumns:
    """A poll's seed records as columns: record r holds seeds ``starts[r]:starts[r+1]``."""

    items: list[int]  # per record
    starts: list[int]  # per record, and the total at the end
    users: np.ndarray  # int64 [n]
    ts: np.ndarray  # float64 [n]
    vectors: np.ndarray  # float32 [n, d]
    model_version: str = ""

    @classmethod
    def from_batches(cls, batches: dict[int, list[SeedBatch]]) -> list[SeedColumns]:
        """Runs of records with one (dim, model version), in order."""
        runs: list[SeedColumns] = []
        group: list[tuple[int, SeedBatch]] = []
        for item, bs in batches.items():
            for b in bs:
                if group and (b.vectors.shape[1], b.model_version) != _kind(group[-1][1]):
                    runs.append(cls._of(group))
                    group = []
                group.append((item, b))
        if group:
            runs.append(cls._of(group))
        return runs

    @classmethod
    def from_pack(cls, p: SeedPack) -> SeedColumns:
        """An ``S2`` pack is already in column form."""
        return cls(p.items.tolist(), p.starts.tolist(), p.users.astype(np.int64, copy=False),
                   p.ts.astype(np.float64, copy=False), p.vectors.astype(np.float32, copy=False),
                   p.model_version)

    @classmethod
    def _of(cls, group: list[tuple[int, SeedBatch]]) -> SeedColumns:
        starts = np.r_[0, np.cumsum([len(b.users) for _, b in group])].tolist()
        return cls([i for i, _ in group], starts,
                   np.concatenate([b.users for _, b in group]).astype(np.int64, copy=False),
                   np.concatenate([b.ts for _, b in group]).astype(np.float64, copy=False),
                   np.concatenate([b.vectors for _, b in group]).astype(np.float32, copy=False),
                   group[0][1].model_version)


def _kind(b: SeedBatch) -> tuple[int, str]:
    return b.vectors.shape[1], b.model_version


def decode_poll(
    items: list[int], raws: list[bytes | None],
) -> tuple[list[SeedColumns], list[tuple[int, BadEvent]]]:
    """A poll's ``S1`` records (item of each) as columns, and the bad ones by index.

    Accepts and rejects exactly what ``codec.decode_seeds`` does, with its
    reasons, but checks values and copies payloads once per poll instead of
    once per record (per record: ~10 µs, more than the rest of the work).
    Runs of records with one embedding size and model version, in order.
    """
    good: list[tuple[int, int, int, str, int]] = []  # record, n, dim, version, payload offset
    bad: list[tuple[int, BadEvent]] = []
    last_ver, last_str = b"", ""
    for r, raw in enumerate(raws):
        if raw is None or len(raw) < _HEAD.size:
            bad.append((r, _reason(raw)))
            continue
        magic, n, dim, vlen = _HEAD.unpack_from(raw)
        ver = raw[_HEAD.size:_HEAD.size + vlen]
        if (magic != SEED_MAGIC or not 0 < dim <= MAX_DIM
                or len(raw) != _HEAD.size + vlen + n * (16 + 4 * dim)):
            bad.append((r, _reason(raw)))
            continue
        if ver != last_ver:
            last_ver, last_str = ver, ver.decode("utf-8", "replace")
        good.append((r, n, dim, last_str, _HEAD.size + vlen))
    runs: list[SeedColumns] = []
    lo = 0
    for hi in range(1, len(good) + 1):
        if hi == len(good) or good[hi][2:4] != good[lo][2:4]:
            cols, bad_run = _decode_run(items, raws, good[lo:hi])
            bad.extend(bad_run)
            if cols.items:
                runs.append(cols)
            lo = hi
    return runs, sorted(bad, key=lambda e: e[0])


def decode_records(
    items: list[int | None], raws: list[bytes | None],
) -> tuple[list[tuple[SeedColumns, list[int]]], list[tuple[int, BadEvent]]]:
    """A poll of ``seed-events`` records, ``S1`` (item = key) and ``S2`` packs (item
    None: the pack names its items) mixed, as seed columns in record order.

    Returns (columns, the record indices behind them) and the bad records by
    index with their reason. Runs of ``S1`` records go through ``decode_poll``
    together; a pack is already in column form.
    """
    out: list[tuple[SeedColumns, list[int]]] = []
    bad: list[tuple[int, BadEvent]] = []
    run: list[int] = []
    for r in [*range(len(raws)), None]:
        if r is not None and items[r] is not None:
            run.append(r)
            continue
        if run:
            runs, bad_run = decode_poll([items[i] for i in run], [raws[i] for i in run])
            bad.extend((run[i], err) for i, err in bad_run)
            out.extend((cols, run) for cols in runs)
            run = []
        if r is not None:
            try:
                out.append((SeedColumns.from_pack(decode_seed_pack(raws[r])), [r]))
            except BadEvent as err:
                bad.append((r, err))
    return out, bad


def _reason(raw: bytes | None) -> BadEvent:
    """The codec's own rejection of a record (the rare path)."""
    try:
        decode_seeds(raw)
    except BadEvent as e:
        return e
    return BadEvent("bad_binary", "seed batch rejected")


def _decode_run(
    items: list[int], raws: list[bytes | None], heads: list[tuple[int, int, int, str, int]],
) -> tuple[SeedColumns, list[tuple[int, BadEvent]]]:
    dim, ver = heads[0][2], heads[0][3]
    blobs = [(raws[r], n, off) for r, n, _, _, off in heads]
    users = np.frombuffer(b"".join([b[o:o + 8 * n] for b, n, o in blobs]), "<i8")
    ts = np.frombuffer(b"".join([b[o + 8 * n:o + 16 * n] for b, n, o in blobs]), "<f8")
    vecs = np.frombuffer(b"".join([b[o + 16 * n:] for b, n, o in blobs]), "<f4").reshape(-1, dim)
    sizes = np.array([h[1] for h in heads], np.int64)
    ok = (users >= 0) & np.isfinite(ts) & np.isfinite(vecs).all(1)
    if ok.all():
        starts = np.r_[0, np.cumsum(sizes)].tolist()
        return SeedColumns([items[h[0]] for h in heads], starts, users, ts, vecs, ver), []
    seed_rec = np.repeat(np.arange(len(heads)), sizes)
    rec_ok = np.ones(len(heads), bool)
    rec_ok[seed_rec[~ok]] = False
    keep = rec_ok[seed_rec]
    good = np.flatnonzero(rec_ok)
    cols = SeedColumns([items[heads[g][0]] for g in good],
                       np.r_[0, np.cumsum(sizes[good])].tolist(),
                       users[keep], ts[keep], vecs[keep], ver)
    err = BadEvent("bad_binary", "negative id or non-finite value in seed batch")
    return cols, [(heads[g][0], err) for g in np.flatnonzero(~rec_ok)]


class ItemClusters:
    """Seed windows and centroids of many items: the windowed k-means of ``engine.kmeans``.

    The one implementation of the clustering: the clustering worker feeds it
    polls, training and the offline evaluations feed it a click log in time
    order (``cluster_clicks``); the same seeds in the same order give the same
    centroids whichever way they were batched.

    Refreshes: an item is due after ``cfg.refresh_every`` accepted seeds. It
    is refreshed before its next seed (so the result is the same as seed by
    seed), while ``refresh_tokens`` lasts; the worker sets the tokens from its
    budget (``refresh_items_per_s``), offline they are unlimited. Due items
    beyond the budget wait in ``due``, oldest first (``refresh_due``).
    """

    def __init__(self, cfg: WindowConfig):
        self.cfg = cfg
        self.items: dict[int, ItemState] = {}
        self._tables: dict[int, _Table] = {}  # by embedding size
        self._held = 0  # seeds in all windows, kept current (read on every batch)
        self.due: dict[ItemState, None] = {}  # refresh due, not yet run (budget), oldest first
        self.refresh_tokens = float("inf")
        self.refreshes = 0  # refreshes run, for the metric
        #: the model version announced last on the ``models`` topic (None: none seen)
        self.current_version: str | None = None
        self.stale_seeds = 0  # seeds of an older model than their item's window: dropped
        self._version_ids: dict[str, int] = {}  # model version -> its id in the tables

    def __len__(self) -> int:
        return len(self.items)

    def _table(self, dim: int) -> _Table:
        t = self._tables.get(dim)
        if t is None:
            t = self._tables[dim] = _Table(self.cfg.k, dim, self.cfg.size,
                                           self.cfg.vector_dtype)
        return t

    def _state(self, item: int, dim: int, version: str) -> ItemState:
        st = self.items.get(item)
        if st is None or st.dim != dim or st.model_version != version:
            # a new embedding space (model change) cannot be averaged into the old one
            if st is not None:
                self._forget(st)
            table = self._table(dim)
            st = ItemState(table, table.take(), model_version=version, item=item,
                           version_id=self._version_id(version))
            self.items[item] = st
        return st

    def _version_id(self, version: str) -> int:
        return self._version_ids.setdefault(version, len(self._version_ids))

    def supersedes(self, version: str, window_version: str) -> bool:
        """Whether seeds of model ``version`` replace a window of ``window_version``.

        Why an order: during a rolling reload (or while one worker refuses a new
        checkpoint) workers on two versions send seeds for the same items; restarting
        a window on every change of version wiped popular items' windows over and
        over. The announced current version wins; otherwise the newer, by the
        version's name, which starts with its training time (``ralm-<UTC time>-<hash>``,
        ``models.checkpoint.make_version``). Seeds of the losing version are dropped.
        """
        cur = self.current_version
        if cur is not None and (version == cur) != (window_version == cur):
            return version == cur
        return version > window_version

    def _forget(self, st: ItemState) -> None:
        self._held -= len(st.window)
        self.due.pop(st, None)
        st._table.release(st.row)
        if not st._table.used and self._tables.get(st.dim) is st._table:
            # the last item of this embedding size: its table goes too (a stream of
            # ever-new sizes must not keep one table per size forever)
            del self._tables[st.dim]

    def apply(self, item: int, batch: SeedBatch) -> bool:
        """Add one item's new seeds; True if its window (and centroids) changed."""
        return item in self.apply_many({item: [batch]})

    def apply_many(self, batches: dict[int, list[SeedBatch]]) -> list[int]:
        """``apply`` for a whole poll batch; the items whose windows or centroids changed."""
        changed: dict[int, None] = {}
        for cols in SeedColumns.from_batches(batches):
            changed.update(dict.fromkeys(self.apply_columns(cols)))
        return list(changed)

    def apply_columns(self, cols: SeedColumns) -> list[int]:
        """The worker's path: a poll's decoded records of one dim and model version.

        The seeds' admissions into their windows run in one compiled call
        (``seed_window.admit``) and their k-means steps in another
        (``kmeans.step``), seed by seed in arrival order. An item due for a
        refresh gets it before its next seed. Items are independent, so the
        poll runs in rounds: every item's seeds up to its refresh point, one
        step of them all, one batched refresh of the items that stopped there,
        then the rest. Why: refreshed one at a time, as they fell due, the
        refresh cost 0.5 ms an item against 0.07 batched (bench cluster).
        Returns the items whose windows or centroids changed (refreshes of
        earlier due items included).
        """
        runs_a, rows_a = self._states(cols)  # first: a version change may replace the table
        changed: dict[int, None] = {}
        if len(runs_a):
            table = self._tables[cols.vectors.shape[1]]
            starts = np.asarray(cols.starts, np.int64)
            lo, hi = starts[runs_a], starts[runs_a + 1]
            touched, inv = np.unique(rows_a, return_inverse=True)
            table.windows.reserve(touched, np.bincount(inv, hi - lo).astype(np.int64))
            table.room[touched] = self.cfg.refresh_every - table.since[touched]
            items = np.asarray(cols.items, np.int64)[runs_a]
            self._rounds(table, cols, (rows_a, lo, hi, items), changed)
        changed.update(dict.fromkeys(self.refresh_due()))
        return list(changed)

    def _rounds(self, table: _Table, cols: SeedColumns,
                runs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                changed: dict[int, None]) -> None:
        """Admit, step and refresh in rounds until every run's seeds are in (see
        ``apply_columns``); ``runs``: each run's table row, start, end and item."""
        win = table.windows
        rows, lo, hi, items = runs
        room, stopped = table.room, table.stopped
        stops = np.empty(len(rows), np.int64)
        out = np.empty((int((hi - lo).sum()), 6), np.int64)
        users = np.ascontiguousarray(cols.users, np.int64)
        ts = np.ascontiguousarray(cols.ts, np.float64)
        active = np.arange(len(rows))
        while len(active):
            a_lo, got = lo[active], np.zeros(len(active), np.int64)
            n, win.next_seq, held, n_stopped = admit(
                rows[active], a_lo, hi[active], users, ts, win.size, win.base, win.length,
                win.last_ts, win.users, win.ts, win.seq, win.writer, win.next_seq, room,
                self.refresh_tokens, stopped, stops, out, got)
            lo[active] = a_lo
            self._held += held
            changed.update(dict.fromkeys(items[active[got > 0]].tolist()))
            self._flush(table, out[:n], cols.vectors)
            if n_stopped:
                states = [table.owner[r] for r in stops[:n_stopped].tolist()]
                stopped[stops[:n_stopped]] = False
                room[stops[:n_stopped]] = self.cfg.refresh_every
                for st in states:
                    self.due.pop(st, None)
                self._refresh(states)
                self.refresh_tokens -= n_stopped
            active = active[lo[active] < hi[active]]

    def _states(self, cols: SeedColumns) -> tuple[np.ndarray, np.ndarray]:
        """The runs whose seeds their item's window takes, and each one's table row: a new
        window where the model version or size changed, none for an older version.
        Held items of this version are found in one vectorised lookup (``_Table.find``);
        the others, item by item."""
        dim, ver, starts = cols.vectors.shape[1], cols.model_version, cols.starts
        items = np.asarray(cols.items, np.int64)
        table = self._tables.get(dim)
        rows = (table.find(items, self._version_id(ver)) if table is not None
                else np.full(len(items), -1, np.int64))
        keep = np.ones(len(items), np.bool_)
        for r in np.flatnonzero(rows < 0).tolist():
            item = int(items[r])
            st = self.items.get(item)
            if st is None or st.model_version != ver or st.dim != dim:
                if st is not None and st.model_version != ver and not self.supersedes(
                        ver, st.model_version):
                    self.stale_seeds += starts[r + 1] - starts[r]
                    keep[r] = False
                    continue
                st = self._state(item, dim, ver)
            rows[r] = st.row
        return np.flatnonzero(keep), rows[keep]

    def _flush(self, table: _Table, out: np.ndarray, vectors: np.ndarray) -> None:
        """The admitted seeds' vectors into their window rows, then their k-means steps;
        items now due join ``due``. ``out``: ``seed_window.admit``'s rows."""
        if not len(out):
            return
        win = table.windows
        acc, owner, wrows, arow, prev = (np.ascontiguousarray(out[:, c]) for c in (0, 1, 2, 4, 5))
        left = out[:, 3].astype(np.bool_)
        x = vectors[acc]
        if win.dtype != np.float32:  # the centroids average what the window holds
            x = x.astype(win.dtype).astype(np.float32)
        # the vector each admission replaced: the window's, or an earlier admission's
        old = np.zeros_like(x)
        again = prev >= 0
        first = left & ~again
        old[first] = win.gather(arow[first])
        old[again] = x[prev[again]]
        last = np.ones(len(out), np.bool_)  # the last admission into each arena row
        last[prev[again]] = False
        win.scatter(arow[last], x[last])
        win.writer[arow] = -1
        table.widen(int(wrows.max()) + 1)
        kmeans.step(table.centroids, table.counts, table.sqnorms, table.labels, owner, wrows,
                    left, np.ascontiguousarray(x, np.float32), old, self.cfg.seeds_per_centroid)
        touched, seeds = np.unique(owner, return_counts=True)
        table.since[touched] += seeds
        for row in touched[table.since[touched] >= self.cfg.refresh_every].tolist():
            self.due[table.owner[row]] = None

    def refresh_due(self) -> list[int]:
        """Refresh due items, oldest first, as far as the tokens go; the items."""
        n = int(min(len(self.due), max(self.refresh_tokens, 0)))
        if not n:
            return []
        states = list(itertools.islice(self.due, n))
        for st in states:
            del self.due[st]
        self._refresh(states)
        self.refresh_tokens -= n
        return [st.item for st in states]

    def refresh_all(self, iters: int | None = None) -> int:
        """Refresh every item with seeds now, whatever is due (the bench; tests); the count."""
        states = [st for st in self.items.values() if len(st.window)]
        for st in states:
            self.due.pop(st, None)
        self._refresh(states, iters)
        return len(states)

    def _refresh(self, states: list[ItemState], iters: int | None = None,
                 chunk: int = 32) -> None:
        """Lloyd steps (``kmeans.lloyd``) of ``states`` on their windows, ``chunk`` at a time.

        Why 32: the padded windows of a chunk (4 MB at 256 x 128) then stay in
        cache between the assignment and the update matmuls; 1,024 items (134
        MB) ran at half the speed, 16-64 within 10% of each other (bench cluster).
        """
        iters = self.cfg.refresh_iters if iters is None else iters
        by_table: dict[int, list[ItemState]] = {}
        for st in states:
            by_table.setdefault(st.dim, []).append(st)
        for group in by_table.values():
            # similar window lengths per chunk: padding to the longest costs compute
            group.sort(key=lambda st: len(st.window))
            buf = np.empty((0,), np.float32)
            for lo in range(0, len(group), chunk):
                buf = self._refresh_chunk(group[lo:lo + chunk], iters, buf)
        self.refreshes += len(states)

    def _refresh_chunk(self, states: list[ItemState], iters: int,
                       buf: np.ndarray) -> np.ndarray:
        """One batched refresh; ``buf`` is reused across chunks (returned, grown if needed):
        a fresh padded array per chunk was ~130 MB of page faults each time."""
        table = states[0]._table
        rows = np.array([s.row for s in states])
        lengths = np.array([len(s.window) for s in states])
        width = int(lengths.max())
        table.widen(width)
        shape = (len(states), width, states[0].dim)
        if buf.size < np.prod(shape):
            buf = np.empty(int(np.prod(shape)), np.float32)
        x = buf[:np.prod(shape)].reshape(shape)
        for b, s in enumerate(states):  # the rest of a row is padding, whatever it holds:
            x[b, :lengths[b]] = s.window.stored()  # lloyd never reads it into a mean
        cent, counts, labels, _ = kmeans.lloyd(
            x, lengths, table.centroids[rows], table.counts[rows],
            table.labels[rows, :width], iters)
        table.set(rows, cent, counts)
        table.labels[rows, :width] = labels
        table.since[rows] = 0
        return buf

    def records(self, items: list[int], now: float, dtype: str = "float32") -> list[bytes]:
        """Each of ``items``' (all held) centroid record as of ``now``: its centroids,
        counts, seeds held, newest seed time and model version (``codec.encode_centroids``),
        encoded a table at a time."""
        out: list[bytes] = [b""] * len(items)
        by_table: dict[int, list[int]] = {}
        for j, item in enumerate(items):
            by_table.setdefault(self.items[item].dim, []).append(j)
        for dim, idx in by_table.items():
            states = [self.items[items[j]] for j in idx]
            table = self._tables[dim]
            rows = np.fromiter((st.row for st in states), np.int64, len(states))
            for j, raw in zip(idx, encode_centroid_rows(
                    table.centroids[rows], table.counts[rows], table.windows.length[rows], now,
                    table.windows.last_ts[rows], [st.model_version for st in states], dtype),
                    strict=True):
                out[j] = raw
        return out

    def seeds_held(self) -> int:
        return self._held

    def window_bytes(self) -> int:
        """Bytes of all windows' blocks (vectors and bookkeeping)."""
        return sum(t.windows.used_bytes() for t in self._tables.values())

    def evict_over(self, max_items: int) -> list[int]:
        """Forget the least recently seeded items beyond ``max_items``; the ones dropped.

        1% more than needed go at once, so the scan over all items (a numpy
        partition of their newest seed times) runs once per 1% of growth.
        """
        over = len(self.items) - max_items
        if over <= 0:
            return []
        n = min(len(self.items), over + max_items // 100)
        items = list(self.items)
        newest = np.fromiter((self.items[i].last_seed_ts for i in items), np.float64, len(items))
        gone = [items[j] for j in np.argpartition(newest, n - 1)[:n]]
        self.drop(set(gone))
        return gone

    def export(self, items: list[int]) -> dict[str, np.ndarray]:
        """The windows and centroids of ``items`` as flat arrays (a snapshot's body).

        Windows in their order (oldest seed first), so ``restore`` rebuilds them
        exactly; vectors, centroids and counts per embedding size (``<name>_<dim>``).
        """
        kept = [i for i in items if i in self.items]
        states = [self.items[i] for i in kept]
        users: list[int] = []
        ts: list[float] = []
        labels: list[np.ndarray] = [np.zeros(0, np.int16)]
        wrows: list[int] = []
        for st in states:
            win = st._table.windows
            order = win.order(st.row)
            at = win.base[st.row] + order
            users += win.users[at].tolist()
            ts += win.ts[at].tolist()
            labels.append(st._table.labels[st.row][order])
            wrows += order.tolist()
        out: dict[str, np.ndarray] = {
            "rows": np.array(wrows, np.int64),  # each seed's storage row: sums come out the same
            "labels": np.concatenate(labels),  # each seed's slot, in window order
            "since": np.array([st._table.since[st.row] for st in states], np.int64),
            "due": np.array([st in self.due for st in states], bool),
            "item": np.array(kept, np.int64),
            "dim": np.array([st.dim for st in states], np.int64),
            "version": np.array([st.model_version for st in states], dtype=np.str_),
            "last_seed_ts": np.array([st.last_seed_ts for st in states], np.float64),
            "length": np.array([len(st.window) for st in states], np.int64),
            "users": np.array(users, np.int64), "ts": np.array(ts, np.float64),
        }
        for dim in sorted({st.dim for st in states}):
            mine = [st for st in states if st.dim == dim]
            out[f"vectors_{dim}"] = np.concatenate(  # as stored: no float32 round trip
                [st.window.ordered() if len(st.window)
                 else np.empty((0, dim), self.cfg.vector_dtype) for st in mine])
            rows = np.array([st.row for st in mine])
            out[f"centroids_{dim}"] = mine[0]._table.centroids[rows]
            out[f"counts_{dim}"] = mine[0]._table.counts[rows]
        return out

    def restore(self, arrays: dict[str, np.ndarray]) -> list[int]:
        """Put ``export``'s items back (replacing any held state of them); the items.

        A snapshot without seed labels (written before the windowed k-means) gets
        them by assignment, and its centroids become their means."""
        items = arrays["item"].tolist()
        labels = arrays.get("labels")
        lengths, dims = arrays["length"].tolist(), arrays["dim"].tolist()
        users, ts = arrays["users"].tolist(), arrays["ts"].tolist()
        at = dict.fromkeys(dims, 0)
        vec_at = dict.fromkeys(dims, 0)
        for dim in at:  # each table grows once, not item by item
            table = self._table(dim)
            table.reserve(dims.count(dim))
            table.widen(max((n for n, d in zip(lengths, dims, strict=True) if d == dim),
                            default=0))
        lo = 0
        for j, item in enumerate(items):
            dim, n = dims[j], lengths[j]
            old = self.items.pop(item, None)
            if old is not None:
                self._forget(old)
            st = self._state(item, dim, str(arrays["version"][j]))
            wrows = st._table.windows.load(
                st.row, users[lo:lo + n], ts[lo:lo + n],
                arrays[f"vectors_{dim}"][vec_at[dim]:vec_at[dim] + n],
                None if labels is None else arrays["rows"][lo:lo + n].tolist())
            lo += n
            vec_at[dim] += n
            self._held += len(st.window)
            cent, counts = arrays[f"centroids_{dim}"][at[dim]], arrays[f"counts_{dim}"][at[dim]]
            if labels is not None and n == len(st.window):
                lab = labels[lo - n:lo]
                st._table.since[st.row] = int(arrays["since"][j])
                if arrays["due"][j]:
                    self.due[st] = None
            elif len(st.window):
                n = len(st.window)
                lab = kmeans.assign(st.window.stored(), cent, counts)
                cent, counts = kmeans.means(st.window.stored(), lab, self.cfg.k)
            else:
                lab = np.zeros(0, np.int64)
            st._table.set(st.row, cent, counts)
            st._table.widen(len(st.window))
            st._table.labels[st.row, wrows] = lab
            at[dim] += 1
            st.last_seed_ts = float(arrays["last_seed_ts"][j])
        return items

    def drop(self, items: set[int]) -> None:
        """Forget items whose partition moved to another worker."""
        for i in items:
            st = self.items.pop(i, None)
            if st is not None:
                self._forget(st)

    def stack(self, items: list[int] | np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Centroids [len(items), k, dim] and counts [len(items), k] of ``items`` (an item
        without seeds here: k empty slots), for offline scoring."""
        cent = np.zeros((len(items), self.cfg.k, dim), np.float32)
        counts = np.zeros((len(items), self.cfg.k), np.float32)
        for j, item in enumerate(np.asarray(items).tolist()):
            st = self.items.get(item)
            if st is not None:
                cent[j], counts[j] = st.centroids, st.counts
        return cent, counts


def cluster_clicks(cfg: WindowConfig, items: np.ndarray, users: np.ndarray, ts: np.ndarray,
                   vectors: np.ndarray, version: str = "") -> ItemClusters:
    """The clustering worker's state after a click log, offline: every click is a seed of
    its item (``vectors`` [n, d], the clicker's embedding), applied in time order (ties
    in log order) through ``ItemClusters``, as the worker would receive them."""
    order = np.argsort(np.asarray(ts, np.float64), kind="stable")
    state = ItemClusters(cfg)
    if len(order):
        state.apply_columns(SeedColumns(
            np.asarray(items, np.int64)[order].tolist(), list(range(len(order) + 1)),
            np.asarray(users, np.int64)[order], np.asarray(ts, np.float64)[order],
            np.ascontiguousarray(np.asarray(vectors, np.float32)[order]), version))
    return state
