"""Validation-only tuning of a general-CF model over several split seeds.

Why several seeds: a setting chosen on one split's validation NDCG@10 follows that
split's noise; the mean over seeds 0-4 is what the table reports, so it is what a
setting is chosen on (test figures are never read here). One line per run is
appended to docs/models/tuning.jsonl.

    .venv/bin/python docs/models/tune.py multvae '{"batch_size": 100}' '{}' '{"dropout": 0.3}'
    (base settings, then one variant per argument; SEEDS="0 1 2" for fewer splits)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from engine.config import default_cache_dir
from engine.data import fetch_ml100k, load_recbole
from models.recommender import get_model
from models.splits import random_split

TRAINER_KEYS = {"patience", "lr", "epochs", "max_seconds", "metric"}
SEEDS = tuple(int(x) for x in os.environ.get("SEEDS", "0 1 2 3 4").split())


def main(name: str, base: dict, variants: list[dict]) -> None:
    ds = load_recbole(fetch_ml100k(default_cache_dir() / "data", quiet=True))
    splits = {seed: random_split(ds, seed=seed) for seed in SEEDS}
    log = Path(__file__).with_name("tuning.jsonl")
    for variant in variants:
        opts = {**base, **variant}
        model_opts = {k: v for k, v in opts.items() if k not in TRAINER_KEYS}
        trainer = {"max_seconds": 600, "progress": False,
                   **{k: v for k, v in opts.items() if k in TRAINER_KEYS}}
        values = []
        for seed in SEEDS:
            t0 = time.perf_counter()
            result = get_model(name)(**model_opts).fit(splits[seed], seed=seed, threads=1,
                                                         **trainer)
            values.append(result.best_value)
            line = {"model": name, "settings": opts, "seed": seed, "metric": result.metric,
                    "valid": round(result.best_value, 4), "best_epoch": result.best_epoch,
                    "epochs": result.epochs, "seconds": round(time.perf_counter() - t0, 1)}
            with log.open("a") as f:
                f.write(json.dumps(line) + "\n")
        print(f"{name} {opts}: valid mean {sum(values) / len(values):.4f} "
              f"({', '.join(f'{v:.4f}' for v in values)})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), [json.loads(a) for a in sys.argv[3:]] or [{}])
