"""NGCF and LightGCN: embedding propagation over the user-item graph, trained with BPR.

Why: collaborative signal travels along paths of the click graph (user - item - user -
item); propagating embeddings over it for a few layers puts it into the embeddings
themselves, the strongest general-CF baseline of the peers' table.

Both models share the graph: A = [[0, R], [R^T, 0]] over users then items (R the 0/1
training clicks) and its Laplacian-normalised form L = D^-1/2 A D^-1/2, entries
1 / sqrt(|N_u| |N_i|), a sparse torch tensor (`normalized_adjacency`).

- NGCF (Wang et al., eq. 7): E^(l) = LeakyReLU((L + I) E^(l-1) W1 + b1
  + (L E^(l-1)) * E^(l-1) W2 + b2), i.e. each node receives W1 e_i + W2 (e_i * e_u) from
  each neighbour (weighted by 1 / sqrt(|N_u| |N_i|)) and W1 e_u from itself; message
  dropout on each layer's output, node dropout (a dropped node sends no message in that
  step, `node_dropout_mask`) during training; the
  layers' outputs are L2-normalised (the authors' code) and concatenated:
  e* = [e^(0); ...; e^(L)]. `form="code"`: the authors' TensorFlow code instead of eq. 7
  (their default `adj_type="norm"`): side = D~^-1 (A + I) E^(l-1) (row-normalised, a
  self-loop on every node, D~ = degrees + 1), E^(l) = LeakyReLU(side W1 + b1)
  + LeakyReLU((side * E^(l-1)) W2 + b2), biases Xavier-initialised as the weights.
- LightGCN (He et al. 2020): no transforms, no non-linearity: E^(l) = L E^(l-1), and
  e* = the mean of E^(0..K).

Score y_ui = e*_u . e*_i; loss: BPR, -log sigmoid(y_ui - y_uj) with one item j per click
drawn among the user's unclicked items, plus `reg` / 2 times the squared norms of the
batch's layer-0 embeddings, per triple.

User-bound: training users have a layer-0 row and are propagated with the graph. Anyone
else is folded in: layer 0 = the mean layer-0 embedding of the items they clicked, and
each layer applies the same rule to them, from their clicked items' layer outputs
(items' degrees as in training), so a new user's clicks are their graph neighbourhood.

Example:
    >>> import numpy as np
    >>> model = LightGCN(embedding=8, layers=2)
    >>> model.prepare(np.array([10, 20, 30]), user_ids=np.array([1, 2]))
    >>> model.score_many([np.array([0, 2])]).shape
    torch.Size([1, 3])

References:
    Xiang Wang, Xiangnan He, Meng Wang, Fuli Feng and Tat-Seng Chua. *Neural Graph
    Collaborative Filtering*. SIGIR 2019. https://arxiv.org/abs/1905.08108
    Xiangnan He, Kuan Deng, Xiang Wang, Yan Li, Yongdong Zhang and Meng Wang.
    *LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation*.
    SIGIR 2020. https://arxiv.org/abs/2002.02126
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from models.ncf import sample_unclicked
from models.recommender import Recommender, register
from models.splits import Ragged


class NGCFConfig(BaseModel):
    """Sizes, dropouts and regularisation; optimisation lives in `TrainerConfig`."""

    embedding: int = Field(64, ge=1)
    layers: int = Field(3, ge=0, description="propagation layers (each of width `embedding`)")
    node_dropout: float = Field(0.1, ge=0, lt=1, description="edges dropped per step")
    message_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on layer outputs")
    leaky_slope: float = Field(0.2, ge=0)
    reg: float = Field(1e-5, ge=0, description="L2 weight of the batch's layer-0 embeddings")
    batch_size: int = Field(1024, ge=1, description="BPR triples per step")
    normalised_messages: bool = Field(
        False, description="feed each layer the L2-normalised output of the one before "
        "(RecBole's NGCF) instead of the raw output (the authors' code)")
    form: Literal["paper", "code"] = Field(
        "paper", description="paper: eq. 7, LeakyReLU((L + I) E W1 + (L E) * E W2), L "
        "symmetric; code: the authors' TensorFlow code, side = D~^-1 (A + I) E (row-"
        "normalised, self-loops), LeakyReLU(side W1) + LeakyReLU((side * E) W2), "
        "Xavier-initialised biases")


class LightGCNConfig(BaseModel):
    """LightGCN: only the embeddings are learned."""

    embedding: int = Field(64, ge=1)
    layers: int = Field(3, ge=0)
    reg: float = Field(1e-4, ge=0, description="L2 weight of the batch's layer-0 embeddings")
    batch_size: int = Field(2048, ge=1, description="BPR triples per step")


def row_normalized_adjacency(users: np.ndarray, items: np.ndarray, n_users: int,
                             n_items: int) -> torch.Tensor:
    """D~^-1 (A + I) of the bipartite graph (users first), sparse COO (N, N): the authors'
    code's `norm_adj` (`adj_type="norm"`, their default).

    Row n: 1 / (|N_n| + 1) at n itself and at each neighbour; repeated clicks count once.
    Not symmetric (row u, column i is 1 / (|N_u| + 1); row i, column u 1 / (|N_i| + 1)).
    """
    keys = np.unique(np.asarray(users, np.int64) * n_items + np.asarray(items, np.int64))
    u, i = keys // n_items, keys % n_items
    n = n_users + n_items
    deg = np.concatenate([np.bincount(u, minlength=n_users),
                          np.bincount(i, minlength=n_items)]).astype(np.float64) + 1
    nodes = np.arange(n)
    rows = np.concatenate([u, n_users + i, nodes])
    cols = np.concatenate([n_users + i, u, nodes])
    return torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])),
                                   torch.from_numpy(1.0 / deg[rows]).float(),
                                   (n, n), check_invariants=True).coalesce()


def normalized_adjacency(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
                         ) -> torch.Tensor:
    """L = D^-1/2 A D^-1/2 of the bipartite graph (users first), sparse COO (N, N).

    Entry (u, n_users + i) = (n_users + i, u) = 1 / sqrt(|N_u| |N_i|) for each click;
    repeated clicks count once.
    """
    keys = np.unique(np.asarray(users, np.int64) * n_items + np.asarray(items, np.int64))
    u, i = keys // n_items, keys % n_items
    du = np.bincount(u, minlength=n_users).astype(np.float64)
    di = np.bincount(i, minlength=n_items).astype(np.float64)
    w = 1.0 / np.sqrt(du[u] * di[i]) if len(keys) else np.zeros(0)
    rows = np.concatenate([u, n_users + i])
    cols = np.concatenate([n_users + i, u])
    n = n_users + n_items
    return torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])),
                                   torch.from_numpy(np.concatenate([w, w])).float(),
                                   (n, n), check_invariants=True).coalesce()


class SymmetricSpMM(torch.autograd.Function):
    """L x for a symmetric sparse L (CSR): the gradient is L g, no transpose needed.

    Why: torch's sparse backward transposes and coalesces L at every step; L is
    symmetric, so its backward is one more product (about 5x faster on ml-100k).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.sparse.mm(ctx.adj, grad), None


