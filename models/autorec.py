"""I-AutoRec: an item-based autoencoder that reconstructs each item's ratings by all users.

Why: the autoencoder baseline for explicit ratings (RMSE), the figure the paper reports;
its code for an item summarises who rated it how, which also makes a compact item
representation for the engine.

The network (Sedhain et al., section 2): item i's observed ratings r_i (U,), one entry
per training user, are encoded and decoded,

    h(r_i) = f(W g(V r_i + mu) + b),  g = sigmoid, f = identity, V (k, U), W (U, k)

and the predicted rating of user u for item i is h(r_i)_u. The objective sums, over the
items, the squared error on the *observed* ratings only, plus lambda / 2 (||W||^2 +
||V||^2); `loss` scales it per item of the batch so that an epoch sums to the paper's.
``target="binary"``: the same network on the 0/1 click matrix with every entry a target
(clicked 1, else 0), the usual implicit-feedback variant, for ranking.

The training ratings are the model's input at scoring time too, so they are kept in the
module (`ratings`, a buffer: a checkpoint scores without the data). A training user is
an output unit; anyone else is folded in as a *new output unit*: the row of W fitted by
ridge regression of their 0/1 clicks on the item codes g(V r_i + mu) (closed form), the
least-squares problem a new user poses to the decoder.

Example:
    >>> import numpy as np
    >>> model = AutoRec(hidden=8)
    >>> model.prepare(np.array([10, 20, 30]), user_ids=np.array([1, 2]))
    >>> model.score_many([np.array([0, 2])]).shape
    torch.Size([1, 3])

References:
    Suvash Sedhain, Aditya Krishna Menon, Scott Sanner and Lexing Xie. *AutoRec:
    Autoencoders Meet Collaborative Filtering*. WWW 2015 (companion).
    https://doi.org/10.1145/2740908.2742726
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from models.mult_vae import Clicks, SparseInput
from models.recommender import Recommender, register
from models.splits import EvalSet, Ragged, Split

if TYPE_CHECKING:
    from models.trainer import TrainResult


class AutoRecConfig(BaseModel):
    """Sizes, target and regularisation; optimisation lives in `TrainerConfig`."""

    hidden: int = Field(500, ge=1, description="k, the code size (the paper's 500)")
    reg: float = Field(1.0, ge=0, description="lambda of the L2 regulariser")
    target: Literal["rating", "binary"] = "rating"
    batch_size: int = Field(64, ge=1, description="items per step")
    fold_in_reg: float = Field(1.0, gt=0, description="ridge weight of a new user's row")


class AutoRecNet(nn.Module):
    """Items' sparse rating rows -> reconstructions (B, U); the training ratings kept.

    `ratings` (3, nnz) float: user, item, rating of every training rating (a buffer).
    """

    def __init__(self, n_users: int, n_items: int, hidden: int) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.encode = SparseInput(n_users, hidden)  # V^T (U, k) and mu
        self.decode = nn.Linear(hidden, n_users)  # W, b
        self.register_buffer("ratings", torch.zeros(3, 0))
        for w in (self.encode.weight, self.decode.weight):
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.encode.bias)
        nn.init.zeros_(self.decode.bias)
        self._rows: tuple[tuple[int, int], Ragged, np.ndarray] | None = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        """The ratings' size is the checkpoint's, not the fresh module's."""
        key = prefix + "ratings"
        if key in state_dict:
            self.ratings = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_ratings(self, users: np.ndarray, items: np.ndarray, values: np.ndarray) -> None:
        self.ratings = torch.from_numpy(np.stack([users, items, values]).astype(np.float32))

    def item_rows(self) -> tuple[Ragged, np.ndarray]:
        """Per item: the users who rated it (Ragged) and the ratings, same order."""
        key = (self.ratings.data_ptr(), self.ratings.shape[1])
        if self._rows is None or self._rows[0] != key:
            r = self.ratings.numpy()
            users, items = r[0].astype(np.int64), r[1].astype(np.int64)
            order = np.argsort(items, kind="stable")
            rows = Ragged.from_groups(items, users, self.n_items)
            self._rows = (key, rows, r[2][order])
        return self._rows[1], self._rows[2]

    def codes(self, items: np.ndarray) -> torch.Tensor:
        """g(V r_i + mu) for the given items, (B, k)."""
        rows, values = self.item_rows()
        clicks = Clicks.of(rows.rows(items), distinct=False)
        start = rows.offsets[items]
        weights = np.concatenate([values[s:s + n] for s, n in zip(
            start, rows.lengths[items], strict=True)]) if len(items) else np.zeros(0)
        return torch.sigmoid(self.encode(clicks, torch.from_numpy(weights.astype(np.float32))))

    def forward(self, items: np.ndarray) -> torch.Tensor:
        """h(r_i) for the given items, (B, U)."""
        return self.decode(self.codes(items))


