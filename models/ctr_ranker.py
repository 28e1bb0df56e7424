"""A CTR checkpoint (DLRM, FM, logistic regression) as a ranker of serving pipelines.

Why: the scoring worker's pipelines propose candidates from RALM, SASRec or
popularity; a point-wise CTR model then orders them by P(click | user, item,
context), the way DLRM is used in production. The checkpoint carries its
`FeatureTable`, so the worker builds each candidate's feature row from the user
id, the profile the stream carries and the item id alone, with no training data
at hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.checkpoint import CheckpointError
from models.ctr_data import FeatureTable
from models.ctr_train import load_ctr


class CTRRanker:
    """Scores (user, candidate items) with a CTR model; logits, higher is likelier."""

    def __init__(self, path: Path) -> None:
        name, model, payload = load_ctr(Path(path).expanduser())
        if "features" not in payload:
            raise CheckpointError(
                f"{path}: this {name} checkpoint has no feature table (written before "
                "checkpoints carried one); retrain it with `lookalike train " + name + "`")
        self.name, self.model, self.version = name, model, payload["version"]
        self.features = FeatureTable.from_payload(payload["features"])

    @torch.no_grad()
    def score(self, user_id: int, profile: dict[str, object] | None,
              item_ids: list[int] | np.ndarray) -> np.ndarray:
        """(n,) logits of the user clicking each item."""
        if not len(item_ids):
            return np.zeros(0, np.float32)
        sparse, genres, dense = self.features.rows(user_id, profile, np.asarray(item_ids))
        out = self.model(torch.from_numpy(sparse), torch.from_numpy(genres),
                         torch.from_numpy(dense))
        return out.numpy().astype(np.float32)