class SpMM(torch.autograd.Function):
    """M x for a sparse M (CSR) whose transpose is given (CSR): the gradient is M^T g."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, adj: torch.Tensor, adj_t: torch.Tensor
                ) -> torch.Tensor:
        ctx.adj_t = adj_t
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return torch.sparse.mm(ctx.adj_t, grad), None, None


def node_dropout_mask(n: int, p: float) -> torch.Tensor:
    """(n, 1) node dropout (the paper's): a dropped node sends no message in this step;
    kept ones are scaled by 1 / (1 - p). L diag(mask) E = L (mask * E)."""
    return ((torch.rand(n) >= p).float() / (1 - p)).unsqueeze(1)


class GraphNet(nn.Module):
    """Layer-0 embeddings of users and items, the training graph, and propagation.

    The graph is kept as the training clicks (`edges`, (2, nnz) user, item), a buffer, so
    that a checkpoint holds what scoring needs; L is rebuilt from it when it changes.
    """

    # True: propagate with D~^-1 (A + I) (the NGCF authors' code) instead of L
    self_loops: bool = False

    def __init__(self, n_users: int, n_items: int, embedding: int) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.user = nn.Embedding(n_users, embedding)
        self.item = nn.Embedding(n_items, embedding)
        self.register_buffer("edges", torch.zeros(2, 0, dtype=torch.int64))
        self._adj: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None

    def set_graph(self, users: np.ndarray, items: np.ndarray) -> None:
        self.edges = torch.from_numpy(np.stack([users, items]).astype(np.int64))
        self._adj = None

    def adjacency(self) -> torch.Tensor:
        """The propagation matrix of the training graph, CSR (cached until the graph
        changes): L, or D~^-1 (A + I) when `self_loops`."""
        return self._matrices()[0]

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, M^T), CSR; the same tensor twice when M is symmetric (L)."""
        key = (self.edges.data_ptr(), self.edges.shape[1])
        if self._adj is None or self._adj[0] != key:
            e = self.edges.numpy()
            with warnings.catch_warnings():  # "CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                if self.self_loops:
                    adj = row_normalized_adjacency(e[0], e[1], self.n_users, self.n_items)
                    self._adj = (key, adj.to_sparse_csr(),
                                 adj.t().coalesce().to_sparse_csr())
                else:
                    adj = normalized_adjacency(e[0], e[1], self.n_users, self.n_items)
                    csr = adj.to_sparse_csr()
                    self._adj = (key, csr, csr)
        return self._adj[1], self._adj[2]

    def item_degrees(self) -> torch.Tensor:
        e = self.edges.numpy()
        keys = np.unique(e[0] * self.n_items + e[1])
        return torch.from_numpy(np.bincount(keys % self.n_items, minlength=self.n_items)
                                ).float()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        """The graph's size is the checkpoint's, not the fresh module's."""
        key = prefix + "edges"
        if key in state_dict:
            self.edges = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def ego(self) -> torch.Tensor:
        return torch.cat([self.user.weight, self.item.weight])

    def layer(self, k: int, e: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """E^(k+1) from E^(k) = e and its neighbourhood sum side = M E^(k) (M = L, or
        D~^-1 (A + I) when `self_loops`)."""
        raise NotImplementedError

    def combine(self, layers: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def layers(self, node_dropout: float = 0.0) -> list[torch.Tensor]:
        """[E^(0), ..., E^(L)], each (N, D), users then items."""
        adj, adj_t = self._matrices()
        out = [self.ego()]
        for k in range(self.n_layers):
            e = out[-1]
            if self.training and node_dropout > 0:
                e = e * node_dropout_mask(len(e), node_dropout)
            side = (SpMM.apply(e, adj, adj_t) if self.self_loops
                    else SymmetricSpMM.apply(e, adj))
            out.append(self.layer(k, out[-1], side))
        return out

    def propagate(self, node_dropout: float = 0.0) -> torch.Tensor:
        """(N, D*) final embeddings of every user then item."""
        return self.combine(self.layers(node_dropout))

    def fold_in(self, clicks: Sequence[np.ndarray], layers: list[torch.Tensor]
                ) -> torch.Tensor:
        """(B, D*) final embeddings of users outside the graph, from their clicks.

        `layers`: the graph's `layers()`; the new users' neighbours are their clicked
        items, weighted 1 / sqrt(|N_u| |N_i|) with the items' training degrees (with
        `self_loops`: their items and themselves, each weighted 1 / (|N_u| + 1)).
        """
        rows = [np.unique(np.asarray(h, np.int64)) for h in clicks]
        lengths = torch.tensor([len(x) for x in rows])
        r = torch.from_numpy(np.repeat(np.arange(len(rows)), lengths.numpy()))
        items = torch.from_numpy(np.concatenate(rows) if rows else np.zeros(0, np.int64))
        deg = self.item_degrees()[items].clamp(min=1)
        norm = (lengths.clamp(min=1).float()[r] * deg).rsqrt()  # 1 / sqrt(|N_u| |N_i|)
        mean = 1.0 / lengths.clamp(min=1).float()[r]
        if self.self_loops:
            norm = 1.0 / (lengths.float()[r] + 1)
        own = 1.0 / (lengths.float() + 1) if self.self_loops else torch.zeros(len(rows))

        def gather(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(rows), values.shape[1])
            return out.index_add_(0, r, values[items] * w.unsqueeze(1))

        u = [gather(layers[0][self.n_users:], mean)]  # layer 0: their items' mean
        for k in range(self.n_layers):
            side = gather(layers[k][self.n_users:], norm) + own.unsqueeze(1) * u[-1]
            u.append(self.layer(k, u[-1], side))
        return self.combine(u)


class NGCFNet(GraphNet):
    """NGCF's propagation: W1, W2 (and biases) per layer, LeakyReLU, concatenated layers."""

    def __init__(self, n_users: int, n_items: int, cfg: NGCFConfig) -> None:
        super().__init__(n_users, n_items, cfg.embedding)
        d = cfg.embedding
        self.n_layers = cfg.layers
        self.w1 = nn.ModuleList(nn.Linear(d, d) for _ in range(cfg.layers))
        self.w2 = nn.ModuleList(nn.Linear(d, d) for _ in range(cfg.layers))
        self.drop = nn.Dropout(cfg.message_dropout)
        self.slope = cfg.leaky_slope
        self.normalised = cfg.normalised_messages
        self.self_loops = cfg.form == "code"
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif self.self_loops:  # the authors' code: biases (1, d), Xavier too
                nn.init.xavier_uniform_(p.data.view(1, -1))
            else:
                nn.init.zeros_(p)

    def layer(self, k: int, e: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        if self.self_loops:  # side = D~^-1 (A + I) E; one LeakyReLU per term
            out = (F.leaky_relu(self.w1[k](side), self.slope)
                   + F.leaky_relu(self.w2[k](side * e), self.slope))
        else:  # side = L E
            out = F.leaky_relu(self.w1[k](e + side) + self.w2[k](side * e), self.slope)
        out = self.drop(out)
        return F.normalize(out, dim=1) if self.normalised else out

    def combine(self, layers: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([layers[0], *(F.normalize(x, dim=1) for x in layers[1:])], dim=1)


class LightGCNNet(GraphNet):
    """LightGCN's propagation: E^(l) = L E^(l-1); the mean of all layers."""

    def __init__(self, n_users: int, n_items: int, cfg: LightGCNConfig) -> None:
        super().__init__(n_users, n_items, cfg.embedding)
        self.n_layers = cfg.layers
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)

    def layer(self, k: int, e: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return side

    def combine(self, layers: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(layers).mean(dim=0)


class _GraphCF(Recommender):
    """BPR training over the clicks, graph set from the training data, user-bound scores."""

    split = "random"
    user_bound = True
    trainer_defaults: ClassVar[dict[str, Any]] = {"valid_mask_history": True}
    node_dropout: float = 0.0

    @property
    def net(self) -> GraphNet:
        self._check_fitted()
        assert isinstance(self.module_, GraphNet)
        return self.module_

    def batches(self, train: Ragged, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        """Shuffled BPR triples (user, clicked item, unclicked item), one per click."""
        users = np.repeat(np.arange(len(train)), train.lengths)
        net = self.net
        if getattr(self, "_graph_of", None) != id(train):
            net.set_graph(users, train.values)
            self._graph_of = id(train)
            self._keys = np.unique(users * self.n_items + train.values)
        neg = sample_unclicked(self._keys, users, self.n_items, rng)
        order = rng.permutation(len(users))
        size = self.config.batch_size  # type: ignore[attr-defined]
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            yield {"users": torch.from_numpy(users[rows]),
                   "pos": torch.from_numpy(train.values[rows]),
                   "neg": torch.from_numpy(neg[rows])}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        net = self.net
        final = net.propagate(self.node_dropout)
        u = final[batch["users"]]
        pos = final[net.n_users + batch["pos"]]
        neg = final[net.n_users + batch["neg"]]
        bpr = -F.logsigmoid((u * pos).sum(1) - (u * neg).sum(1)).mean()
        l2 = (net.user(batch["users"]).pow(2).sum() + net.item(batch["pos"]).pow(2).sum()
              + net.item(batch["neg"]).pow(2).sum()) / 2
        return bpr + self.config.reg * l2 / len(u)  # type: ignore[attr-defined]

    def score_index(self, histories: Sequence[np.ndarray],
                    users: np.ndarray | None = None) -> torch.Tensor:
        """e*_u . e*_i for every item; table users from the graph, others folded in."""
        net = self.net
        layers = net.layers()
        final = net.combine(layers)
        users = np.full(len(histories), -1) if users is None else np.asarray(users)
        known = (users >= 0) & (users < net.n_users)
        u = final[torch.from_numpy(np.where(known, users, 0))]
        unknown = np.flatnonzero(~known)
        if len(unknown):
            u[torch.from_numpy(unknown)] = net.fold_in([histories[r] for r in unknown], layers)
        return u @ final[net.n_users:].T


@register
class NGCF(_GraphCF):
    """NGCF (Wang et al. 2019) behind the zoo interface; see the module docstring."""

    name = "ngcf"
    Config = NGCFConfig
    config: NGCFConfig

    def build(self, n_items: int) -> nn.Module:
        self._graph_of = None
        self.node_dropout = self.config.node_dropout
        return NGCFNet(max(self.n_users, 1), n_items, self.config)

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"config": {"embedding": 16, "layers": 2, "batch_size": 64},
                "trainer": {"epochs": 8, "lr": 1e-2}}


@register
class LightGCN(_GraphCF):
    """LightGCN (He et al. 2020) behind the zoo interface; see the module docstring."""

    name = "lightgcn"
    Config = LightGCNConfig
    config: LightGCNConfig

    def build(self, n_items: int) -> nn.Module:
        self._graph_of = None
        return LightGCNNet(max(self.n_users, 1), n_items, self.config)

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"config": {"embedding": 16, "layers": 2, "batch_size": 64},
                "trainer": {"epochs": 8, "lr": 1e-2}}
