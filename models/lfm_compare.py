"""LFM vs Mult-VAE under strong generalization: the runs behind docs/lfm.md.

Why a runner: `lookalike train` trains each model on its own family's split (Mult-VAE
on the random 8:1:1 split), while the paper's comparison needs both on the same
held-out users. Each run: `strong_generalization(seed)`, fit with early stopping on
validation NDCG@20 (held-out users, fold-in 80%), then test Recall@20 / NDCG@20 on the
test users (sg-full: fold-in clicks masked), parameter count and time; one JSON line per
run, appended to `--out`, so an interrupted sweep keeps what it finished.

Example:
    python -m models.lfm_compare --out runs.jsonl --seeds 0 \\
        --run multvae --run lfm:clusters=128 --max-seconds 240
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import orjson

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True,
                        help="MODEL[:KEY=VALUE,...], repeatable")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-seconds", type=float, default=240.0)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args()
    trainer = {"max_seconds": args.max_seconds, "epochs": args.epochs,
               "patience": args.patience, **({"lr": args.lr} if args.lr else {})}
    for seed in args.seeds:
        for spec in args.run:
            name, settings = parse_run(spec)
            t0 = time.perf_counter()
            row = run_one(name, settings, seed, **trainer)
            row["wall_seconds"] = time.perf_counter() - t0
            with args.out.open("ab") as f:
                f.write(orjson.dumps(row) + b"\n")
            print(f"{spec} seed {seed}: ndcg@20 {row['test_ndcg@20']:.4f} recall@20 "
                  f"{row['test_recall@20']:.4f} params {row['params']:,} epochs {row['epochs']} "
                  f"({row['stopped']}) {row['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
