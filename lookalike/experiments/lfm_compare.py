"""LFM vs Mult-VAE under strong generalization: the runs behind docs/lfm.md.

Why a runner: `lookalike train` trains each model on its own family's split (Mult-VAE
on the random 8:1:1 split), while the paper's comparison needs both on the same
held-out users. Each run: `strong_generalization(seed)`, fit with early stopping on
validation NDCG@20 (held-out users, fold-in 80%), then test Recall@20 / NDCG@20 on the
test users (sg-full: fold-in clicks masked), parameter count and time; one JSON line per
run, appended to `--out`, so an interrupted sweep keeps what it finished.

Example:
    lookalike study lfm-compare --out runs.jsonl --seed 0 \\
        --run multvae --run lfm:clusters=128 --max-seconds 240
    lookalike study lfm-compare --report runs.jsonl --plot ndcg-vs-clusters.png
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import default_cache_dir
from engine.data import load_dataset
from models.evaluator import PROTOCOLS, evaluate
from models.lfm import parameter_count
from models.recommender import get_model
from models.splits import strong_generalization

KS = (10, 20)


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    """"lfm:clusters=128,key_dim=32" -> ("lfm", {"clusters": "128", "key_dim": "32"})."""
    name, _, rest = spec.partition(":")
    settings = dict(pair.split("=", 1) for pair in rest.split(",") if pair)
    return name, settings


def run_one(name: str, settings: dict[str, Any], seed: int, dataset: str = "ml-100k",
            **trainer: Any) -> dict[str, Any]:
    """Fit one model on the strong split of `seed`; its test figures, size and time."""
    split = strong_generalization(load_dataset(dataset, default_cache_dir() / "data"), seed=seed)
    model = get_model(name)(**settings)
    options = {"metric": "ndcg@20", "valid_mask_history": True, "threads": 1,
               "progress": False, **trainer}
    result = model.fit(split, seed=seed, **options)
    test = evaluate(model, split.test, PROTOCOLS["sg-full"]["paper"], ks=KS).mean()
    return {"model": name, "settings": settings, "seed": seed, "config": model.config.model_dump(),
            "trainer": options, "split": split.summary(), "params": parameter_count(model),
            "epochs": result.epochs, "best_epoch": result.best_epoch, "stopped": result.stopped,
            "valid_ndcg@20": result.best_value, "train_seconds": result.seconds,
            "seconds_per_epoch": result.seconds_per_epoch,
            **{f"test_{m}": test[m] for m in ("recall@20", "ndcg@20", "recall@10", "ndcg@10")}}


def _label(row: dict[str, Any]) -> str:
    lr = {"lr": row["trainer"]["lr"]} if "lr" in row["trainer"] else {}
    settings = ",".join(f"{k}={v}" for k, v in {**row["settings"], **lr}.items())
    return f"{row['model']}:{settings}" if settings else row["model"]


def _mean_std(values: list[float]) -> str:
    return (f"{values[0]:.4f}" if len(values) == 1
            else f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}")


def report(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one line per setting (mean ± std over its seeds)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_label(row)].append(row)
    lines = ["| setting | seeds | params | valid NDCG@20 | test Recall@20 | test NDCG@20 | "
             "epochs (best) | s/epoch | s |", "|" + " --- |" * 9]
    for label, runs in groups.items():
        col = {k: [r[k] for r in runs] for k in runs[0] if isinstance(runs[0][k], int | float)}
        epochs = "/".join(f"{r['epochs']} ({r['best_epoch']})" for r in runs)
        lines.append(
            f"| {label} | {','.join(str(r['seed']) for r in runs)} | {runs[0]['params']:,} | "
            f"{_mean_std(col['valid_ndcg@20'])} | {_mean_std(col['test_recall@20'])} | "
            f"{_mean_std(col['test_ndcg@20'])} | "
            f"{epochs} | "
            f"{np.mean(col['seconds_per_epoch']):.2f} | {np.mean(col['train_seconds']):.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test NDCG@20 against the number of clusters: one line per LFM setting (the other
    settings alike; mean over seeds, each run a dot), a dashed line per baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_n in _lfm_curves(rows).items():
        ns = sorted(by_n)
        line = ax.plot(ns, [np.mean(by_n[n]) for n in ns], "o-", label=f"LFM {label}")[0]
        ax.scatter([n for n in ns for _ in by_n[n]], [v for n in ns for v in by_n[n]],
                   s=10, color=line.get_color(), alpha=0.4)
    for (label, (values, params)), color in zip(_baselines(rows).items(), (
            "tab:red", "tab:green", "tab:purple", "tab:grey", "tab:brown")):
        ax.axhline(np.mean(values), color=color, linestyle="--",
                   label=f"{label} ({params:,} params, n={len(values)})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clusters N (= attention heads = item embedding width)")
    ax.set_ylabel("test NDCG@20 (sg-full)")
    ax.set_title("ml-100k, strong generalization")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _lfm_curves(rows: list[dict[str, Any]]) -> dict[str, dict[int, list[float]]]:
    """LFM test NDCG@20 by clusters, per setting of everything else."""
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["model"] == "lfm":
            rest = {k: v for k, v in r["settings"].items() if k != "clusters"}
            rest.update({"lr": r["trainer"]["lr"]} if "lr" in r["trainer"] else {})
            label = ",".join(f"{k}={v}" for k, v in rest.items()) or "defaults"
            curves[label][int(r["config"]["clusters"])].append(r["test_ndcg@20"])
    return curves


def _baselines(rows: list[dict[str, Any]]) -> dict[str, tuple[list[float], int]]:
    out: dict[str, tuple[list[float], int]] = {}
    for r in rows:
        if r["model"] != "lfm":
            out.setdefault(_label(r), ([], r["params"]))[0].append(r["test_ndcg@20"])
    return out
