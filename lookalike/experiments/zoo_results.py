"""The general-CF results table of docs/models.md, built from the run folders.

Why a module: the table is mean ± std over seeds of figures written by
``lookalike train`` / ``lookalike evaluate`` (docs/models/run.sh); typing it by
hand is how a table and its runs drift apart. RecBole's figures come from the
peers file when given, so both sides of every comparison are read, not copied.

    lookalike study zoo-table docs/models/runs --json docs/models/general-cf-ml100k.json \
        --recbole ../shared/peers/recbole-ml100k.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from models.evaluator import mean_std

METRICS = ("recall@10", "ndcg@10", "hit@10", "precision@10", "mrr@10")
# Table order, label, RecBole's run of the same model (None: RecBole has no such run).
MODELS: dict[str, tuple[str, str | None]] = {
    "multvae": ("Mult-VAE", "MultiVAE_RO_full"),
    "multdae": ("Mult-DAE", None),
    "cdae": ("CDAE", "CDAE_RO_full"),
    "ncf-gmf": ("GMF", None),
    "ncf-mlp": ("MLP", None),
    "neumf": ("NeuMF (pre-trained)", "NeuMF_RO_full"),
    "ngcf": ("NGCF", "NGCF_RO_full"),
    "lightgcn": ("LightGCN", "LightGCN_RO_full"),
    "autorec": ("I-AutoRec (ranked by predicted rating)", None),
}
PRETRAINED_BY = {"neumf": ("ncf-gmf", "ncf-mlp")}  # their time counts in NeuMF's run


def load_runs(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Per model, one record per seed: test metrics @10 and how training went."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(folder).glob("*/seed*/evaluate-ro-full.json")):
        ev = json.loads(path.read_text())
        tr = json.loads((path.parent / "train.json").read_text())
        t = tr["train"]
        runs.setdefault(ev["model"], []).append({
            "seed": tr["seed"],
            "metrics": {m: round(ev["variants"]["recbole"]["metrics"][m], 4) for m in METRICS},
            "config": tr["config"], "trainer": tr["trainer"], "split": tr["split"],
            "epochs": t["epochs"], "best_epoch": t["best_epoch"], "stopped": t["stopped"],
            "seconds": round(t["seconds"], 1),
            "seconds_per_epoch": round(t["seconds_per_epoch"], 3),
        })
    for model, parts in PRETRAINED_BY.items():
        for run in runs.get(model, []):
            pre = [r["seconds"] for p in parts for r in runs.get(p, []) if r["seed"] == run["seed"]]
            run["seconds_with_pretraining"] = round(run["seconds"] + sum(pre), 1)
    return runs


def recbole_rows(peers: Path) -> dict[str, dict[str, Any]]:
    """RecBole's runs in the peers file's table: name -> metrics, epochs, stop."""
    rows = {}
    for line in peers.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].endswith("_RO_full"):
            continue
        full_ranking = cells[1].split(";")[0]  # before any "uni100:" part
        figures = {k: float(v) for k, v in re.findall(r"([a-z]+@10) ([0-9.]+)", full_ranking)}
        rows[cells[0]] = {"metrics": figures, "epochs": cells[2], "stop": cells[3]}
    return rows


SEQ_METRICS = ("hit@10", "ndcg@10", "mrr@10")
SEQ_COLUMNS = (("loo-full", "recbole"), ("loo-uni100", "recbole"), ("loo-full", "paper"),
               ("loo-uni100", "paper"))


def sasrec_table(folder: Path) -> str:
    """SASRec's table: per loss, HR/NDCG/MRR@10 under both leave-one-out protocols and
    both variants (mean ± std over the seeds of ``<folder>/sasrec-<loss>/seed*``)."""
    lines = ["| run | " + " | ".join(f"{p}, {v} variant" for p, v in SEQ_COLUMNS)
             + " | seeds | epochs (stop) | train s/epoch |", "| --- " * 8 + "|"]
    for run in sorted(Path(folder).glob("sasrec-*")):
        seeds = sorted(run.glob("seed*/train.json"))
        if not seeds:
            continue
        trains = [json.loads(p.read_text())["train"] for p in seeds]
        cells = []
        for protocol, variant in SEQ_COLUMNS:
            evs = [json.loads((p.parent / f"evaluate-{protocol}.json").read_text())
                   for p in seeds]
            cells.append(", ".join(mean_std([e["variants"][variant]["metrics"][m] for e in evs])
                                   for m in SEQ_METRICS))
        stops = "/".join(sorted({t["stopped"] for t in trains}))
        lines.append(f"| **ours, {run.name.removeprefix('sasrec-').upper()}** | "
                     + " | ".join(cells) + f" | {len(seeds)} | "
                     f"{_span([t['epochs'] for t in trains])} ({stops}) | "
                     f"{mean_std([t['seconds_per_epoch'] for t in trains])} |")
    return "\n".join(lines)


def _span(values: list[float], fmt: str = "{:.0f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def table(runs: dict[str, list[dict[str, Any]]], recbole: dict[str, dict[str, Any]]) -> str:
    """Markdown: ours (mean ± std over seeds) with RecBole's single run below it."""
    lines = ["| model | " + " | ".join(METRICS) + " | seeds | epochs (stop) | "
             "train + validation s per run |", "| --- " * (len(METRICS) + 4) + "|"]
    for name, (label, theirs) in MODELS.items():
        rs = runs.get(name)
        if not rs:
            continue
        stops = "/".join(sorted({r["stopped"] for r in rs}))
        seconds = [r.get("seconds_with_pretraining", r["seconds"]) for r in rs]
        extra = " (+ GMF, MLP)" if name in PRETRAINED_BY else ""
        lines.append(f"| **ours, {label}** | " + " | ".join(
            mean_std([r["metrics"][m] for r in rs]) for m in METRICS)
            + f" | {len(rs)} | {_span([r['epochs'] for r in rs])}{extra} ({stops}) | "
            f"{_span(seconds)} |")
        if theirs and theirs in recbole:
            row = recbole[theirs]
            lines.append(f"| RecBole {theirs} | " + " | ".join(
                f"{row['metrics'][m]:.4f}" if m in row["metrics"] else "-" for m in METRICS)
                + f" | 1 | {row['epochs']} ({row['stop']}) | - |")
    return "\n".join(lines)
