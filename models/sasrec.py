"""SASRec: self-attentive sequential recommendation, trained on every position at once.

Why: a user's next click depends on their recent clicks; causal self-attention over
the last `max_len` clicks predicts it, and in the engine the same network encodes a
user from their clicks alone (a new user needs no retraining).

The network (Kang & McAuley, section III), one small module per idea:
`SASRecNet` embeds items (scaled by sqrt(d)) plus a learnable position, then
`SelfAttentionBlock` x `blocks` (layer norm, causal multi-head attention with a
residual, layer norm, `PointWiseFeedForward` with a residual, dropout, padding kept at
zero), and a last layer norm. The score of item i after position t is the dot product of
the position's output F_t (B, L, D) and the item's embedding (shared with the input).

Training, as in the paper: each training sequence is cut into windows of `max_len`
inputs; the output at every position t is trained to predict the click at t + 1, all
positions of a window in one causal pass. ``loss="bce"``: one negative per position,
drawn uniformly from the items the user never clicked (the paper). ``loss="ce"``: a
softmax over every item (RecBole's ``CE``). With ``windows="all"`` (default) a long
history is cut into consecutive windows, so every training click is a target once per
epoch; ``"last"`` keeps only each user's last window, as the paper's code does.
RecBole instead feeds every prefix of every history as its own sequence (~97k sequences
per epoch on ml-100k, against ~2.4k windows here): the same targets, ~40x the work.

Example:
    >>> import numpy as np
    >>> from models.splits import Ragged
    >>> model = SASRec(hidden=8, max_len=4)
    >>> model.prepare(np.array([10, 20, 30]))
    >>> model.score_many([np.array([0, 2])]).shape
    torch.Size([1, 3])

References:
    Wang-Cheng Kang and Julian McAuley. *Self-Attentive Sequential Recommendation*.
    ICDM 2018. https://arxiv.org/abs/1808.09781
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from models.recommender import Recommender, register
from models.splits import Ragged

PAD = 0  # item index 0 is padding; dense item i is token i + 1


class SASRecConfig(BaseModel):
    """Architecture and loss; optimisation settings live in `TrainerConfig`."""

    max_len: int = Field(50, ge=1, description="clicks the model attends to")
    hidden: int = Field(64, ge=1)
    blocks: int = Field(2, ge=1)
    heads: int = Field(1, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    loss: Literal["bce", "ce"] = "bce"
    batch_size: int = Field(128, ge=1)
    windows: Literal["all", "last"] = "all"


class CausalSelfAttention(nn.Module):
    """Multi-head attention, queries from the normalised input, keys/values from the raw one.

    x, q: (B, L, D); allowed: (B, 1, L, L) bool, True where a query may see a key.
    """

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, q: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        query = self.query(q).view(b, n, h, d // h).transpose(1, 2)
        key, value = self.key_value(x).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class PointWiseFeedForward(nn.Module):
    """The same two-layer ReLU network at every position, with dropout and a residual."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class SelfAttentionBlock(nn.Module):
    """Layer norm, causal attention + residual, layer norm, feed-forward + residual."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = PointWiseFeedForward(hidden, dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        x = q + self.attn(q, x, allowed)
        return self.ffn(self.ffn_norm(x)) * keep


class SASRecNet(nn.Module):
    """Item sequence (B, L) of tokens (0 = padding, left) -> position outputs (B, L, D)."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SelfAttentionBlock(cfg.hidden, cfg.heads, cfg.dropout)
                                    for _ in range(cfg.blocks))
        self.last_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-normal matrices, as the authors' PyTorch code; padding row zero."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        n = seq.shape[1]
        keep = (seq != PAD).unsqueeze(-1).to(self.item_emb.weight.dtype)
        x = self.item_emb(seq) * self.item_emb.embedding_dim ** 0.5
        x = self.emb_dropout(x + self.pos_emb.weight[-n:]) * keep
        causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
        itself = torch.eye(n, dtype=torch.bool, device=seq.device)
        # a query sees earlier real clicks, and always itself (no all-masked row, no NaN)
        allowed = ((causal & (seq != PAD).unsqueeze(1)) | itself).unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed, keep)
        return self.last_norm(x)

    def item_weights(self) -> torch.Tensor:
        """(n_items, D) embeddings of the real items (the prediction layer)."""
        return self.item_emb.weight[1:]


