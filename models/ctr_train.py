"""Train and evaluate the point-wise CTR models (DLRM, FM, LR): AUC and log-loss.

Why not models/trainer.py: that trainer fits a `Recommender` on per-user sequences and
validates by ranking; a CTR model reads labelled feature rows and is validated by AUC.
This trainer keeps its conventions and its records (`EpochRecord`, `TrainResult`,
`plot_learning_curve` are imported from it, so the JSON and PNG look the same):

1. ``torch.manual_seed(seed)`` before the weights are drawn, one numpy generator for
   the batch order, ``torch.set_num_threads(threads)`` (restored afterwards);
2. per epoch: Adam over shuffled mini-batches of the training rows (BCE on logits;
   optionally `user_dropout`: a share of rows trained as an unknown user, since on the
   time split 85% of the later rows come from users who joined after the cut), then
   AUC and log-loss on the validation rows;
3. the best epoch by validation AUC kept in memory, restored at the end;
4. stop at `epochs`, after `patience` epochs without gain, or before an epoch that
   would not end within `max_seconds`.

Checkpoints (models/checkpoint.py) hold the model's name and config, the data
settings (protocol, seed, hash buckets, table sizes) needed to rebuild the same rows,
the weights and the training report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from models.checkpoint import FORMAT, load_checkpoint, make_version, portable, save_checkpoint
from models.ctr_baselines import FactorizationMachine, FMConfig, LogisticRegression, LRConfig
from models.ctr_data import DENSE_FIELDS, CTRData, CTRFrame
from models.dlrm import DLRM, DLRMConfig
from models.evaluator import mean_std
from models.trainer import BestEpoch, EpochRecord, TrainResult, make_optimiser

USER_COUNT = DENSE_FIELDS.index("user_count")
CTR_MODELS: dict[str, tuple[type[nn.Module], type[BaseModel]]] = {
    "dlrm": (DLRM, DLRMConfig),
    "fm": (FactorizationMachine, FMConfig),
    "lr": (LogisticRegression, LRConfig),
}


class CTRTrainerConfig(BaseModel):
    """Optimisation and stopping settings (RecBole's CTX defaults where it has them)."""

    epochs: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(2048, ge=1)
    patience: int = Field(10, ge=1, description="epochs without validation AUC gain")
    user_dropout: float = Field(
        0.0, ge=0, lt=1, description="share of training rows seen as a new user: user id "
        "0 (unknown) and activity count 0, so the model learns to score users it has no "
        "row for (on the time split, most later rows)")
    optimiser: Literal["adam", "sgd"] = Field(
        "adam", description="sgd: plain SGD, as the DLRM reference code trains")
    lr_decay: float = Field(
        1.0, gt=0, le=1, description="the learning rate is multiplied by this after every "
        "epoch (1: constant). Tried because DLRM's validation AUC peaks within 2-4 epochs; "
        "on ml-100k it did not help (docs/ctr.md, fourth round)")
    max_seconds: float | None = Field(None, gt=0)
    seed: int = 0
    threads: int | None = Field(1, ge=1)
    progress: bool = True


def build_model(name: str, data: CTRData | dict, settings: dict[str, Any] | None = None,
                seed: int | None = None) -> nn.Module:
    """A CTR model sized for `data` (a `CTRData` or its `describe()`), settings validated;
    its weights drawn under ``torch.manual_seed(seed)`` when a seed is given."""
    if name not in CTR_MODELS:
        raise ValueError(f"unknown CTR model {name!r}; one of {', '.join(CTR_MODELS)}")
    cls, config_cls = CTR_MODELS[name]
    info = data.describe() if isinstance(data, CTRData) else data
    if seed is not None:
        torch.manual_seed(seed)
    return cls(info["field_sizes"], info["n_dense"], config_cls(**(settings or {})))


def _tensors(frame: CTRFrame) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(frame.sparse), torch.from_numpy(frame.genres),
            torch.from_numpy(frame.dense), torch.from_numpy(frame.label))


