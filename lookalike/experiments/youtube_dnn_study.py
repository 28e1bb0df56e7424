"""The runs and tables behind docs/youtube_dnn.md (``lookalike study youtube-dnn``):
candidate generation per seed, ANN against exact search at catalogue scale, the
popularity floor, the ranking stage, and the summary tables from their JSON files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.evaluator import mean_std
from models.popularity import PopularityScores
from models.splits import EvalSet
from models.youtube_dnn import YouTubeDNN, ann_vs_exact
from models.youtube_dnn_ranking import RankConfig, RankingNet, fit_ranker, with_context

if TYPE_CHECKING:
    from engine.data import Dataset

def _evaluate_loo(model: Any, data: EvalSet, ks: Sequence[int]) -> dict[str, dict[str, float]]:
    from models.evaluator import PROTOCOLS, evaluate

    return {variant: evaluate(model, data, p, ks=ks).mean()
            for variant, p in PROTOCOLS["loo-full"].items()}


def run_candidates(dataset: Dataset, seed: int, out: Path, profiles: bool,
                   settings: dict[str, Any], trainer: dict[str, Any]) -> dict[str, Any]:
    """One seed of docs/youtube_dnn.md: fit (as `lookalike train youtube-dnn`), full-ranking
    test metrics (loo-full, both variants), ANN vs exact recall; JSON and PNG."""
    from models.splits import leave_one_out
    from models.trainer import plot_learning_curve

    split = leave_one_out(dataset)
    model = YouTubeDNN(**settings)
    if profiles:
        model.use_profiles(dataset.users)
    result = model.fit(split, seed=seed, threads=1, progress=False, **trainer)
    ks = (10, 20, 50, 100)
    report = {"model": model.name, "seed": seed, "profiles": profiles,
              "config": model.config.model_dump(), "split": split.summary(),
              "trainer": {**model.trainer_defaults, **trainer, "threads": 1},
              "train": {k: v for k, v in result.to_json().items() if k != "history"},
              "test": _evaluate_loo(model, split.test, ks),
              "ann": ann_vs_exact(model, split.test)}
    tag = f"{'profiles' if profiles else 'clicks'}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"candidates-{tag}.json").write_text(json.dumps(report, indent=2))
    plot_learning_curve(result, out / f"learning-curve-{tag}.png")
    return report


SCALE_OPTIONS: dict[str, dict[str, Any]] = {"hnsw": {"hnsw_m": 32, "ef_search": 128},
                                             "ivf": {"nlist": 1024, "nprobe": 32}}


def run_ann_scale(dataset: Dataset, seed: int, out: Path, catalogue: int,
                  settings: dict[str, Any], trainer: dict[str, Any],
                  options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """ANN vs exact with the catalogue padded to `catalogue` synthetic items (JSON)."""
    options = options or SCALE_OPTIONS
    from models.splits import leave_one_out

    split = leave_one_out(dataset)
    model = YouTubeDNN(**settings)
    model.fit(split, seed=seed, threads=1, progress=False, **trainer)
    report = {"seed": seed, "catalogue": catalogue, "config": model.config.model_dump(),
              "ann": ann_vs_exact(model, split.test, options=options,
                                  catalogue=catalogue, seed=seed)}
    out.mkdir(parents=True, exist_ok=True)
    tag = f"ef{options['hnsw']['ef_search']}-nprobe{options['ivf']['nprobe']}"
    (out / f"ann-scale-{catalogue}-{tag}-seed{seed}.json").write_text(
        json.dumps(report, indent=2))
    return report


def run_popularity(dataset: Dataset, out: Path) -> dict[str, Any]:
    """The popularity floor on the same split and protocol."""
    from models.splits import leave_one_out

    split = leave_one_out(dataset)
    report = {"model": "popularity", "test": _evaluate_loo(
        PopularityScores(split.train, split.n_items), split.test, (10, 20, 50, 100))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates-popularity.json").write_text(json.dumps(report, indent=2))
    return report


def run_ranking(dataset: Dataset, seed: int, out: Path, weighted: bool,
                settings: dict[str, Any]) -> dict[str, Any]:
    """One seed of the ranker on the CTR time split: test AUC / log-loss (JSON)."""
    from models.ctr_data import build_ctr_data
    from models.ctr_train import evaluate_ctr

    cfg = RankConfig(**{**settings, "seed": seed, "weighted": weighted})
    data = build_ctr_data(dataset, "time", seed=seed)
    data = with_context(data, dataset, cfg.history_stats) if cfg.context else data
    model, result = fit_ranker(data, dataset, cfg)
    report = {"model": RankingNet.name, "seed": seed, "weighted": weighted,
              "config": cfg.model_dump(), "data": data.describe(),
              "train": {k: v for k, v in result.to_json().items() if k != "history"},
              "valid": evaluate_ctr(model, data.valid), "test": evaluate_ctr(model, data.test)}
    out.mkdir(parents=True, exist_ok=True)
    tag = ("weighted" if weighted else "unweighted") + ("-stats" if cfg.history_stats else "")
    name = f"ranking-{tag}-seed{seed}.json"
    (out / name).write_text(json.dumps(report, indent=2))
    return report


def _load(folder: Path, pattern: str) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted(folder.glob(pattern))]


def _candidate_rows(folder: Path) -> list[str]:
    lines = ["| model | variant | seeds | recall@50 | recall@100 | ndcg@50 | ndcg@100 | "
             "recall@10 (= HR@10) | ndcg@10 | epochs (best) | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    pop = _load(folder, "candidates-popularity.json")
    for inputs in ("clicks", "profiles"):
        runs = _load(folder, f"candidates-{inputs}-seed*.json")
        for variant in ("recbole", "paper") if runs else ():
            cells = [mean_std([r["test"][variant][m] for r in runs]) for m in (
                "recall@50", "recall@100", "ndcg@50", "ndcg@100", "recall@10", "ndcg@10")]
            epochs = ",".join(f"{r['train']['epochs']}({r['train']['best_epoch']})" for r in runs)
            secs = ",".join(f"{r['train']['seconds']:.0f}" for r in runs)
            lines.append(f"| youtube-dnn ({inputs}) | {variant} | "
                         f"{','.join(str(r['seed']) for r in runs)} | " + " | ".join(cells)
                         + f" | {epochs} | {secs} |")
    lines += _zoo_rows(folder)
    for variant in ("recbole", "paper") if pop else ():
        t = pop[0]["test"][variant]
        lines.append(f"| popularity | {variant} | - | " + " | ".join(f"{t[m]:.4f}" for m in (
            "recall@50", "recall@100", "ndcg@50", "ndcg@100", "recall@10", "ndcg@10"))
            + " | - | - |")
    return lines


def _zoo_rows(folder: Path) -> list[str]:
    """Other zoo models evaluated by `lookalike evaluate MODEL --protocol loo-full` into
    ``<folder>/<model>-seed<S>/`` (e.g. SASRec, for recall@50/100 on the same split)."""
    lines = []
    for name in sorted({p.parent.name.rsplit("-seed", 1)[0]
                        for p in folder.glob("*-seed*/evaluate-loo-full.json")}):
        paths = sorted(folder.glob(f"{name}-seed*/evaluate-loo-full.json"))
        runs = [json.loads(p.read_text()) for p in paths]
        seeds = ",".join(p.parent.name.rsplit("-seed", 1)[1] for p in paths)
        for variant in ("recbole", "paper"):
            cells = [mean_std([r["variants"][variant]["metrics"][m] for r in runs]) for m in (
                "recall@50", "recall@100", "ndcg@50", "ndcg@100", "recall@10", "ndcg@10")]
            epochs = ",".join(f"{r['train']['epochs']}({r['train']['best_epoch']})"
                              for r in runs)
            secs = ",".join(f"{r['train']['seconds']:.0f}" for r in runs)
            lines.append(f"| {name} ({runs[0]['config'].get('loss', '')}) | {variant} | "
                         f"{seeds} | " + " | ".join(cells) + f" | {epochs} | {secs} |")
    return lines


def _ann_rows(folder: Path) -> list[str]:
    lines = ["| inputs | index | seeds | recall@50 | recall@100 | kept@50 | kept@100 | "
             "overlap@100 with exact | ms / query |", "| --- | --- | --- | --- | --- | --- | "
             "--- | --- | --- |"]
    for inputs in ("clicks", "profiles"):
        runs = _load(folder, f"candidates-{inputs}-seed*.json")
        for kind in ("exact", "hnsw", "ivf") if runs else ():
            rows = [r["ann"]["kinds"][kind] for r in runs]
            cells = [mean_std([x[m] for x in rows]) if m in rows[0] else "-" for m in (
                "recall@50", "recall@100", "kept@50", "kept@100", "overlap@100",
                "ms_per_query")]
            lines.append(f"| {inputs} | {kind} | {','.join(str(r['seed']) for r in runs)} | "
                         + " | ".join(cells) + " |")
    return lines


def _scale_rows(folder: Path) -> list[str]:
    runs = _load(folder, "ann-scale-*.json")
    lines = ["| catalogue | index | seeds | recall@50 | recall@100 | kept@50 | kept@100 | "
             "overlap@100 with exact | ms / query | build s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    def settings(r: dict[str, Any], kind: str) -> str:
        o = r["ann"]["options"].get(kind, {})
        return {"hnsw": f"hnsw (M {o.get('hnsw_m')}, efSearch {o.get('ef_search')})",
                "ivf": f"ivf (nlist {o.get('nlist')}, nprobe {o.get('nprobe')})"}.get(kind, kind)

    for size, key in sorted({(r["catalogue"], json.dumps(r["ann"]["options"], sort_keys=True))
                             for r in runs}):
        group = [r for r in runs if r["catalogue"] == size
                 and json.dumps(r["ann"]["options"], sort_keys=True) == key]
        for kind in ("exact", "hnsw", "ivf"):
            rows = [r["ann"]["kinds"][kind] for r in group]
            cells = [mean_std([x[m] for x in rows]) if m in rows[0] else "-" for m in (
                "recall@50", "recall@100", "kept@50", "kept@100", "overlap@100",
                "ms_per_query", "build_seconds")]
            lines.append(f"| {size:,} | {settings(group[0], kind)} | "
                         f"{','.join(str(r['seed']) for r in group)} | "
                         + " | ".join(cells) + " |")
    return lines if runs else []


def _ranking_rows(folder: Path) -> list[str]:
    lines = ["| ranker | seeds | test AUC | test log-loss | valid AUC | epochs (best) | "
             "train s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind in ("weighted", "unweighted", "weighted-stats", "unweighted-stats"):
        runs = _load(folder, f"ranking-{kind}-seed*.json")
        if runs:
            epochs = ",".join(f"{r['train']['epochs']}({r['train']['best_epoch']})" for r in runs)
            label = kind.replace("-stats", " + history stats")
            lines.append(f"| MLP, {label} logistic | {','.join(str(r['seed']) for r in runs)} | "
                         f"{mean_std([r['test']['auc'] for r in runs])} | "
                         f"{mean_std([r['test']['logloss'] for r in runs])} | "
                         f"{mean_std([r['valid']['auc'] for r in runs])} | {epochs} | "
                         + ",".join(f"{r['train']['seconds']:.0f}" for r in runs) + " |")
    return lines


def summarise(folder: Path) -> str:
    """The markdown tables of docs/youtube_dnn.md from the JSON files in `folder`."""
    return "\n".join([*_candidate_rows(folder), "", *_ann_rows(folder), "",
                      *_scale_rows(folder), "", *_ranking_rows(folder)])
