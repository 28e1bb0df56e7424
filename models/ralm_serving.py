"""The RALM user and look-alike towers' forward pass in plain numpy, for serving.

Why: a scoring request embeds one user, and at batch 1 torch's per-module
dispatch is most of the cost (17 module calls: ~0.6 ms here, against ~0.1 ms
for the same arithmetic in numpy). The torch towers stay the reference: this
path reads their weights once and must give the same embeddings (tested in
tests/test_ralm.py), so a trained model needs no export step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.features import UserBatch


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
    """Frozen copies of the weights the embedding path reads (the towers are in eval mode)."""

    categorical: tuple[np.ndarray, ...]  # one [card, m] table per categorical field
    items: np.ndarray  # [n_items + 1, m]; row 0 is padding
    genres: np.ndarray  # [n_genres + 1, m]
    cont_wt: np.ndarray  # [3, m]
    cont_b: np.ndarray  # [m]
    merge_w1t: np.ndarray | None  # [m, a] attention merge (None: concatenation)
    merge_w2t: np.ndarray | None  # [a, 1]
    mlp: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # ([in, out], b)
    transform: tuple[np.ndarray, np.ndarray]  # look-alike transforming layer (Linear)
    transform_relu: bool  # ... followed by a ReLU (RalmConfig.transform)
    local_wt: np.ndarray  # [h, h] W_lᵀ of the local attention: E_u W_l = u @ local_wt

    @classmethod
    def of(cls, user_tower: torch.nn.Module, lookalike: torch.nn.Module) -> NumpyTowers:
        f, merge = user_tower.fields, user_tower.merge
        attention = hasattr(merge, "w1")
        first, second = user_tower.mlp[0], user_tower.mlp[2]
        lin = lookalike.transform[0]
        return cls(
            categorical=tuple(_np(e.weight) for e in f.categorical),
            items=_zero_row(_np(f.items.weight)), genres=_np(f.genres.weight),
            cont_wt=_t(f.continuous.weight), cont_b=_np(f.continuous.bias),
            merge_w1t=_t(merge.w1.weight) if attention else None,
            merge_w2t=_t(merge.w2.weight) if attention else None,
            mlp=((_t(first.weight), _np(first.bias)), (_t(second.weight), _np(second.bias))),
            transform=(_t(lin.weight), _np(lin.bias)),
            transform_relu=len(lookalike.transform) > 1,
            local_wt=np.ascontiguousarray(_np(lookalike.local_w.weight).T),
        )

    def embed(self, batch: UserBatch) -> np.ndarray:
        """[B, h] look-alike embeddings: ``lookalike.transform(user_tower(batch))``."""
        cat = batch.categorical.numpy()
        items = batch.items.numpy()
        genres = batch.genres.numpy()
        fields = [table[cat[:, i]] for i, table in enumerate(self.categorical)]
        fields.append(self._item_mean(items))
        total = np.maximum(genres.sum(1, keepdims=True), 1.0)
        fields.append((genres / total) @ self.genres)
        fields.append(batch.continuous.numpy() @ self.cont_wt + self.cont_b)
        h = np.stack(fields, axis=1)  # [B, n, m]
        if self.merge_w1t is None:
            merged = h.reshape(len(h), -1)
        else:
            s = (np.tanh(h @ self.merge_w1t) @ self.merge_w2t)[..., 0]  # [B, n]
            w = np.exp(s - s.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            merged = (w[:, :, None] * h).sum(1)
        (w1, b1), (w2, b2) = self.mlp
        u = np.maximum(merged @ w1 + b1, 0.0) @ w2 + b2
        tw, tb = self.transform
        z = u @ tw + tb
        return (np.maximum(z, 0.0) if self.transform_relu else z).astype(np.float32, copy=False)

    def _item_mean(self, items: np.ndarray) -> np.ndarray:
        """EmbeddingBag(mode="mean", padding_idx=0): mean over non-padding ids, 0 if none."""
        n = (items != 0).sum(1, keepdims=True)
        return self.items[items].sum(1) / np.maximum(n, 1)  # row 0 is zero: padding adds 0