@torch.no_grad()
def predict(model: nn.Module, frame: CTRFrame, batch_size: int = 8192) -> np.ndarray:
    """P(label = 1) of every row of `frame`."""
    model.eval()
    sparse, genres, dense, _ = _tensors(frame)
    out = [torch.sigmoid(model(sparse[i:i + batch_size], genres[i:i + batch_size],
                               dense[i:i + batch_size])) for i in range(0, len(frame), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def ctr_metrics(label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """AUC and log-loss (probabilities clipped to [1e-7, 1 - 1e-7], as sklearn's eps)."""
    prob = np.clip(prob, 1e-7, 1 - 1e-7)
    return {"auc": float(roc_auc_score(label, prob)),
            "logloss": float(log_loss(label, prob, labels=[0, 1]))}


def evaluate_ctr(model: nn.Module, frame: CTRFrame) -> dict[str, float]:
    return ctr_metrics(frame.label, predict(model, frame))


def fit(model: nn.Module, data: CTRData, config: CTRTrainerConfig | None = None,
        **overrides: Any) -> TrainResult:
    """Train `model` on ``data.train``, early-stopped on ``data.valid`` AUC; best restored."""
    cfg = CTRTrainerConfig(**{**(config.model_dump() if config else {}), **overrides})
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)  # dropout; the weights were drawn by build_model(seed=)
        return _loop(model, data, cfg, np.random.default_rng(cfg.seed))
    finally:
        torch.set_num_threads(threads)


def _loop(model: nn.Module, data: CTRData, cfg: CTRTrainerConfig,
          rng: np.random.Generator) -> TrainResult:
    optimiser = make_optimiser(model.parameters(), cfg.optimiser, cfg.lr, cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, cfg.lr_decay)
    sparse, genres, dense, label = _tensors(data.train)
    new_user_count = float(-data.dense_mean[USER_COUNT] / data.dense_std[USER_COUNT])
    name = getattr(model, "name", type(model).__name__)
    result = TrainResult(name, "auc")
    best = BestEpoch(result, cfg.patience)
    start = time.perf_counter()
    bar = tqdm(total=cfg.epochs, desc=f"train {name}", unit="epoch", disable=not cfg.progress)
    try:
        for epoch in range(1, cfg.epochs + 1):
            if _over_budget(result, time.perf_counter() - start, cfg.max_seconds):
                result.stopped = "budget"
                break
            t0 = time.perf_counter()
            model.train()
            losses = []
            order = torch.from_numpy(rng.permutation(len(label)))
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                rows = sparse[idx]
                values = dense[idx]
                if cfg.user_dropout:  # these rows look like a user who joined after the cut
                    drop = torch.from_numpy(rng.random(len(idx)) < cfg.user_dropout)
                    rows[:, 0] = rows[:, 0].masked_fill(drop, 0)
                    values[drop, USER_COUNT] = new_user_count
                optimiser.zero_grad(set_to_none=True)
                loss = F.binary_cross_entropy_with_logits(
                    model(rows, genres[idx], values), label[idx])
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()) * len(idx))
            schedule.step()
            t1 = time.perf_counter()
            valid = evaluate_ctr(model, data.valid)
            t2 = time.perf_counter()
            record = EpochRecord(epoch, sum(losses) / len(label), valid, t1 - t0, t2 - t1,
                                 t2 - start)
            result.history.append(record)
            bar.update()
            bar.set_postfix(loss=f"{record.loss:.4f}", auc=f"{valid['auc']:.4f}")
            if not best.offer(epoch, valid["auc"], model) and best.exhausted(epoch):
                break
    finally:
        bar.close()
    best.restore(model)
    result.seconds = time.perf_counter() - start
    return result


def _over_budget(result: TrainResult, elapsed: float, budget: float | None) -> bool:
    if budget is None or not result.history:
        return False
    last = result.history[-1]
    return elapsed + last.train_seconds + last.valid_seconds > budget


def save_ctr(path: Path, name: str, model: nn.Module, data: CTRData,
             metrics: dict[str, Any]) -> Path:
    """Write a checkpoint (atomic, weights-only loadable); its name is the version."""
    state = model.state_dict()
    version = make_version(name, state)
    payload = {"format": FORMAT, "kind": name, "version": version,
               "config": model.config.model_dump(), "data": data.describe(),
               "model": state, "metrics": metrics, "created_at": time.time()}
    if data.features is not None:  # what a serving ranker needs (models/ctr_ranker.py)
        payload["features"] = data.features.to_payload()
    return save_checkpoint(path, payload)


def load_ctr(path: Path) -> tuple[str, nn.Module, dict[str, Any]]:
    """(name, model with its weights, checkpoint payload)."""
    payload = load_checkpoint(path, required=("config", "data", "model"))
    name = payload["kind"]
    model = build_model(name, payload["data"], payload["config"])
    model.load_state_dict(payload["model"])
    model.eval()
    return name, model, payload