@register
class SASRec(Recommender):
    """SASRec (Kang & McAuley 2018) behind the zoo interface; see the module docstring."""

    name = "sasrec"
    Config = SASRecConfig
    split = "loo"
    # chosen on ml-100k's validation users among 1e-3, 2e-3, 5e-3 (docs/models.md)
    trainer_defaults = {"lr": 2e-3}
    config: SASRecConfig

    def build(self, n_items: int) -> nn.Module:
        self._windows: tuple[int, np.ndarray, np.ndarray] | None = None
        return SASRecNet(n_items, self.config)

    @property
    def net(self) -> SASRecNet:
        self._check_fitted()
        assert isinstance(self.module_, SASRecNet)
        return self.module_

    # ------------------------------------------------------------------ training data
    def batches(self, train: Ragged, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        """Shuffled windows: inputs (B, L), next clicks (B, L), negatives (B, L), users (B,)."""
        windows, users = self._training_windows(train)
        order = rng.permutation(len(windows))
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start:start + self.config.batch_size]
            w = windows[rows]
            batch = {"input": torch.from_numpy(w[:, :-1]), "target": torch.from_numpy(w[:, 1:])}
            if self.config.loss == "bce":
                batch["negative"] = torch.from_numpy(
                    self._negatives(train, users[rows], w.shape[1] - 1, rng))
            yield batch

    def _training_windows(self, train: Ragged) -> tuple[np.ndarray, np.ndarray]:
        """(W, L + 1) left-padded token windows and the user of each (cached per `train`)."""
        if self._windows is None or self._windows[0] != id(train):
            self._windows = (id(train), *training_windows(train, self.config.max_len,
                                                          self.config.windows == "all"))
        return self._windows[1], self._windows[2]

    def _negatives(self, train: Ragged, users: np.ndarray, n: int,
                   rng: np.random.Generator) -> np.ndarray:
        """(B, n) tokens drawn uniformly among the items each user never clicked in training."""
        n_items = self.n_items
        clicked = np.zeros((len(users), n_items + 1), dtype=bool)
        rows = train.rows(users)
        clicked[np.repeat(np.arange(len(users)), [len(r) for r in rows]),
                np.concatenate(rows) + 1] = True
        clicked[:, PAD] = True
        if clicked.all(axis=1).any():  # a user clicked everything: any item will do
            clicked[clicked.all(axis=1), 1:] = False
        draws = rng.integers(1, n_items + 1, (len(users), n))
        bad = np.take_along_axis(clicked, draws, axis=1)
        while bad.any():
            draws[bad] = rng.integers(1, n_items + 1, int(bad.sum()))
            bad = np.take_along_axis(clicked, draws, axis=1)
        return draws

    # ------------------------------------------------------------------ loss and scores
    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        out = self.net(batch["input"])
        target = batch["target"]
        real = (target != PAD) & (batch["input"] != PAD)  # a target needs a click before it
        if self.config.loss == "ce":
            logits = out[real] @ self.net.item_weights().T
            return F.cross_entropy(logits, target[real] - 1)
        emb = self.net.item_emb
        pos = (out * emb(target)).sum(-1)[real]
        neg = (out * emb(batch["negative"])).sum(-1)[real]
        return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))

    def score_index(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """Every item's score after each history's last click (from its last `max_len`)."""
        seq = torch.from_numpy(left_pad(histories, self.config.max_len))
        return self.net(seq)[:, -1] @ self.net.item_weights().T

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"config": {"hidden": 16, "blocks": 1, "max_len": 8, "batch_size": 16,
                           "dropout": 0.1},
                "trainer": {"epochs": 6, "lr": 5e-3}}


def left_pad(histories: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """(B, max_len) tokens: the last `max_len` dense items + 1 of each history, zeros first."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for i, h in enumerate(histories):
        tail = np.asarray(h, dtype=np.int64)[-max_len:]
        if len(tail):
            out[i, max_len - len(tail):] = tail + 1
    return out


def training_windows(train: Ragged, max_len: int, every: bool) -> tuple[np.ndarray, np.ndarray]:
    """(W, max_len + 1) token windows ending at each user's last click and, if `every`,
    every `max_len` clicks before it, so that each click after a user's first is a target
    of exactly one window; and the user of each window."""
    n = train.lengths
    users, ends = [], []
    for u in np.flatnonzero(n >= 2):
        e = np.arange(n[u], 1, -max_len) if every else np.array([n[u]])
        users.append(np.full(len(e), u))
        ends.append(e)
    if not users:
        return np.zeros((0, max_len + 1), np.int64), np.zeros(0, np.int64)
    user = np.concatenate(users)
    end = np.concatenate(ends)
    pos = end[:, None] - (max_len + 1) + np.arange(max_len + 1)  # position within the user
    valid = pos >= 0
    flat = train.offsets[user][:, None] + np.where(valid, pos, 0)
    return np.where(valid, train.values[flat] + 1, PAD), user
