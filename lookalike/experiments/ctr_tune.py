"""Validation-AUC tuning of one CTR setting on seed 0's split, averaged over weight seeds.

The "Tuning" tables of docs/ctr.md: the split (and the data) of seed 0, the model's
weights and the batch order of each weight seed, patience 5, one torch thread; the
test rows are never read. One JSON line per run is appended to the log
(``lookalike study ctr-tune``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.config import default_cache_dir
from engine.data import load_dataset
from models.ctr_data import build_ctr_data
from models.ctr_train import build_model, fit


def tune(model_name: str, protocol: str, weight_seeds: Sequence[int], settings: dict,
         trainer: dict, log_path: Path, say: Callable[[str], object] = print) -> float:
    """The mean best validation AUC over ``weight_seeds``; one log line per seed."""
    trainer = {**trainer, "threads": 1, "progress": False}
    data = build_ctr_data(load_dataset("ml-100k", default_cache_dir() / "data"), protocol,
                          seed=0)
    aucs = []
    for w in weight_seeds:
        t0 = time.perf_counter()
        model = build_model(model_name, data, settings, seed=w)
        result = fit(model, data, seed=w, **trainer)
        best = max(result.history, key=lambda r: r.valid["auc"])
        aucs.append(best.valid["auc"])
        line = {"model": model_name, "protocol": protocol, "split_seed": 0,
                "weight_seed": w, "settings": settings,
                **{k: v for k, v in trainer.items() if k != "progress"},
                "best_epoch": best.epoch, "epochs": len(result.history),
                "valid_auc": best.valid["auc"], "valid_logloss": best.valid["logloss"],
                "seconds": round(time.perf_counter() - t0, 1)}
        with log_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        say(f"w{w}: valid auc {best.valid['auc']:.4f} (epoch {best.epoch}/"
            f"{len(result.history)}, {line['seconds']} s)")
    mean = statistics.mean(aucs)
    say(f"{protocol} {settings} {trainer}: mean valid auc {mean:.4f} over weight seeds "
        f"{list(weight_seeds)}")
    return mean