@register
class AutoRec(Recommender):
    """I-AutoRec (Sedhain et al. 2015) behind the zoo interface; see the module docstring."""

    name = "autorec"
    Config = AutoRecConfig
    config: AutoRecConfig
    split = "random"
    user_bound = True
    trainer_defaults: ClassVar[dict[str, Any]] = {"valid_mask_history": True}

    def build(self, n_items: int) -> nn.Module:
        self._data_of: int | None = None
        return AutoRecNet(max(self.n_users, 1), n_items, self.config.hidden)

    @property
    def net(self) -> AutoRecNet:
        self._check_fitted()
        assert isinstance(self.module_, AutoRecNet)
        return self.module_

    def fit(self, split: Split, **trainer_options: Any) -> TrainResult:
        """Keeps the split's training ratings (the input); early-stops on -RMSE when
        predicting ratings, on NDCG@10 when ranking clicks (``target="binary"``)."""
        if self.config.target == "rating" and split.train_ratings is None:
            raise ValueError("autorec with target='rating' needs a split with ratings "
                             "(random_split); use target='binary' for clicks only")
        self._split_ratings = split.train_ratings
        default = "neg_rmse" if self.config.target == "rating" else "ndcg@10"
        return super().fit(split, **{"metric": default, **trainer_options})

    def batches(self, train: Ragged, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        """Shuffled items with at least one training rating."""
        net = self.net
        if self._data_of != id(train):
            users = np.repeat(np.arange(len(train)), train.lengths)
            values = (getattr(self, "_split_ratings", None) if self.config.target == "rating"
                      else None)
            net.set_ratings(users, train.values,
                            np.ones(len(users)) if values is None else values)
            self._data_of = id(train)
        rows, _ = net.item_rows()
        items = rng.permutation(np.flatnonzero(rows.lengths > 0))
        for start in range(0, len(items), self.config.batch_size):
            yield {"items": items[start:start + self.config.batch_size]}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        net = self.net
        items = batch["items"]
        out = net(items)
        rows, values = net.item_rows()
        r = torch.from_numpy(np.repeat(np.arange(len(items)), rows.lengths[items]))
        users = torch.from_numpy(np.concatenate(rows.rows(items)))
        given = torch.from_numpy(np.concatenate(
            [values[rows.offsets[i]:rows.offsets[i + 1]] for i in items]).astype(np.float32))
        if self.config.target == "rating":
            err = (out[r, users] - given).pow(2).sum()
        else:
            target = torch.zeros_like(out)
            target[r, users] = 1.0
            err = (out - target).pow(2).sum()
        l2 = net.encode.weight.pow(2).sum() + net.decode.weight.pow(2).sum()
        share = len(items) / max(int(np.sum(rows.lengths > 0)), 1)
        return (err + self.config.reg / 2 * l2 * share) / len(items)

    # ------------------------------------------------------------------ predictions
    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Predicted ratings h(r_i)_u of (user, item) pairs of training users."""
        net = self.net
        with torch.no_grad():
            out = []
            for start in range(0, len(users), 4096):
                u, i = users[start:start + 4096], items[start:start + 4096]
                uniq, inv = np.unique(i, return_inverse=True)
                codes = net.codes(uniq)[torch.from_numpy(inv)]
                w = net.decode.weight[torch.from_numpy(u)]
                out.append((codes * w).sum(1) + net.decode.bias[torch.from_numpy(u)])
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def rmse(self, data: EvalSet) -> float:
        """RMSE of `data`'s held-out (target) ratings, predictions clipped to the scale
        of the training ratings (1-5 on MovieLens)."""
        if data.target_ratings is None:
            raise ValueError("this EvalSet carries no ratings")
        users = np.repeat(data.users, data.targets.lengths)
        r = self.net.ratings[2]
        low, high = (float(r.min()), float(r.max())) if len(r) else (-np.inf, np.inf)
        pred = np.clip(self.predict(users, data.targets.values), low, high)
        return float(np.sqrt(np.mean((pred - data.target_ratings) ** 2)))

    def extra_metrics(self, data: EvalSet) -> dict[str, float]:
        if self.config.target != "rating" or data.target_ratings is None:
            return {}
        return {"neg_rmse": -self.rmse(data)}

    def score_index(self, histories: Sequence[np.ndarray],
                    users: np.ndarray | None = None) -> torch.Tensor:
        """h(r_i)_u for every item; a user outside the table gets a ridge-fitted row."""
        net = self.net
        codes = net.codes(np.arange(self.n_items))  # (I, k)
        users = np.full(len(histories), -1) if users is None else np.asarray(users)
        known = (users >= 0) & (users < net.n_users)
        rows = torch.from_numpy(np.where(known, users, 0))
        weight, bias = net.decode.weight[rows], net.decode.bias[rows]
        unknown = np.flatnonzero(~known)
        if len(unknown):
            w, b = self.fold_in(codes, [histories[r] for r in unknown])
            weight[torch.from_numpy(unknown)] = w
            bias[torch.from_numpy(unknown)] = b
        return weight @ codes.T + bias.unsqueeze(1)

    def fold_in(self, codes: torch.Tensor, histories: Sequence[np.ndarray]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder rows (B, k) and biases (B,) for new users: ridge regression of their 0/1
        clicks over all items on the item codes (with an intercept)."""
        y = torch.zeros(self.n_items, len(histories))
        for b, h in enumerate(histories):
            y[torch.from_numpy(np.asarray(h, dtype=np.int64)), b] = 1.0
        z = torch.cat([codes, torch.ones(len(codes), 1)], dim=1).double()
        gram = z.T @ z + self.config.fold_in_reg * torch.eye(z.shape[1], dtype=torch.float64)
        sol = torch.linalg.solve(gram, z.T @ y.double()).float()  # (k + 1, B)
        return sol[:-1].T, sol[-1]

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"config": {"hidden": 16, "batch_size": 8, "target": "binary", "reg": 0.01},
                "trainer": {"epochs": 10, "lr": 1e-2}}