def summarise(folder: Path) -> str:
    """A markdown table (mean ± std over seeds) of every ``evaluate*.json`` under `folder`."""
    groups: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for path in sorted(Path(folder).rglob("evaluate*.json")):
        r = json.loads(path.read_text())
        hashed = str(r["data"].get("hash_buckets") or "-")
        model = r["model"] + (" + first-order" if r.get("config", {}).get("first_order")
                              else "")  # DLRM's extension: a row of its own
        groups.setdefault((r["data"]["protocol"], hashed, model), []).append(r)
    lines = ["| protocol | hash buckets | model | seeds | test AUC | test log-loss | "
             "valid AUC | epochs (best) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    for (protocol, hashed, model), rs in sorted(groups.items()):
        seeds = ",".join(str(r["data"]["seed"]) for r in rs)
        best = ",".join(str(r["train"].get("best_epoch", "-")) for r in rs)
        lines.append(f"| {protocol} | {hashed} | {model} | {seeds} | "
                     f"{mean_std([r['test']['auc'] for r in rs])} | "
                     f"{mean_std([r['test']['logloss'] for r in rs])} | "
                     f"{mean_std([r['valid']['auc'] for r in rs])} | {best} |")
        for base in ("popularity", "item-mean"):
            if model == "lr" and base in rs[0].get("baselines", {}):
                lines.append(f"| {protocol} | {hashed} | {base} (not learned) | {seeds} | "
                             f"{mean_std([r['baselines'][base]['auc'] for r in rs])} | - | - | - |")
    by_user = [(k, rs) for k, rs in sorted(groups.items()) if "test_by_user" in rs[0]]
    if by_user:
        lines += ["", "| protocol | model | known users: AUC | item-mean | new users: AUC | "
                  "item-mean |", "| --- | --- | --- | --- | --- | --- |"]
        for (protocol, _, model), rs in by_user:
            cells = [mean_std([r["test_by_user"][part][m] for r in rs])
                     for part in ("known", "new") for m in ("auc", "item-mean auc")]
            lines.append(f"| {protocol} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_run(name: str, dataset: Any, *, protocol: str, seed: int, hash_buckets: int | None,
              settings: dict[str, Any], trainer: dict[str, Any], checkpoint_dir: Path,
              out_dir: Path) -> tuple[dict[str, Any], Path]:
    """`lookalike train NAME` for a CTR model: fit, checkpoint, train.json, learning curve."""
    from models.ctr_data import build_ctr_data
    from models.trainer import plot_learning_curve

    data = build_ctr_data(dataset, protocol, seed=seed, hash_buckets=hash_buckets)
    model = build_model(name, data, settings, seed=seed)
    result = fit(model, data, seed=seed, **trainer)
    report = {"model": name, "dataset": dataset.name, "split": data.summary(),
              "data": data.describe(), "seed": seed, "config": model.config.model_dump(),
              "trainer": trainer, "valid": evaluate_ctr(model, data.valid),
              "train": result.to_json()}
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = save_ctr(checkpoint_dir / f"pending-{name}-{time.time_ns()}.pt", name, model, data,
                   report)
    final = tmp.rename(tmp.with_name(f"{load_checkpoint(tmp)['version']}.pt"))
    report["checkpoint"] = portable(final)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.json").write_text(json.dumps(report, indent=2))
    plot_learning_curve(result, out_dir / "learning-curve.png")
    return report, final


def evaluate_run(path: Path, dataset: Any, out_dir: Path) -> dict[str, Any]:
    """`lookalike evaluate NAME`: the checkpoint's test AUC/log-loss on the rows it was
    trained for (same protocol, seed, hashing), beside the count baselines."""
    from models.ctr_baselines import count_scores
    from models.ctr_data import build_ctr_data
    from models.trainer import plot_learning_curve, result_from_json

    name, model, payload = load_ctr(path)
    info = payload["data"]
    data = build_ctr_data(dataset, info["protocol"], seed=info["seed"],
                          hash_buckets=info["hash_buckets"])
    if data.describe()["field_sizes"] != info["field_sizes"]:
        raise ValueError(f"{path}: the data's tables differ from the checkpoint's "
                         f"({data.describe()['field_sizes']} vs {info['field_sizes']})")
    trained = payload.get("metrics", {})
    baselines = {}
    if info["hash_buckets"] is None:  # item index = item identity only without hashing
        baselines = {k: {"auc": ctr_metrics(data.test.label,
                                            count_scores(data.train, data.test, k))["auc"]}
                     for k in ("popularity", "item-mean")}
    report = {"model": name, "checkpoint": portable(path), "version": payload["version"],
              "dataset": dataset.name, "split": data.summary(), "data": data.describe(),
              "config": payload["config"], "trainer": trained.get("trainer", {}),
              "train": trained.get("train", {}), "valid": evaluate_ctr(model, data.valid),
              "test": evaluate_ctr(model, data.test), "baselines": baselines}
    if info["hash_buckets"] is None:  # user 0 = joined after the cut (time split)
        known = data.test.sparse[:, 0] > 0
        report["test_rows_known_user"] = float(known.mean())
        if 0 < known.sum() < len(known):
            prob = predict(model, data.test)
            item_mean = count_scores(data.train, data.test, "item-mean")
            report["test_by_user"] = {
                part: {**ctr_metrics(data.test.label[rows], prob[rows]),
                       "item-mean auc": ctr_metrics(data.test.label[rows],
                                                    item_mean[rows])["auc"]}
                for part, rows in (("known", known), ("new", ~known))}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"evaluate-{info['protocol']}.json").write_text(json.dumps(report, indent=2))
    if report["train"]:
        plot_learning_curve(result_from_json(report["train"]), out_dir / "learning-curve.png")
    return report
