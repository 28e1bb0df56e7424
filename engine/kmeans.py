"""Incremental mini-batch k-means for per-item seed centroids.

The online update is scikit-learn's ``MiniBatchKMeans`` step (Sculley 2010, as
implemented in ``sklearn.cluster._kmeans._mini_batch_step``): every centroid is
the running mean of the points assigned to it, so a batch moves a centroid by
``(sum(x) - n·c) / (count + n)``. With ``count_cap=None`` and no random
reassignment the result equals scikit-learn's ``partial_fit`` exactly (the unit
tests compare the two). Plain mini-batch k-means slows down forever as counts
grow; a seed window forgets old users, so by default the counts are capped at
the window size and the centroids keep tracking the window's current seeds.

Empty slots (an item with fewer than k distinct seeds so far) have count 0; a
new point goes to an empty slot before it is averaged into a used one, so the
first k seeds each found a centroid.
"""

from __future__ import annotations

import threading

import numpy as np


def _sq_dists(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[n, k] squared Euclidean distances."""
    return (
        (x * x).sum(1)[:, None]
        - 2.0 * x @ centroids.T
        + (centroids * centroids).sum(1)[None, :]
    )


def assign(x: np.ndarray, centroids: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Nearest used centroid per row of ``x`` (slots with count 0 are skipped)."""
    d = _sq_dists(x, centroids)
    if counts is not None:
        d[:, counts <= 0] = np.inf
    return d.argmin(1)


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums [k, d] (float64) and sizes [k]: one-hot matmul, ~10x ``np.add.at``."""
    onehot = np.zeros((k, len(x)), np.float64)
    onehot[labels, np.arange(len(x))] = 1.0
    return onehot @ x.astype(np.float64), onehot.sum(1)


def empty(k: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """k unused slots."""
    return np.zeros((k, dim), np.float32), np.zeros(k, np.float32)


def partial_fit(
    centroids: np.ndarray,
    counts: np.ndarray,
    x: np.ndarray,
    count_cap: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One mini-batch step with new points ``x`` [n, d]; returns new arrays.

    Points first fill empty slots (in order), the rest are averaged into their
    nearest used centroid with the mini-batch learning rate 1/count.
    """
    centroids = centroids.astype(np.float32, copy=True)
    counts = counts.astype(np.float32, copy=True)
    x = np.asarray(x, np.float32)
    free = np.flatnonzero(counts <= 0)
    n_new = min(len(free), len(x))
    if n_new:
        centroids[free[:n_new]] = x[:n_new]
        counts[free[:n_new]] = 1.0
        x = x[n_new:]
    if len(x) == 0:
        return centroids, counts
    labels = assign(x, centroids, counts)
    sums, n = _cluster_sums(x, labels, len(centroids))
    moved = n > 0
    old = counts[moved].astype(np.float64)
    if count_cap is not None:
        old = np.minimum(old, count_cap)
    total = old + n[moved]
    centroids[moved] = (centroids[moved] * old[:, None] + sums[moved]) / total[:, None]
    counts[moved] = total
    return centroids, counts


def fit(
    x: np.ndarray, k: int, n_iter: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Batch k-means (k-means++ init, Lloyd iterations) of a whole window.

    Used for the per-epoch refresh of RALM training and for full refreshes of
    a window. Fewer than k points: each point is a centroid and the other
    slots are empty (count 0).
    """
    x = np.asarray(x, np.float32)
    n, dim = x.shape
    centroids, counts = empty(k, dim)
    if n <= k:
        centroids[:n] = x
        counts[:n] = 1.0
        return centroids, counts
    rng = np.random.default_rng(seed)
    centroids = _kmeanspp(x, k, rng)
    for _ in range(n_iter):
        labels = assign(x, centroids)
        new, cnt = _cluster_sums(x, labels, k)
        used = cnt > 0
        new[used] /= cnt[used, None]
        new[~used] = centroids[~used]  # an emptied centroid stays where it was
        shift = float(np.abs(new - centroids).max())
        centroids = new.astype(np.float32)
        if shift < 1e-6:
            break
    labels = assign(x, centroids)
    counts = np.bincount(labels, minlength=k).astype(np.float32)
    return centroids, counts


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007)."""
    n = len(x)
    idx = [int(rng.integers(n))]
    d2 = _sq_dists(x, x[idx]).ravel().clip(min=0)
    for _ in range(1, k):
        total = d2.sum()
        j = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        idx.append(j)
        d2 = np.minimum(d2, _sq_dists(x, x[[j]]).ravel().clip(min=0))
    return x[idx].copy()


def inertia(x: np.ndarray, centroids: np.ndarray, counts: np.ndarray | None = None) -> float:
    """Sum of squared distances to the nearest used centroid."""
    d = _sq_dists(np.asarray(x, np.float32), centroids)
    if counts is not None:
        d[:, counts <= 0] = np.inf
    return float(d.min(1).clip(min=0).sum())


def partial_fit_many(
    centroids: np.ndarray,
    counts: np.ndarray,
    x: np.ndarray,
    owner: np.ndarray,
    count_cap: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``partial_fit`` of M items in one vectorised step; returns new arrays.

    centroids [M, k, d], counts [M, k], points x [P, d] in arrival order with
    ``owner`` [P] in 0..M-1. Equals calling ``partial_fit`` per item with its
    points in order (tests compare).
    """
    centroids = np.array(centroids, np.float32)  # one copy; callers' arrays stay as they were
    counts = np.array(counts, np.float32)
    partial_fit_rows(centroids, counts, x, owner, count_cap)
    return centroids, counts


_local = threading.local()
_SCRATCH_KEEP = 8192  # points: a kept buffer is at most 8192 x k x d floats (84 MB at 20 x 128)


def _scratch(n: int, shape: tuple[int, ...]) -> np.ndarray:
    """A reused [n, *shape] float32 buffer for the step's one gather (per thread).

    A fresh 10 MB array per poll is mapped, page-faulted and unmapped every
    time; on a busy machine that cost more than the arithmetic.
    """
    if n > _SCRATCH_KEEP:  # a rare huge batch (a replay): not worth holding on to
        return np.empty((n, *shape), np.float32)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape[1:] != shape or len(buf) < n:
        buf = _local.buf = np.empty((max(n, 2 * len(buf) if buf is not None and
                                         buf.shape[1:] == shape else n), *shape), np.float32)
    return buf[:n]


def _dots(centroids: np.ndarray, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[P, k] x_p · centroids[rows_p, j], read in place (Faiss by-index inner products).

    Why: gathering each point's item's k centroids first copied 10 KB per seed
    (20 x 128 floats) before reading them again; that copy was half a poll's
    k-means time.
    """
    import faiss

    k, d = centroids.shape[1], centroids.shape[2]
    ids = np.ascontiguousarray(rows[:, None] * k + np.arange(k))
    xc = np.ascontiguousarray(x, np.float32)
    out = np.empty((len(xc), k), np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(xc),
                                     faiss.swig_ptr(centroids.reshape(-1, d)),
                                     faiss.swig_ptr(ids), d, len(xc), k)
    return out


def partial_fit_rows(
    centroids: np.ndarray,
    counts: np.ndarray,
    x: np.ndarray,
    owner: np.ndarray,
    count_cap: float | None = None,
    sqnorms: np.ndarray | None = None,
) -> None:
    """``partial_fit_many`` in place on the rows ``owner`` names of a [capacity, k, d] table.

    Only the touched rows are read and written, so a worker keeps all its
    items' centroids in one preallocated table and pays per poll for the
    items the poll touched, not for the table. ``sqnorms`` [capacity, k], if
    given, holds every centroid's squared norm and is kept current (it saves
    recomputing them per point).

    Points fill an item's empty slots first (slots fill in order, so an
    item's used slots are a prefix), the rest go to the nearest used
    centroid; then one running-mean update per slot. One call per poll batch
    instead of one per item is what lets a clustering worker keep up with
    ~10^5 seed events/s.
    """
    x = np.asarray(x, np.float32)
    owner = np.asarray(owner, np.int64)
    if len(x) == 0:
        return
    k = centroids.shape[1]
    # rank of each point among its item's points (arrival order)
    order = np.argsort(owner, kind="stable")
    first = np.r_[0, np.flatnonzero(np.diff(owner[order])) + 1]
    rank = np.empty(len(x), np.int64)
    rank[order] = np.arange(len(x)) - np.repeat(first, np.diff(np.r_[first, len(x)]))
    used = (counts[owner] > 0).sum(1)  # [P]: used slots of each point's item
    fills = rank < (k - used)
    if fills.any():
        rows, slot = owner[fills], used[fills] + rank[fills]
        centroids[rows, slot] = x[fills]
        counts[rows, slot] = 1.0
        if sqnorms is not None:
            sqnorms[rows, slot] = (x[fills] ** 2).sum(1)
    rest = ~fills
    if not rest.any():
        return
    xr, gr = x[rest], owner[rest]
    if sqnorms is not None and centroids.flags.c_contiguous and centroids.dtype == np.float32:
        d2 = sqnorms[gr] - 2.0 * _dots(centroids, gr, xr)  # + |x|², the same for every slot
    else:
        cg = np.take(centroids, gr, axis=0, out=_scratch(len(gr), centroids.shape[1:]))
        d2 = np.einsum("pkd,pkd->pk", cg, cg) - 2.0 * np.einsum("pkd,pd->pk", cg, xr)
    d2[counts[gr] <= 0] = np.inf
    flat = gr * k + d2.argmin(1)  # (item, slot) of each point
    by_slot = np.argsort(flat, kind="stable")
    uniq, starts, n = np.unique(flat[by_slot], return_index=True, return_counts=True)
    sums = np.add.reduceat(xr[by_slot].astype(np.float64), starts, axis=0)
    n = n.astype(np.float64)
    items, slots = uniq // k, uniq % k
    old = counts[items, slots].astype(np.float64)
    if count_cap is not None:
        old = np.minimum(old, count_cap)
    total = old + n
    new = ((centroids[items, slots] * old[:, None] + sums) / total[:, None]).astype(np.float32)
    centroids[items, slots] = new
    counts[items, slots] = total
    if sqnorms is not None:
        sqnorms[items, slots] = (new * new).sum(1)


def lloyd_batched(
    x: np.ndarray, lengths: np.ndarray, centroids: np.ndarray, counts: np.ndarray,
    iters: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd steps of B items at once, from their current centroids (a warm refresh).

    x [B, S, d] windows padded to S rows (item b's first ``lengths[b]`` rows
    are its points), centroids [B, k, d], counts [B, k] (0: empty slot, never
    assigned). Each step assigns every point to its nearest used centroid and
    moves each centroid to its points' mean; a centroid left without points
    stays and gets count 0. Returns new centroids and counts (= cluster
    sizes). One step equals a fresh scikit-learn ``MiniBatchKMeans`` with
    ``init`` = the current centroids doing ``partial_fit(window)`` per item
    (tests compare); batched matmuls in torch do it for thousands of items
    per call instead of one Python round trip each.
    """
    import torch

    b, s, d = x.shape
    k = centroids.shape[1]
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    ct = torch.from_numpy(np.array(centroids, np.float32))
    used = torch.from_numpy(np.asarray(counts) > 0)
    valid = torch.arange(s)[None, :] < torch.from_numpy(np.asarray(lengths, np.int64))[:, None]
    # every point's centroid as one flat row id; padding rows go to a spare last row
    base, spare = (torch.arange(b) * k)[:, None], b * k
    points = xt.reshape(b * s, d)
    n = torch.zeros(b, k)
    for _ in range(iters):
        # ||c||² - 2 x·c, an empty slot's ||c||² = inf so nothing picks it (no masking pass)
        bias = (ct * ct).sum(2).masked_fill_(~used, float("inf"))
        d2 = torch.baddbmm(bias[:, None, :], xt, ct.transpose(1, 2), alpha=-2.0)
        row = torch.where(valid, d2.argmin(2) + base, spare).reshape(-1)
        # index_add_ over the points: 0.28 ms a chunk of 32 x 256 x 128 here, against
        # 0.82 ms for a one-hot matrix and a bmm (torch 2.13, one thread)
        sums = torch.zeros(spare + 1, d).index_add_(0, row, points)[:spare].reshape(b, k, d)
        n = torch.bincount(row, minlength=spare + 1)[:spare].reshape(b, k).to(torch.float32)
        moved = n > 0
        ct = torch.where(moved[:, :, None], sums / n.clamp(min=1.0)[:, :, None], ct)
        used = moved | used  # an emptied slot keeps its centroid this step
    return ct.numpy(), n.numpy()
