"""``lookalike bench train``: SASRec's epoch time, ours against RecBole's way of training.

Target (issue 4): SASRec's epoch on ml-100k at least 10× faster than
RecBole 1.2.1's. RecBole feeds every prefix of every training history as its
own example (~97k sequences of up to 50 clicks, the loss at the last position
only); our SASRec trains every position of a window in one causal pass, as
the SASRec paper does (~2.4k windows, the same targets).

Baseline in the same run: the same network, loss (softmax CE), batch size
and thread count, fed RecBole's way, timed over ``baseline_batches`` batches
and extrapolated to its whole epoch (a full one takes minutes). RecBole's own
figure measured on this kind of machine (``../shared/peers/recbole-ml100k.md``:
194 s per epoch) is reported beside it, not measured here: installing and
running RecBole is not part of this project's run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.data import load_dataset
from lookalike.bench.report import BenchOptions, BenchReport
from models.recommender import get_model
from models.sasrec import PAD
from models.splits import Ragged, make_split
from models.trainer import make_optimiser

RECBOLE_SASREC_EPOCH_S = 194.287  # SASRec_CE_LS_full, ../shared/peers/recbole-ml100k.md
RECBOLE_BATCH = 2048  # RecBole's default train_batch_size


@dataclass
class TrainSize:
    epochs: int  # ours, timed in full
    baseline_batches: int  # RecBole's way, timed then extrapolated


def run(opts: BenchOptions) -> BenchReport:
    size = TrainSize(1, 3) if opts.quick else TrainSize(3, 12)
    torch.set_num_threads(1)  # RecBole's figure was taken on one thread too
    split = make_split(load_dataset("ml-100k", opts.settings.data_dir), "loo")
    report = BenchReport("train", settings={"model": "sasrec", "loss": "ce", "threads": 1,
                                            "epochs": size.epochs,
                                            "baseline_batches": size.baseline_batches})
    model = get_model("sasrec")(loss="ce")
    torch.manual_seed(opts.seed)
    model.prepare(split.item_ids)
    ours = our_epoch_seconds(model, split.train, size.epochs, opts.seed)
    n_prefixes, per_batch = prefix_batch_seconds(model, split.train, size.baseline_batches,
                                                 opts.seed)
    theirs = per_batch * int(np.ceil(n_prefixes / RECBOLE_BATCH))
    report.add("SASRec epoch, ours (all positions per window)", ours, "s")
    report.add("SASRec epoch, RecBole's way (every prefix an example), same net", theirs, "s",
               note=f"{n_prefixes:,} prefixes, batch {RECBOLE_BATCH}, extrapolated from "
               f"{size.baseline_batches} batches")
    report.add("speed-up vs RecBole's way, same run", theirs / ours, "x", ">= 10")
    report.add("SASRec epoch, RecBole 1.2.1 as measured (not this run)",
               RECBOLE_SASREC_EPOCH_S, "s", note="../shared/peers/recbole-ml100k.md")
    report.add("speed-up vs RecBole's measured epoch", RECBOLE_SASREC_EPOCH_S / ours, "x",
               note="different runs: for scale only")
    return report


def our_epoch_seconds(model, train: Ragged, epochs: int, seed: int) -> float:
    """Mean seconds of a training epoch through the model's own batches and loss."""
    rng = np.random.default_rng(seed)
    opt = make_optimiser(model.module_.parameters())  # the trainer's own optimiser
    model.module_.train()
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for batch in model.batches(train, rng):
            _step(opt, model.loss(batch))
        times.append(time.perf_counter() - t)
    return float(np.mean(times))


def prefix_batch_seconds(model, train: Ragged, n_batches: int, seed: int) -> tuple[int, float]:
    """(prefixes in an epoch, seconds per batch) of training on every prefix, RecBole's way."""
    seqs, targets = prefixes(train, model.config.max_len)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(seqs))
    opt = torch.optim.Adam(model.module_.parameters(), lr=1e-3)
    net = model.net
    net.train()
    t = time.perf_counter()
    for b in range(n_batches):
        rows = order[b * RECBOLE_BATCH:(b + 1) * RECBOLE_BATCH]
        out = net(torch.from_numpy(seqs[rows]))[:, -1]  # the last position only
        logits = out @ net.item_weights().T
        _step(opt, F.cross_entropy(logits, torch.from_numpy(targets[rows]) - 1))
    return len(seqs), (time.perf_counter() - t) / n_batches


def prefixes(train: Ragged, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (clicks before t, click t) of every history, left-padded to ``max_len``."""
    n = np.diff(train.offsets)
    user = np.repeat(np.arange(len(n)), np.maximum(n - 1, 0))
    end = np.concatenate([np.arange(1, k) for k in n if k > 1]) if (n > 1).any() else user
    pos = end[:, None] - max_len + np.arange(max_len)
    valid = pos >= 0
    flat = train.offsets[user][:, None] + np.where(valid, pos, 0)
    seqs = np.where(valid, train.values[flat] + 1, PAD)
    return seqs, train.values[train.offsets[user] + end] + 1


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
