"""Rolling windows of items' most recent distinct seed users, many items in one store.

A user who clicks again moves to the front with their newest embedding; they
are never in twice. Updates are idempotent: replaying events already applied
(after a crash, before the committed offset) changes nothing, because an event
no newer than what the window holds for that user, or no newer than
everything in a full window, is ignored. (A new user tied with the oldest
seed's timestamp in a full window is thus not admitted: idempotence wins.)

The window is kept in click-time order, not arrival order. Why: one item's
seeds come from every click partition (the scoring worker embeds clicks as
its polls interleave them), so they arrive slightly out of time order, and a
full window that evicted its first *arrival* held different users in any two
runs of the same clicks (the recovery bench found it). So the window is
always the ``size`` users with the newest clicks, whatever the order they
arrived in: a full window evicts its oldest seed by (click time, admission),
ties going to the seed admitted first.

Layout, for throughput. Every window of one embedding size lives in one
store, indexed by its item's table row: per seed a user id, a click time, an
admission number and a vector, in blocks of 4, 16, 64, ... ``size`` rows per item
(a block grows fourfold as its window grows, so a short window costs a short block).
A seed keeps its window row until it leaves, so the k-means labels of
``engine.clustering`` index it. A poll's admissions are one compiled call
(:func:`admit`) instead of a dictionary operation and a row copy per seed in
Python, which was ~60% of the clustering worker's state path; the window
order is computed only when asked for (snapshots, tests).
``tests/window_reference.py`` keeps the per-seed implementation this store is
tested against.

Memory. ``bytes_bound`` says what a full window costs; the vector dtype is a
setting (float16 halves the biggest part of a worker's state).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.typed import List

#: per held seed besides its vector: user id, click time, admission number, a scratch index
BOOKKEEPING_BYTES = 32
#: the smallest block of rows an item's window gets
MIN_BLOCK = 4


def bytes_bound(size: int, dim: int, dtype: str = "float32") -> int:
    """Upper bound of one full window's bytes in a store of many: its vectors and
    bookkeeping, plus the store's slack: up to a quarter more vector rows (the chunk
    being filled, ``WindowStore``) and twice the bookkeeping (arrays that double)."""
    return size * (dim * np.dtype(dtype).itemsize * 5 // 4 + 2 * BOOKKEEPING_BYTES)


def block_rows(size: int, n: int) -> int:
    """Rows of the block that holds a window of ``n`` seeds: a power of four (4, 16, 64,
    256, ...), capped at ``size``. Why four: a window that grows is copied to its next
    block, and with blocks four times larger each seed is copied a third of a time on
    average instead of once (at 100k items, where nothing is in cache, the copies were
    a quarter of a seed's cost); a window holds at most four times its seeds' rows."""
    rows = MIN_BLOCK
    while rows < n:
        rows *= 4
    return int(min(size, rows))


class WindowStore:
    """The seed windows of many items of one embedding size, one per table row.

    Vectors sit in chunks of rows (a block never straddles two), so the store grows
    by a chunk at a time: one array doubling as it filled would copy gigabytes and
    hold twice the memory for a moment. A new chunk is a quarter of the rows so far
    (so at most a fifth of the vectors' memory waits unused), at least 1,024 rows and
    at most ``CHUNK_BYTES``. The per-seed bookkeeping (``BOOKKEEPING_BYTES``) is one
    array each, grown by doubling, which the compiled admission indexes directly.

    A window that grows moves to a block four times the size and frees its old one for
    the next window of that size. Once freed rows outnumber half the rows in use
    (after a warm-up, say, when most windows grew past the blocks they left),
    ``reserve`` compacts the store in place: blocks slide down in address order and
    emptied chunks are let go. Amortised like an array's doubling; no second copy
    of the store is ever held.
    """

    #: the largest chunk of vectors
    CHUNK_BYTES = 32 << 20
    #: freed rows that never trigger a compaction, however few are in use
    COMPACT_MIN_ROWS = 1 << 16

    def __init__(self, size: int, dim: int, dtype: str = "float32", rows: int = 64):
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size, self.dim, self.dtype = size, dim, np.dtype(dtype)
        # per table row: the block's first arena row, its rows, the seeds it holds
        self.base = np.zeros(rows, np.int64)
        self.cap = np.zeros(rows, np.int64)
        self.length = np.zeros(rows, np.int64)
        self.last_ts = np.zeros(rows, np.float64)  # newest accepted seed's click time
        # per arena row
        self.users = np.full(0, -1, np.int64)
        self.ts = np.zeros(0, np.float64)
        self.seq = np.zeros(0, np.int64)
        self.writer = np.full(0, -1, np.int64)  # scratch of ``admit``: -1 between calls
        self.next_seq = 0
        self._chunks: list[np.ndarray] = []  # vectors, [rows, dim] each
        # the same chunks' bits (numba has no float16), for the compiled gather and scatter
        self._bits = np.dtype(f"u{self.dtype.itemsize}")
        self._typed = List.empty_list(numba.types.Array(numba.from_dtype(self._bits), 2, "C"))
        self._chunk_at = np.zeros(0, np.int64)  # each chunk's first arena row
        self._top = 0  # arena rows handed out
        self._used = 0  # rows in the blocks windows hold
        self._free: dict[int, list[int]] = {}  # block rows -> free blocks' bases

    # ------------------------------------------------------------- blocks
    def grow_rows(self, rows: int) -> None:
        """Room for table rows 0..rows-1."""
        old = len(self.base)
        if rows <= old:
            return
        for name in ("base", "cap", "length", "last_ts"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros(rows - old, a.dtype)]))

    def reserve(self, rows: np.ndarray, seeds: np.ndarray) -> None:
        """Blocks big enough for ``seeds`` more seeds in each of ``rows`` (distinct), capped
        at ``size``: what a compiled admission may write without growing anything."""
        need = np.minimum(self.length[rows] + seeds, self.size)
        short = need > self.cap[rows]
        if short.any():
            self._move_many(rows[short], need[short])
        if self._top - self._used > max(self.COMPACT_MIN_ROWS, self._used // 2):
            self.compact()

    def compact(self) -> None:
        """Every block slid down to the lowest rows that hold it, in address order (a
        block never straddles two chunks); the chunks left empty are let go. Blocks move
        a batch at a time (at most a chunk's rows): a block only ever moves down, below
        the blocks after it, so no batch overwrites what a later one reads."""
        held = np.flatnonzero(self.cap > 0)
        held = held[np.argsort(self.base[held], kind="stable")]
        ends = np.r_[self._chunk_at[1:], self._chunk_at[-1] + len(self._chunks[-1])] \
            if self._chunks else np.zeros(0, np.int64)
        old, cap, n = self.base[held], self.cap[held], self.length[held]
        new = _packed(cap, self._chunk_at, ends)
        batch = max(len(c) for c in self._chunks) if self._chunks else 1
        lo = 0
        while lo < len(held):  # blocks in batches of about a chunk's rows
            hi = lo + max(1, int(np.searchsorted(np.cumsum(n[lo:]), batch, "right")))
            src, dst = _ranges(old[lo:hi], n[lo:hi]), _ranges(new[lo:hi], n[lo:hi])
            for a in (self.users, self.ts, self.seq):
                a[dst] = a[src]
            if len(src):
                self.scatter(dst, self.gather(src).astype(self.dtype))
            lo = hi
        top = int(new[-1] + cap[-1]) if len(held) else 0
        held_rows = np.zeros(len(self.users), np.bool_)
        held_rows[_ranges(new, n)] = True
        self.users[~held_rows] = -1
        self.base[held] = new
        self._free.clear()
        self._top = self._used = top
        keep = int(np.searchsorted(self._chunk_at, max(top - 1, 0), "right"))
        del self._chunks[keep:]
        self._chunk_at = self._chunk_at[:keep]
        while len(self._typed) > keep:
            self._typed.pop()

    def _move_many(self, rows: np.ndarray, need: np.ndarray) -> None:
        """``_move`` of many windows (distinct rows) at once, each into a block for
        ``need`` seeds: new blocks first, then one copy of all, then the old blocks
        freed (so no block is both read and written). Why: a warming worker moves
        thousands of windows a second, and one at a time they were 7% of its loop."""
        caps = np.array([block_rows(self.size, n) for n in need.tolist()], np.int64)
        bases = np.array([self._take(c) for c in caps.tolist()], np.int64)
        old, old_cap, n = self.base[rows], self.cap[rows], self.length[rows]
        src, dst = _ranges(old, n), _ranges(bases, n)
        for a in (self.users, self.ts, self.seq):
            a[dst] = a[src]
        if len(src):
            self.scatter(dst, self.gather(src).astype(self.dtype))
        for base, cap in zip(old[old_cap > 0].tolist(), old_cap[old_cap > 0].tolist(),
                             strict=True):
            self._give(base, cap)
        self.base[rows], self.cap[rows] = bases, caps

    def _move(self, row: int, rows: int) -> None:
        """Row ``row``'s window into a block of ``rows`` rows (its seeds keep their rows)."""
        base = self._take(rows)
        old, n = int(self.base[row]), int(self.length[row])
        for a in (self.users, self.ts, self.seq):
            a[base:base + n] = a[old:old + n]
        if n:
            self.block(base, n)[:] = self.block(old, n)
        self.users[base + n:base + rows] = -1
        if self.cap[row]:
            self._give(old, int(self.cap[row]))
        self.base[row], self.cap[row] = base, rows

    def _take(self, rows: int) -> int:
        self._used += rows
        free = self._free.get(rows)
        if free:
            return free.pop()
        end = int(self._chunk_at[-1]) + len(self._chunks[-1]) if self._chunks else 0
        if self._top + rows > end:  # a new chunk; what is left of the last one stays unused
            self._add_chunk(rows)
        self._top += rows
        return self._top - rows

    def _add_chunk(self, rows: int) -> None:
        most = max(self.CHUNK_BYTES // (self.dim * self.dtype.itemsize), 1)
        last = len(self._chunks[-1]) if self._chunks else 0
        self._top = int(self._chunk_at[-1]) + last if self._chunks else 0
        n = max(rows, min(most, max(1024, self._top // 4)))  # at most a fifth unused
        self._chunk_at = np.r_[self._chunk_at, self._top]
        self._chunks.append(np.zeros((n, self.dim), self.dtype))
        self._typed.append(self._chunks[-1].view(self._bits))
        total = self._top + n
        if total > len(self.users):  # bookkeeping: doubling, 32 bytes a row
            grow = max(total, 2 * len(self.users)) - len(self.users)
            self.users = np.r_[self.users, np.full(grow, -1, np.int64)]
            self.ts = np.r_[self.ts, np.zeros(grow)]
            self.seq = np.r_[self.seq, np.zeros(grow, np.int64)]
            self.writer = np.r_[self.writer, np.full(grow, -1, np.int64)]

    def _give(self, base: int, rows: int) -> None:
        self._used -= rows
        self.users[base:base + rows] = -1
        self._free.setdefault(rows, []).append(base)

    def release(self, row: int) -> None:
        """Forget row ``row``'s window; its block is reused."""
        if self.cap[row]:
            self._give(int(self.base[row]), int(self.cap[row]))
        self.base[row] = self.cap[row] = self.length[row] = 0
        self.last_ts[row] = 0.0

    # ------------------------------------------------------------- vectors
    def block(self, base: int, n: int) -> np.ndarray:
        """[n, d] the vectors of arena rows base..base+n-1 (one block: a view)."""
        c = int(np.searchsorted(self._chunk_at, base, "right")) - 1
        at = base - int(self._chunk_at[c])
        return self._chunks[c][at:at + n]

    def gather(self, arow: np.ndarray) -> np.ndarray:
        """[n, d] float32 vectors of arena rows ``arow``."""
        out = np.empty((len(arow), self.dim), self._bits)
        if len(arow):
            _gather(self._typed, self._chunk_at, np.asarray(arow, np.int64), out)
        return out.view(self.dtype).astype(np.float32)

    def scatter(self, arow: np.ndarray, x: np.ndarray) -> None:
        """Vectors ``x`` into arena rows ``arow`` (distinct)."""
        if len(arow):
            _scatter(self._typed, self._chunk_at, np.asarray(arow, np.int64),
                     np.ascontiguousarray(x, self.dtype).view(self._bits))

    # ------------------------------------------------------------- reading
    def order(self, row: int) -> np.ndarray:
        """Window rows of ``row``'s seeds, oldest first (click time, then admission)."""
        b, n = int(self.base[row]), int(self.length[row])
        return np.lexsort((self.seq[b:b + n], self.ts[b:b + n]))

    def stored(self, row: int) -> np.ndarray:
        """[n, d] ``row``'s vectors by window row, as stored (a view)."""
        n = int(self.length[row])
        return self.block(int(self.base[row]), n) if n else np.empty((0, self.dim), self.dtype)

    def load(self, row: int, users: list[int], ts: list[float], vectors: np.ndarray,
             rows: list[int] | None = None) -> np.ndarray:
        """Become row ``row``'s window of distinct ``users`` (oldest first) at once, as a
        snapshot holds it: what admitting them one at a time would build (the last
        ``size`` when there are more). ``rows``: each seed's window row (a permutation
        of 0..n-1; default in window order), so a restored window stores its vectors
        where the original did and sums over them come out the same. Returns the window
        rows of the seeds kept, oldest first."""
        users, ts, vectors = users[-self.size:], ts[-self.size:], vectors[-self.size:]
        n = len(users)
        at = np.arange(n) if rows is None else np.asarray(rows, np.int64)[-n:]
        if sorted(at.tolist()) != list(range(n)):
            raise ValueError("a window's rows must be 0..n-1, each once")
        if len(set(users)) != n:
            raise ValueError("a window's users must be distinct")
        self.release(row)
        self._move(row, block_rows(self.size, n))
        b = int(self.base[row])
        self.users[b + at] = users
        self.ts[b + at] = ts
        self.seq[b + at] = self.next_seq + np.arange(n)  # ties keep the snapshot's order
        self.next_seq += n
        if n:
            self.block(b, n)[at] = vectors
        self.length[row] = n
        self.last_ts[row] = max(ts, default=0.0)
        return at

    def used_bytes(self) -> int:
        """Bytes of the blocks windows hold (vectors and bookkeeping); kept current."""
        return self._used * (self.dim * self.dtype.itemsize + BOOKKEEPING_BYTES)

    def nbytes(self, row: int) -> int:
        """Bytes of ``row``'s block (vectors and bookkeeping)."""
        return int(self.cap[row]) * (self.dim * self.dtype.itemsize + BOOKKEEPING_BYTES)


@numba.njit(cache=True, nogil=True)
def _packed(caps: np.ndarray, chunk_at: np.ndarray,
            chunk_end: np.ndarray) -> np.ndarray:  # pragma: no cover (compiled)
    """Bases of blocks of ``caps`` rows laid one after the other from row 0, each in one
    chunk (a block that would cross a chunk's end starts the next chunk)."""
    out = np.empty(len(caps), np.int64)
    dst, c = 0, 0
    for i in range(len(caps)):
        while dst + caps[i] > chunk_end[c]:
            c += 1
            dst = max(dst, chunk_at[c])
        out[i] = dst
        dst += caps[i]
    return out


@numba.njit(cache=True, nogil=True)
def _scatter(chunks: List, chunk_at: np.ndarray, arow: np.ndarray,
             x: np.ndarray) -> None:  # pragma: no cover (compiled)
    """Row i of ``x`` into arena row ``arow[i]`` (its chunk found by binary search)."""
    for i in range(arow.shape[0]):
        c = np.searchsorted(chunk_at, arow[i], "right") - 1
        chunks[c][arow[i] - chunk_at[c], :] = x[i, :]


@numba.njit(cache=True, nogil=True)
def _gather(chunks: List, chunk_at: np.ndarray, arow: np.ndarray,
            out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """Arena row ``arow[i]`` into row i of ``out``."""
    for i in range(arow.shape[0]):
        c = np.searchsorted(chunk_at, arow[i], "right") - 1
        out[i, :] = chunks[c][arow[i] - chunk_at[c], :]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """start..start+length-1 of each (start, length), concatenated."""
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(total)


@numba.njit(cache=True, nogil=True)
def admit(run_row: np.ndarray, run_lo: np.ndarray, run_hi: np.ndarray, users: np.ndarray,
          ts: np.ndarray, size: int, base: np.ndarray, length: np.ndarray,
          last_ts: np.ndarray, w_users: np.ndarray, w_ts: np.ndarray, w_seq: np.ndarray,
          writer: np.ndarray, seq: int, room: np.ndarray, tokens: float, stopped: np.ndarray,
          stops: np.ndarray, out: np.ndarray,
          run_accepted: np.ndarray) -> tuple[int, int, int, int]:
    """Admit the seeds of runs ``run_lo[r]:run_hi[r]`` (each one item's, at table row
    ``run_row[r]``) into their windows, in run order, seed by seed.

    A run stops before a seed of an item with no ``room`` left (due for its
    refresh) while refresh ``tokens`` remain for the items stopped so far; a later
    run of a stopped item waits whole (``stopped``), so each item's seeds stay in
    order; ``stops`` lists the stopped items' rows in the order they stopped.
    ``run_lo`` becomes where each run goes on. Per admitted seed, a row of
    ``out``: its index, its item's table row, its window row, whether a seed left
    that row, the arena row and the earlier admission of this call that wrote that
    arena row (-1: none; the vector that leaves is then that seed's). Blocks must
    hold every seed admitted (``WindowStore.reserve``). Returns (seeds admitted,
    the next admission number, seeds the windows grew by, items stopped).
    """  # pragma: no cover (compiled)
    k, held, n_stopped = 0, 0, 0
    for r in range(run_row.shape[0]):
        row = run_row[r]
        if stopped[row]:
            continue
        b = base[row]
        left = room[row]
        j, hi, got = run_lo[r], run_hi[r], 0
        while j < hi:
            if left <= 0 and tokens - n_stopped >= 1:  # due: refreshed before this seed
                break
            u, t, n = users[j], ts[j], length[row]
            w = -1
            for q in range(n):
                if w_users[b + q] == u:
                    w = q
                    break
            if w >= 0:
                if w_ts[b + w] >= t:  # a duplicate or a stale replay
                    j += 1
                    continue
                leaves = True
            elif n >= size:
                w = 0
                for q in range(1, n):
                    if w_ts[b + q] < w_ts[b + w] or (
                            w_ts[b + q] == w_ts[b + w] and w_seq[b + q] < w_seq[b + w]):
                        w = q
                if t <= w_ts[b + w]:  # would be evicted at once: a replay of an evicted seed
                    j += 1
                    continue
                leaves = True
            else:
                w = n
                length[row] = n + 1
                held += 1
                leaves = False
            a = b + w
            w_users[a], w_ts[a], w_seq[a] = u, t, seq
            seq += 1
            out[k, 0], out[k, 1], out[k, 2] = j, row, w
            out[k, 3], out[k, 4], out[k, 5] = leaves, a, writer[a]
            writer[a] = k
            k += 1
            got += 1
            left -= 1
            if t > last_ts[row]:
                last_ts[row] = t
            j += 1
        room[row] = left
        run_lo[r] = j
        run_accepted[r] += got
        if j < hi:
            stopped[row] = True
            stops[n_stopped] = row
            n_stopped += 1
    return k, seq, held, n_stopped


class SeedWindow:
    """One item's window in its store: what snapshots, metrics and tests read."""

    __slots__ = ("store", "row")

    def __init__(self, store: WindowStore, row: int):
        self.store, self.row = store, row

    def __len__(self) -> int:
        return int(self.store.length[self.row])

    def __contains__(self, user: int) -> bool:
        return user in self.users()

    def _at(self) -> np.ndarray:
        """Arena rows of the seeds, oldest first."""
        return self.store.base[self.row] + self.store.order(self.row)

    def users(self) -> list[int]:
        """Oldest first, newest last."""
        return self.store.users[self._at()].tolist()

    def times(self) -> list[float]:
        """Click times, oldest first."""
        return self.store.ts[self._at()].tolist()

    def vectors(self) -> np.ndarray:
        """[n, d] float32 embeddings in window order."""
        return self.ordered().astype(np.float32, copy=False)

    def ordered(self) -> np.ndarray:
        """[n, d] embeddings in window order, as stored (a snapshot keeps the dtype)."""
        return self.stored()[self.store.order(self.row)]

    def stored(self) -> np.ndarray:
        """[n, d] stored vectors in window-row order (not window order): k-means needs no
        order, and a seed's labels are by window row."""
        return self.store.stored(self.row)

    def newest_ts(self) -> float:
        return max(self.times(), default=float("-inf"))

    def nbytes(self) -> int:
        return self.store.nbytes(self.row)
