"""Validation-only tuning of a general-CF model over several split seeds.

Why several seeds: a setting chosen on one split's validation NDCG@10 follows that
split's noise; the mean over seeds 0-4 is what the table reports, so it is what a
setting is chosen on (test figures are never read here). One line per run is
appended to the log (``lookalike study zoo-tune``; docs/models/tuning.jsonl).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.config import default_cache_dir
from engine.data import fetch_ml100k, load_recbole
from models.recommender import get_model
from models.splits import random_split

TRAINER_KEYS = {"patience", "lr", "epochs", "max_seconds", "metric"}


def tune(name: str, base: dict, variants: list[dict], seeds: Sequence[int], log_path: Path,
         say: Callable[[str], object] = print) -> dict[str, float]:
    """Each variant's mean best validation value over ``seeds`` (by its JSON)."""
    ds = load_recbole(fetch_ml100k(default_cache_dir() / "data", quiet=True))
    splits = {seed: random_split(ds, seed=seed) for seed in seeds}
    out = {}
    for variant in variants:
        opts = {**base, **variant}
        model_opts = {k: v for k, v in opts.items() if k not in TRAINER_KEYS}
        trainer = {"max_seconds": 600, "progress": False,
                   **{k: v for k, v in opts.items() if k in TRAINER_KEYS}}
        values = []
        for seed in seeds:
            t0 = time.perf_counter()
            result = get_model(name)(**model_opts).fit(splits[seed], seed=seed, threads=1,
                                                         **trainer)
            values.append(result.best_value)
            line = {"model": name, "settings": opts, "seed": seed, "metric": result.metric,
                    "valid": round(result.best_value, 4), "best_epoch": result.best_epoch,
                    "epochs": result.epochs, "seconds": round(time.perf_counter() - t0, 1)}
            with log_path.open("a") as f:
                f.write(json.dumps(line) + "\n")
        out[json.dumps(opts, sort_keys=True)] = sum(values) / len(values)
        say(f"{name} {opts}: valid mean {sum(values) / len(values):.4f} "
            f"({', '.join(f'{v:.4f}' for v in values)})")
    return out
