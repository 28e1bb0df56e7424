"""The one model interface of the zoo, and the registry the CLI and the tests read.

Why: every model is trained by the same trainer (models/trainer.py), evaluated by the
same evaluator (models/evaluator.py) and checked by the same conformance suite
(tests/test_model_conformance.py). A model therefore says only what is its own:

- `build(n_items)`: its network (a ``torch.nn.Module``);
- `batches(train, rng)`: one epoch of training batches from per-user sequences;
- `loss(batch)`: the training loss of a batch;
- `score_index(histories)`: scores of every item for a batch of users, each given by
  the items they clicked (dense indices, time order).

A user *is* their clicks: scoring takes a history, not a user id, so a user the model
never saw is scored like any other (inductive, unlike RecBole's id-bound models).
The public API speaks external ids, as River's ``rank(user, items)`` does; tensors
stay inside. Fitted state ends in ``_`` (scikit-learn's habit).

Example:
    >>> from models.recommender import get_model
    >>> model = get_model("sasrec")(hidden=16)  # doctest: +SKIP
    >>> model.fit(split, max_seconds=60)  # doctest: +SKIP
    >>> model.recommend([50, 172, 181], k=5)  # doctest: +SKIP
    [174, 210, 1, 98, 7]
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from pydantic import BaseModel

from models.checkpoint import load_checkpoint, make_version, save_checkpoint
from models.splits import EvalSet, Ragged, Split

if TYPE_CHECKING:
    from models.trainer import TrainResult

# Modules that register a model; `get_model` imports them on first use.
MODEL_MODULES = ("models.sasrec", "models.mult_vae", "models.ncf", "models.cdae", "models.autorec",
                 "models.ngcf", "models.lfm", "models.youtube_dnn")
REGISTRY: dict[str, type[Recommender]] = {}
SCORE_BATCH = 512

R = TypeVar("R", bound="type[Recommender]")


class NotFittedError(RuntimeError):
    """The model was asked to score before `fit` or `load`."""


class Recommender(ABC):
    """Base of every model: IDs in, IDs out; a fitted torch module inside."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    split: ClassVar[str] = "loo"  # the protocol its family is evaluated on (models/splits.py)
    trainer_defaults: ClassVar[dict[str, Any]] = {}  # e.g. its own learning rate
    # True for models with a table of training users (NCF, CDAE, NGCF): `score_index` then
    # also takes `users`, the dense user index of each row (-1: not a training user, whom
    # the model folds in from their clicks). Others never see a user id.
    user_bound: ClassVar[bool] = False

    def __init__(self, config: BaseModel | None = None, **overrides: Any) -> None:
        base = config.model_dump() if config is not None else {}
        self.config = self.Config(**{**base, **overrides})  # validated in one place
        self.item_ids_: np.ndarray | None = None
        self.user_ids_: np.ndarray | None = None  # user-bound models: dense user -> id
        self.module_: torch.nn.Module | None = None
        self.version_: str | None = None

    # ------------------------------------------------------------------ model-specific
    @abstractmethod
    def build(self, n_items: int) -> torch.nn.Module:
        """A fresh network for `n_items` items (weights drawn from torch's global RNG)."""

    @abstractmethod
    def batches(self, train: Ragged, rng: np.random.Generator) -> Iterator[Any]:
        """One epoch of training batches; `train` has one row of dense items per user."""

    @abstractmethod
    def loss(self, batch: Any) -> torch.Tensor:
        """The scalar training loss of one batch (module in train mode)."""

    @abstractmethod
    def score_index(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, n_items) scores for B users given their dense-index histories (no grad)."""

    def extra_metrics(self, data: EvalSet) -> dict[str, float]:
        """Figures of the model's own task on `data` (AutoRec: -RMSE of the held-out
        ratings); the trainer adds them to each epoch's validation metrics."""
        return {}

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        """Small settings for the conformance suite: ``{"config": {...}, "trainer": {...}}``."""
        return {"config": {}, "trainer": {"epochs": 5}}

    # ------------------------------------------------------------------ fitting
    def prepare(self, item_ids: np.ndarray, user_ids: np.ndarray | None = None) -> None:
        """Set the item (and, if user-bound, user) vocabulary; build a fresh network for it."""
        self.item_ids_ = np.asarray(item_ids, dtype=np.int64)
        self.user_ids_ = (np.asarray(user_ids, dtype=np.int64)
                          if self.user_bound and user_ids is not None else None)
        self._item_index = {int(i): k for k, i in enumerate(self.item_ids_.tolist())}
        self.module_ = self.build(len(self.item_ids_))

    def fit(self, split: Split, **trainer_options: Any) -> TrainResult:
        """Train on `split.train`, early-stopping on `split.valid` (options: `TrainerConfig`)."""
        from models.trainer import Trainer, TrainerConfig

        options = {**self.trainer_defaults, **trainer_options}
        return Trainer(TrainerConfig(**options)).fit(self, split)

    @property
    def fitted(self) -> bool:
        return self.module_ is not None and self.item_ids_ is not None

    @property
    def n_items(self) -> int:
        self._check_fitted()
        assert self.item_ids_ is not None
        return len(self.item_ids_)

    @property
    def n_users(self) -> int:
        """Rows of a user-bound model's user table (0 otherwise)."""
        return 0 if self.user_ids_ is None else len(self.user_ids_)

    # ------------------------------------------------------------------ public API (ids)
    def to_index(self, items: Iterable[int]) -> np.ndarray:
        """Dense indices of known external item ids, in order; unknown ids are dropped."""
        self._check_fitted()
        lookup = self._item_index
        return np.array([lookup[i] for i in map(int, items) if i in lookup], dtype=np.int64)

    def score(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, n_items) scores, columns in `item_ids_` order, for users given by their clicks."""
        return self.score_many([self.to_index(h) for h in histories]).numpy()

    def rank(self, history: Sequence[int], items: Sequence[int] | None = None,
             ) -> list[tuple[int, float]]:
        """`items` (default: every item) as (item id, score), best first."""
        scores = self.score([history])[0]
        index = np.arange(self.n_items) if items is None else self.to_index(items)
        order = index[np.argsort(-scores[index], kind="stable")]
        assert self.item_ids_ is not None
        return [(int(self.item_ids_[k]), float(scores[k])) for k in order]

    def recommend(self, history: Sequence[int], k: int = 10, exclude_seen: bool = True,
                  ) -> list[int]:
        """The top-`k` item ids for a user given by their clicks; clicked items left out."""
        seen = self.to_index(history)
        scores = torch.from_numpy(self.score([history])[0])
        if exclude_seen and len(seen):
            scores[torch.from_numpy(seen)] = -torch.inf
        top = torch.topk(scores, min(k, self.n_items)).indices.numpy()
        assert self.item_ids_ is not None
        return [int(self.item_ids_[i]) for i in top if torch.isfinite(scores[i])]

    def score_many(self, histories: Sequence[np.ndarray], batch_size: int = SCORE_BATCH,
                   users: np.ndarray | None = None) -> torch.Tensor:
        """`score_index` in eval mode, without grad, in batches.

        `users`: the dense user index of each row (`EvalSet.users`), passed on to user-bound
        models only; without it every row is a new user, known only by their clicks.
        """
        self._check_fitted()
        assert self.module_ is not None
        was_training = self.module_.training
        self.module_.eval()
        try:
            with torch.no_grad():
                if self.user_bound:
                    u = (np.full(len(histories), -1, dtype=np.int64) if users is None
                         else np.asarray(users, dtype=np.int64))
                    parts = [self.score_index(histories[i:i + batch_size],  # type: ignore[call-arg]
                                              users=u[i:i + batch_size])
                             for i in range(0, len(histories), batch_size)]
                else:
                    parts = [self.score_index(histories[i:i + batch_size])
                             for i in range(0, len(histories), batch_size)]
        finally:
            self.module_.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0, self.n_items)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """A versioned checkpoint (models/checkpoint.py: atomic write, weights-only load)."""
        self._check_fitted()
        assert self.module_ is not None and self.item_ids_ is not None
        state = {k: v.detach().clone() for k, v in self.module_.state_dict().items()}
        self.version_ = make_version(self.name, state)
        return save_checkpoint(path, {
            "format": 1, "kind": self.name, "version": self.version_,
            "config": self.config.model_dump(), "item_ids": torch.from_numpy(self.item_ids_),
            **({} if self.user_ids_ is None else {"user_ids": torch.from_numpy(self.user_ids_)}),
            "state": state, "metrics": metrics or {}, "created_at": time.time(),
        })

    @classmethod
    def load(cls, path: str | Path) -> Recommender:
        """The model a checkpoint holds (of this class, or any registered one from the base)."""
        kind = None if cls is Recommender else cls.name
        payload = load_checkpoint(path, kind=kind, required=("config", "item_ids", "state"))
        model = get_model(payload["kind"])(**payload["config"])
        users = payload.get("user_ids")
        model.prepare(payload["item_ids"].numpy(), None if users is None else users.numpy())
        assert model.module_ is not None
        model.module_.load_state_dict(payload["state"])
        model.version_ = payload["version"]
        return model

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise NotFittedError(f"{self.name}: call fit() or load() first")


def register(cls: R) -> R:
    """Class decorator: make a model available by its `name` (CLI, conformance suite)."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"model name {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls
    return cls


def _import_models() -> None:
    for module in MODEL_MODULES:
        importlib.import_module(module)


def model_names() -> list[str]:
    """Every registered model name, sorted."""
    _import_models()
    return sorted(REGISTRY)


def get_model(name: str) -> type[Recommender]:
    """The model class registered under `name`."""
    _import_models()
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(REGISTRY))}"
                       ) from None

