"""The RALM user and look-alike towers' forward pass in plain numpy, for serving.

Why: a scoring request embeds one user, and at batch 1 torch's per-module
dispatch is most of the cost (17 module calls: ~0.6 ms here, against ~0.1 ms
for the same arithmetic in numpy). The torch towers stay the reference: this
path reads their weights once and must give the same embeddings (tested in
tests/test_ralm.py), so a trained model needs no export step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

from models.features import FeatureSpace, UserBatch


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy().copy()


def _t(t: torch.Tensor) -> np.ndarray:
    """A Linear weight [out, in] as a contiguous [in, out]: ``x @ w.T`` without a strided
    operand (measured 1.3-1.8x faster per product at batch 1)."""
    return np.ascontiguousarray(_np(t).T)


def _zero_row(table: np.ndarray) -> np.ndarray:
    table[0] = 0.0  # the bag skips padding ids whatever their row holds; a zero row sums to 0
    return table


@dataclass(frozen=True)
class NumpyTowers:
    """Frozen copies of the weights the embedding path reads (the towers are in eval mode),
    some of them pre-multiplied (below)."""

    categorical: tuple[np.ndarray, ...]  # one [card, m] table per categorical field
    cat_logits: tuple[np.ndarray, ...]  # [card] each row's attention-merge logit (merge)
    items: np.ndarray  # [n_items + 1, m]; row 0 is padding
    genres: np.ndarray  # [n_genres + 1, m]
    to_item: np.ndarray  # [n_catalogue + 1] catalogue row -> row of ``items`` (0: none)
    genre_at: np.ndarray  # [n_catalogue + 2] where each catalogue row's genres start ...
    genre_of: np.ndarray  # ... in this flat list of genre indices
    cont_wt: np.ndarray  # [3, m]
    cont_b: np.ndarray  # [m]
    merge_w1t: np.ndarray | None  # [m, a] attention merge (None: concatenation)
    merge_w2t: np.ndarray | None  # [a, 1]
    mlp1: tuple[np.ndarray, np.ndarray]  # the MLP's first Linear, [in, out] and bias
    head: tuple[np.ndarray, np.ndarray]  # its second Linear and the transforming Linear, fused
    transform_relu: bool  # ... followed by a ReLU (RalmConfig.transform)
    local_wt: np.ndarray  # [h, h] W_lᵀ of the local attention: E_u W_l = u @ local_wt

    @classmethod
    def of(cls, user_tower: torch.nn.Module, lookalike: torch.nn.Module,
           features: FeatureSpace) -> NumpyTowers:
        """Why the pre-multiplied weights: a categorical field's merge logit
        tanh(e W1) W2 depends on its table row alone, so it is read, not computed (half
        of the merge's products and tanh); the MLP's second Linear and the look-alike
        transforming Linear have nothing between them, so they are one product."""
        f, merge = user_tower.fields, user_tower.merge
        attention = hasattr(merge, "w1")
        first, second = user_tower.mlp[0], user_tower.mlp[2]
        lin = lookalike.transform[0]
        tables = tuple(_np(e.weight) for e in f.categorical)
        w1t = _t(merge.w1.weight) if attention else None
        w2t = _t(merge.w2.weight) if attention else None
        logits = tuple(np.zeros(len(t), np.float32) if w1t is None else
                       (np.tanh(t @ w1t) @ w2t)[:, 0] for t in tables)
        w2, b2 = _np(second.weight).astype(np.float64), _np(second.bias).astype(np.float64)
        tw, tb = _np(lin.weight).astype(np.float64), _np(lin.bias).astype(np.float64)
        lookup = features.lookup_tables()
        hot = lookup["multi_hot"]
        rows, genre = np.nonzero(hot)
        at = np.zeros(len(hot) + 1, np.int64)
        np.add.at(at, rows + 1, 1)
        return cls(
            categorical=tables, cat_logits=logits,
            items=_zero_row(_np(f.items.weight)), genres=_np(f.genres.weight),
            to_item=lookup["to_item"], genre_at=np.cumsum(at), genre_of=genre.astype(np.int64),
            cont_wt=_t(f.continuous.weight), cont_b=_np(f.continuous.bias),
            merge_w1t=w1t, merge_w2t=w2t,
            mlp1=(_t(first.weight), _np(first.bias)),
            head=(np.ascontiguousarray((tw @ w2).T, np.float32),
                  (tw @ b2 + tb).astype(np.float32)),
            transform_relu=len(lookalike.transform) > 1,
            local_wt=np.ascontiguousarray(_np(lookalike.local_w.weight).T),
        )

    def embed(self, batch: UserBatch) -> np.ndarray:
        """[B, h] look-alike embeddings: ``lookalike.transform(user_tower(batch))``."""
        items = batch.items.numpy()
        genres = batch.genres.numpy()
        total = np.maximum(genres.sum(1, keepdims=True), 1.0)
        pooled = np.empty((len(items), 3, self.items.shape[1]), np.float32)
        pooled[:, 0] = self._item_mean(items)
        pooled[:, 1] = (genres / total) @ self.genres
        return self._from_pooled(batch.categorical.numpy(), batch.continuous.numpy(), pooled)

    def embed_rows(self, categorical: np.ndarray, continuous: np.ndarray,
                   history_rows: np.ndarray) -> np.ndarray:
        """What :meth:`embed` gives for ``FeatureSpace.batch(categorical, continuous,
        history_rows)``, without building the batch. Why: building it (each history's
        genre counts from the multi-hot table) and pooling the items cost more than
        the rest of the tower on a poll of clicks (bench ingest). Both means are order
        free, so the rows may come in any order (a user's history ring as it lies)."""
        rows = np.ascontiguousarray(history_rows)
        if rows.dtype not in (np.int32, np.int64):
            rows = rows.astype(np.int64)
        pooled = np.empty((len(rows), 3, self.items.shape[1]), np.float32)
        _pool_rows(rows, self.to_item, self.genre_at, self.genre_of, self.items, self.genres,
                   pooled)
        return self._from_pooled(np.asarray(categorical, np.int64),
                                 np.asarray(continuous, np.float32), pooled)

    def _from_pooled(self, cat: np.ndarray, cont: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        """The tower from the pooled fields on (``pooled`` [B, 3, m]: the item and genre
        means in 0 and 1; the continuous field goes in 2): merge, MLP, transform."""
        b, m = len(cat), pooled.shape[2]
        cats = [table[cat[:, i]] for i, table in enumerate(self.categorical)]
        pooled[:, 2] = cont @ self.cont_wt + self.cont_b
        if self.merge_w1t is None:
            merged = np.concatenate([*cats, pooled.reshape(b, 3 * m)], axis=1)
        else:
            s = np.empty((b, len(cats) + 3), np.float32)
            for i, logit in enumerate(self.cat_logits):
                s[:, i] = logit[cat[:, i]]
            hidden = _tanh(_mm(pooled.reshape(b * 3, m), self.merge_w1t))
            s[:, len(cats):] = (hidden @ self.merge_w2t).reshape(b, 3)
            w = np.exp(s - s.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            merged = (w[:, len(cats):, None] * pooled).sum(1)
            for i, field in enumerate(cats):
                merged += w[:, i, None] * field
        (w1, b1), (hw, hb) = self.mlp1, self.head
        z = _mm(np.maximum(_mm(merged, w1) + b1, 0.0), hw) + hb
        return (np.maximum(z, 0.0) if self.transform_relu else z).astype(np.float32, copy=False)

    def _item_mean(self, items: np.ndarray) -> np.ndarray:
        """EmbeddingBag(mode="mean", padding_idx=0): mean over non-padding ids, 0 if none."""
        n = (items != 0).sum(1, keepdims=True)
        return self.items[items].sum(1) / np.maximum(n, 1)  # row 0 is zero: padding adds 0


def _tanh(x: np.ndarray) -> np.ndarray:
    """torch's vectorised tanh on the same memory: numpy's float32 tanh is scalar code,
    ~3x slower here on a poll's [B, 3, a] logits."""
    return torch.tanh(torch.from_numpy(x)).numpy()


#: from this many rows, :func:`_mm` runs torch's GEMM
TORCH_MM_ROWS = 64


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (float32, 2-D). Why torch's above :data:`TORCH_MM_ROWS` rows: on a
    poll's users its GEMM took half the time of numpy's OpenBLAS here ([1,900, 128] ×
    [128, 128]: 1.0 against 2.2 µs a row); below, its dispatch costs more than the
    product (a request's one user)."""
    if len(a) < TORCH_MM_ROWS:
        return a @ b
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).mm(torch.from_numpy(b)).numpy()


@numba.njit(cache=True, nogil=True)
def _pool_rows(rows: np.ndarray, to_item: np.ndarray, genre_at: np.ndarray,
               genre_of: np.ndarray, items: np.ndarray, genres: np.ndarray,
               out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out[b, 0]: the mean embedding of user b's known items (EmbeddingBag "mean");
    out[b, 1]: the mean embedding of their items' genres, each genre of each click
    once (the multi-hot counts over their total, times the genre table); out[b, 2]
    is left alone."""
    m = items.shape[1]
    for b in range(rows.shape[0]):
        acc_i, acc_g = out[b, 0], out[b, 1]
        acc_i[:] = 0.0
        acc_g[:] = 0.0
        n_i, n_g = 0, 0
        for r in rows[b]:
            it = to_item[r]
            if it != 0:
                n_i += 1
                for j in range(m):
                    acc_i[j] += items[it, j]
            for p in range(genre_at[r], genre_at[r + 1]):
                n_g += 1
                g = genre_of[p]
                for j in range(m):
                    acc_g[j] += genres[g, j]
        if n_i > 1:
            acc_i /= n_i
        if n_g > 1:
            acc_g /= n_g


# ---------------------------------------------------------------- the re-rank


@numba.njit(cache=True, nogil=True, fastmath=True, inline="always")
def _tanh32(x: float) -> float:  # pragma: no cover - compiled
    """float32 tanh as a rational function (Eigen's, odd 13/6, exact to a few ulp,
    clamped where tanh rounds to ±1). Why not ``np.tanh``: numba calls libm per
    element, ~25 ns, which was a third of the re-rank; this one vectorises."""
    x = min(max(x, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    x2 = x * x
    p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = x2 * p + np.float32(-8.60467152213735e-11)
    p = x2 * p + np.float32(5.12229709037114e-08)
    p = x2 * p + np.float32(1.48572235717979e-05)
    p = x2 * p + np.float32(6.37261928875436e-04)
    p = x2 * p + np.float32(4.89352455891786e-03)
    q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = x2 * q + np.float32(2.26843463243900e-03)
    q = x2 * q + np.float32(4.89352518554385e-03)
    return x * p / q


@numba.njit(cache=True, nogil=True, fastmath=True, inline="always")
def _exp_near(x: float) -> float:  # pragma: no cover - compiled
    """exp(x) for x in [-2, 0] (a softmax over tanh logits), as exp(x/4)⁴ with exp(x/4)
    by its Taylor series to degree 7 (error below 1e-7 before the square-squaring).
    Why: the same as :func:`_tanh32`, and the argument's range needs no reduction."""
    y = x * np.float32(0.25)
    p = np.float32(1.0 / 5040.0)
    p = p * y + np.float32(1.0 / 720.0)
    p = p * y + np.float32(1.0 / 120.0)
    p = p * y + np.float32(1.0 / 24.0)
    p = p * y + np.float32(1.0 / 6.0)
    p = p * y + np.float32(0.5)
    p = p * y + np.float32(1.0)
    p = p * y + np.float32(1.0)
    p = p * p
    return p * p


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def score_slots(users: np.ndarray, queries: np.ndarray, slots: np.ndarray, ok: np.ndarray,
                centroids: np.ndarray, counts: np.ndarray, item_global: np.ndarray,
                gram: np.ndarray, alpha: float, beta: float, scores: np.ndarray,
                attention: np.ndarray) -> None:  # pragma: no cover - compiled
    """RALM's score (``RalmModel.score_table``) of every slot [B, C] of a centroid
    table for its row's user, NaN where not ``ok``; ``attention`` [B, C, k] gets the
    local attention weights when it has rows (explanations).

    Why one compiled pass: the re-rank reads ~200-400 items' k × h centroids a
    request, from a table far larger than the cache. Here each centroid is read once
    and dotted with both queries (E_u and E_u W_l) while in cache; empty centroid
    slots are not read at all, and the scores come out without the [B, C, k]
    intermediates numpy built (Faiss's by-index products read every centroid twice)."""
    b_n, c_n = slots.shape
    k, h = centroids.shape[1], centroids.shape[2]
    d0 = np.empty(k, np.float32)
    w = np.empty(k, np.float32)
    used = np.empty(k, np.float32)
    explain = attention.shape[0] > 0
    norms = np.empty(b_n, np.float32)
    for b in range(b_n):
        norms[b] = max(np.sqrt(np.float32((users[b] * users[b]).sum())), np.float32(1e-12))
    for f in _by_slot(slots, ok, len(centroids)):
        b, c = f // c_n, f % c_n
        if not ok[b, c]:
            scores[b, c] = np.nan
            continue
        s, u, q, u_norm = slots[b, c], users[b], queries[b], norms[b]
        for j in range(k):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            used[j] = counts[s, j] > 0
            if used[j]:  # an empty slot's centroid is never read
                row = centroids[s, j]
                for i in range(h):
                    a0 += row[i] * u[i]
                    a1 += row[i] * q[i]
            d0[j] = a0
            w[j] = a1
        for j in range(k):
            w[j] = _tanh32(w[j])
        top = np.float32(-1.0)
        for j in range(k):
            top = max(top, w[j] if used[j] else np.float32(-1.0))
        total = np.float32(0.0)
        for j in range(k):
            w[j] = _exp_near(w[j] - top) * used[j]
            total += w[j]
        dot = np.float32(0.0)
        sq = np.float32(0.0)
        if total > 0:
            for j in range(k):
                w[j] /= total
            for j in range(k):
                if w[j] != 0:
                    dot += w[j] * d0[j]
                    g = np.float32(0.0)
                    for i in range(k):
                        g += gram[s, j, i] * w[i]
                    sq += w[j] * g
        local = dot / max(np.sqrt(max(sq, np.float32(0.0))), np.float32(1e-12)) / u_norm
        gdot = np.float32(0.0)
        for i in range(h):
            gdot += item_global[s, i] * u[i]
        scores[b, c] = alpha * (gdot / u_norm) + beta * local
        if explain:
            attention[b, c] = w


@numba.njit(cache=True, nogil=True)
def _by_slot(slots: np.ndarray, ok: np.ndarray, n: int) -> np.ndarray:  # pragma: no cover
    """The flat indices of ``slots`` [B, C] grouped by slot (a counting sort; the rows
    not ``ok`` first). Why: in a batch, users share candidates (the popular items, and
    the index's favourites); scored one after another, a shared item's centroids are
    read from memory once and from cache for the rest. One row is left in order."""
    flat, good = slots.ravel(), ok.ravel()
    if slots.shape[0] == 1:
        return np.arange(flat.size)
    at = np.zeros(n + 2, np.int64)  # at[key]: where key's indices go next
    for f in range(flat.size):
        at[(flat[f] + 1 if good[f] else 0) + 1] += 1
    for key in range(1, n + 2):
        at[key] += at[key - 1]
    out = np.empty(flat.size, np.int64)
    for f in range(flat.size):
        key = flat[f] + 1 if good[f] else 0
        out[at[key]] = f
        at[key] += 1
    return out
