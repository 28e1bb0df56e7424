"""Scale: what an item window and a user state cost, and how each stage's cost grows.

Two sweeps, each timing the state path the workers run (no broker: the broker's
cost per message does not depend on how many items or users there are):

- items 1k -> 100k: ``ItemClusters.apply_columns`` (the clustering worker's
  path) fed ``seeds_per_item`` seeds per item in poll-sized runs;
- users 10k -> 3M: ``UserStore.click`` (the scoring worker's user state).

"Linear or better" means the cost *per event* stays flat as the state grows;
the figure with a target is the ratio of the per-event cost at the largest
size to that at the smallest. Memory is measured per item and per user
(tracemalloc on a sample) and stated as the bound the configuration sets: a
full window (``window.size`` seeds) per item, and a user at ``history_len``
recent clicks and ``max_seen`` remembered items, times ``max_users``.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from engine.clustering import ItemClusters, SeedColumns
from engine.codec import Click
from engine.config import Settings, WindowConfig
from engine.user_store import UserStore
from lookalike.bench.report import BenchOptions, BenchReport
from models.ralm import RalmConfig

DIM = 128  # the production embedding size
POLL = 2_000  # seeds per poll (the clustering worker's max_poll_records order)


@dataclass
class Sweep:
    item_sizes: tuple[int, ...]
    seeds_per_item: int
    user_sizes: tuple[int, ...]
    clicks_per_user: int
    sample: int  # items / users measured with tracemalloc (full states: a tenth)


FULL = Sweep((1_000, 3_000, 10_000, 30_000, 100_000), 8,
             (10_000, 100_000, 300_000, 1_000_000, 3_000_000), 3, 5_000)
QUICK = Sweep((200, 2_000), 4, (1_000, 10_000), 2, 500)


def run(opts: BenchOptions) -> BenchReport:
    sweep = QUICK if opts.quick else FULL
    s = opts.settings
    report = BenchReport("scale", settings={"sweep": sweep.__dict__, "dim": DIM,
                                            "window": s.window.model_dump(),
                                            "scoring": s.scoring.model_dump()})
    item_cost(s.window.model_copy(update={"refresh_every": 2}), 20, 4, opts.seed)  # warm-up:
    # the compiled steps compile (or load from numba's cache) here, not in the first size
    items = [item_cost(s.window, n, sweep.seeds_per_item, opts.seed)
             for n in tqdm(sweep.item_sizes, desc="items sweep", leave=False)]
    users = [user_cost(s, n, sweep.clicks_per_user) for n in
             tqdm(sweep.user_sizes, desc="users sweep", leave=False)]
    _item_figures(report, s.window, sweep, items)
    _user_figures(report, s, sweep, users)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    plot(sweep, items, users, opts.out_dir / "scale.png")
    report.settings["plot"] = "scale.png"
    return report


# ---------------------------------------------------------------- items


def item_cost(cfg: WindowConfig, n_items: int, seeds_per_item: int,
              seed: int) -> tuple[float, float]:
    """Seconds per seed event through ``apply_columns`` with ``n_items`` live items:
    (an item's first seeds, which create its window and centroid row; seeds of a
    held item). Two rounds of ``seeds_per_item`` seeds per item, each in random item
    order, every seed a new user. Why two: the first round's cost at 100k items is
    mostly first touches of fresh memory (the kernel's page faults: a 1 GB centroid
    table), which the user sweep reports apart too."""
    rng = np.random.default_rng(seed)
    state = ItemClusters(cfg)
    costs = []
    for rnd in range(2):
        order = rng.permutation(np.repeat(np.arange(n_items), seeds_per_item))
        users = rnd * len(order) + rng.permutation(len(order)).astype(np.int64)
        elapsed = 0.0
        for lo in range(0, len(order), POLL):
            cols = _columns(order[lo:lo + POLL], users[lo:lo + POLL],
                            rnd * len(order) + lo, rng)
            t = time.perf_counter()
            state.apply_columns(cols)
            elapsed += time.perf_counter() - t
        costs.append(elapsed / len(order))
    return costs[0], costs[1]


def _columns(items: np.ndarray, users: np.ndarray, t0: int,
             rng: np.random.Generator) -> SeedColumns:
    """One record per seed, as a Zipf-free worst case (no two seeds share a record)."""
    n = len(items)
    return SeedColumns(items.tolist(), list(range(n + 1)), users,
                       np.arange(t0, t0 + n, dtype=np.float64),
                       rng.standard_normal((n, DIM), dtype=np.float32))


def window_bytes(cfg: WindowConfig, n_items: int, seeds: int, seed: int = 0) -> float:
    """Bytes per item holding ``seeds`` seeds (window, centroids, bookkeeping): the
    difference between ``2 n_items`` and ``n_items`` items, so that what does not
    grow with items (the k-means step's scratch buffer, empty table capacity) cancels."""
    return (_item_state_bytes(cfg, 2 * n_items, seeds, seed)
            - _item_state_bytes(cfg, n_items, seeds, seed)) / n_items


def _item_state_bytes(cfg: WindowConfig, n_items: int, seeds: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    order = np.repeat(np.arange(n_items), seeds)
    users = np.arange(len(order), dtype=np.int64)
    polls = [_columns(order[lo:lo + POLL], users[lo:lo + POLL], lo, rng)
             for lo in range(0, len(order), POLL)]
    return _traced(lambda: _fill(cfg, polls))


def _fill(cfg: WindowConfig, polls: list[SeedColumns]) -> ItemClusters:
    state = ItemClusters(cfg)
    for cols in polls:  # poll-sized, as the worker applies them
        state.apply_columns(cols)
    return state


# ---------------------------------------------------------------- users


def user_cost(s: Settings, n_users: int, clicks_per_user: int) -> tuple[float, float]:
    """Seconds per click through ``UserStore.click`` with ``n_users`` live users:
    (a user's first click, which creates their state; a click of a held user)."""
    cfg = s.scoring
    store = UserStore(cfg.history_len, max(cfg.max_users, n_users), cfg.max_seen)
    rng = np.random.default_rng(0)
    items = rng.integers(43_500, size=(clicks_per_user, n_users)).tolist()
    costs = []
    for rnd in range(clicks_per_user):  # round 0 creates every user, later rounds update
        clicks = [Click(u, i, 0.0) for u, i in enumerate(items[rnd])]
        t = time.perf_counter()
        for c in clicks:
            store.click(c)
        costs.append((time.perf_counter() - t) / n_users)
    return costs[0], float(np.mean(costs[1:]))


def user_bytes(s: Settings, n_users: int, clicks: int) -> float:
    """Bytes per user after ``clicks`` clicks each, at steady state.

    The store's arrays grow in blocks, so their allocated size over a small
    sample overstates a user: counted instead exactly per slot (its ring
    rows), plus the measured Python objects per user.
    """
    cfg = s.scoring
    kept: list[UserStore] = []

    def build() -> UserStore:
        store = UserStore(cfg.history_len, cfg.max_users, cfg.max_seen)
        for u in range(n_users):
            for j in range(clicks):
                store.click(Click(u, 1_000_000 + j, 0.0))
        kept.append(store)
        return store

    traced = _traced(build)
    store = kept[0]
    # + the latest embedding (RALM's default h floats) audiences search, slot owner, flag
    per_slot = (store.rows.itemsize * store.ring_len + 8 * store.id_len
                + 4 * RalmConfig().dim + store.user_of.itemsize + store.fresh.itemsize)
    return (traced - store.nbytes()) / n_users + per_slot


def _traced(build: Callable[[], object]) -> float:
    """Bytes still allocated by what ``build`` returns (amortised growth included:
    measure enough items or users that preallocated capacity does not dominate)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        kept = build()
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    del kept
    return float(used)


# ---------------------------------------------------------------- figures


def _item_figures(report: BenchReport, cfg: WindowConfig, sweep: Sweep,
                  cost: list[tuple[float, float]]) -> None:
    for n, (new, held) in zip(sweep.item_sizes, cost, strict=True):
        report.add(f"clustering: µs per seed event of a held item, {n:,} items", 1e6 * held,
                   "µs", note=f"an item's first seeds: {1e6 * new:.2f} µs")
    report.add(f"clustering cost growth per event, {sweep.item_sizes[0]:,} -> "
               f"{sweep.item_sizes[-1]:,} items", cost[-1][1] / cost[0][1], "x", "<= 2.0",
               "held items; flat = total cost linear in events")
    report.add(f"new-item cost growth, {sweep.item_sizes[0]:,} -> {sweep.item_sizes[-1]:,} "
               "items", cost[-1][0] / cost[0][0], "x",
               note="first touch of the item's memory (page faults) included")
    per = window_bytes(cfg, sweep.sample, sweep.seeds_per_item)
    full = window_bytes(cfg, sweep.sample // 10, cfg.size)
    report.add(f"item state, {sweep.seeds_per_item} seeds", per, "bytes/item",
               note="tracemalloc: window, centroids, bookkeeping")
    report.add(f"item state, full window ({cfg.size} seeds)", full, "bytes/item",
               note=f"the bound window.size sets ({cfg.vector_dtype} vectors, dim {DIM})")


def _user_figures(report: BenchReport, s: Settings, sweep: Sweep,
                  cost: list[tuple[float, float]]) -> None:
    cfg = s.scoring
    for n, (new, held) in zip(sweep.user_sizes, cost, strict=True):
        report.add(f"scoring user state: µs per click of a held user, {n:,} users", 1e6 * held,
                   "µs", note=f"a new user's first click: {1e6 * new:.2f} µs")
    first, last = cost[0][1], cost[-1][1]
    report.add(f"user state cost growth per click, {sweep.user_sizes[0]:,} -> "
               f"{sweep.user_sizes[-1]:,} users", last / first, "x", "<= 2.0",
               "held users; flat = total cost linear in clicks")
    report.add(f"new-user cost growth, {sweep.user_sizes[0]:,} -> {sweep.user_sizes[-1]:,} users",
               cost[-1][0] / cost[0][0], "x",
               note="first touch of the user's memory (page faults) included")
    light = user_bytes(s, sweep.sample, sweep.clicks_per_user)
    full = user_bytes(s, sweep.sample // 10, max(cfg.history_len, cfg.max_seen))
    report.add(f"user state, {sweep.clicks_per_user} clicks", light, "bytes/user")
    report.add(f"user state, full (history {cfg.history_len}, seen {cfg.max_seen})", full,
               "bytes/user", note="the bound history_len and max_seen set")
    report.add(f"user state bound at max_users={cfg.max_users:,}", full * cfg.max_users / 2**30,
               "GiB", note="full users x scoring.max_users")


def plot(sweep: Sweep, items: list[tuple[float, float]], users: list[tuple[float, float]],
         path: Path) -> None:
    """Per-event cost vs state size, log x: a flat line is linear total cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(sweep.item_sizes, [1e6 * held for _, held in items], "o-",
           label="seed of a held item")
    a.plot(sweep.item_sizes, [1e6 * new for new, _ in items], "s--", color="tab:blue",
           alpha=0.6, label="first seeds (create the state)")
    a.legend()
    a.set(xscale="log", xlabel="live items", ylabel="µs per seed event",
          title="clustering worker state", ylim=(0, None))
    b.plot(sweep.user_sizes, [1e6 * held for _, held in users], "o-", color="tab:orange",
           label="click of a held user")
    b.plot(sweep.user_sizes, [1e6 * new for new, _ in users], "s--", color="tab:red",
           label="first click (creates the state)")
    b.legend()
    b.set(xscale="log", xlabel="live users", ylabel="µs per click",
          title="scoring worker user state", ylim=(0, None))
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle("Cost per event as state grows (flat = linear total cost)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
