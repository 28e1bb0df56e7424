"""Validation-AUC tuning of one CTR setting on seed 0's split, averaged over weight seeds.

The "Tuning" tables of docs/ctr.md: the split (and the data) of seed 0, the model's
weights and the batch order of each weight seed, patience 5, one torch thread; the
test rows are never read. One JSON line per run is appended to --log.

    .venv/bin/python docs/ctr/tune.py --protocol ctx --weight-seeds 0 1 2 3 4 \
        --lr 2e-2 --weight-decay 3e-5 --set interaction_itself=true --set first_order=true
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from engine.config import default_cache_dir
from engine.data import load_dataset
from models.ctr_data import build_ctr_data
from models.ctr_train import build_model, fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dlrm")
    p.add_argument("--protocol", choices=("ctx", "time"), required=True)
    p.add_argument("--weight-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lr-decay", type=float, default=1.0)
    p.add_argument("--optimiser", choices=("adam", "sgd"), default="adam")
    p.add_argument("--user-dropout", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--set", dest="settings", action="append", default=[],
                   help="model setting KEY=VALUE (as lookalike train --set)")
    p.add_argument("--log", type=Path, default=Path("docs/ctr/tuning.jsonl"))
    args = p.parse_args()

    settings = dict(s.split("=", 1) for s in args.settings)
    trainer = {"lr": args.lr, "weight_decay": args.weight_decay, "lr_decay": args.lr_decay,
               "optimiser": args.optimiser,
               "user_dropout": args.user_dropout, "batch_size": args.batch_size,
               "patience": args.patience, "threads": 1, "progress": False}
    data = build_ctr_data(load_dataset("ml-100k", default_cache_dir() / "data"),
                          args.protocol, seed=0)
    aucs = []
    for w in args.weight_seeds:
        t0 = time.perf_counter()
        model = build_model(args.model, data, settings, seed=w)
        result = fit(model, data, seed=w, **trainer)
        best = max(result.history, key=lambda r: r.valid["auc"])
        aucs.append(best.valid["auc"])
        line = {"model": args.model, "protocol": args.protocol, "split_seed": 0,
                "weight_seed": w, "settings": settings,
                **{k: v for k, v in trainer.items() if k != "progress"},
                "best_epoch": best.epoch, "epochs": len(result.history),
                "valid_auc": best.valid["auc"], "valid_logloss": best.valid["logloss"],
                "seconds": round(time.perf_counter() - t0, 1)}
        with args.log.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"w{w}: valid auc {best.valid['auc']:.4f} (epoch {best.epoch}/"
              f"{len(result.history)}, {line['seconds']} s)", flush=True)
    print(f"{args.protocol} {settings} {trainer}: mean valid auc "
          f"{statistics.mean(aucs):.4f} over weight seeds {args.weight_seeds}")


if __name__ == "__main__":
    main()
