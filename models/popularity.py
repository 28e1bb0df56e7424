"""Popularity as a scorer: the floor every full-ranking table is read against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.splits import Ragged


class PopularityScores:
    """Training click counts as every user's scores: the floor of docs/youtube_dnn.md
    (duck-types `Recommender.score_many` for models/evaluator.py)."""

    def __init__(self, train: Ragged, n_items: int) -> None:
        self.counts = torch.from_numpy(
            np.bincount(train.values, minlength=n_items).astype(np.float32))

    def score_many(self, histories: Sequence[np.ndarray], **_: Any) -> torch.Tensor:
        return self.counts.expand(len(histories), -1)
