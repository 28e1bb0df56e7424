"""``lookalike study``: the runs and tables behind the docs' model studies.

Why here and not as ``python -m`` mains in ``models/``: one CLI for every entry point,
and the models package stays a library (the app layer drives it).
"""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import orjson
import typer

study_app = typer.Typer(help="The runs and tables behind the docs' model studies.",
                        no_args_is_help=True)


class YoutubeTask(str, Enum):
    candidates = "candidates"
    ranking = "ranking"
    popularity = "popularity"
    ann_scale = "ann-scale"
    summary = "summary"


@study_app.command("youtube-dnn")
def youtube_dnn(
    task: Annotated[YoutubeTask, typer.Argument(help="which runs (docs/youtube_dnn.md)")],
    catalogue: Annotated[int, typer.Option(help="ann-scale: items")] = 100_000,
    ef_search: Annotated[int, typer.Option(help="ann-scale: HNSW efSearch")] = 128,
    nprobe: Annotated[int, typer.Option(help="ann-scale: IVF lists probed")] = 32,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="repeatable")] = None,
    out: Annotated[Path, typer.Option()] = Path("docs/youtube_dnn"),
    profiles: Annotated[bool, typer.Option(help="attach demographics")] = False,
    unweighted: Annotated[bool, typer.Option(help="ranking: plain BCE")] = False,
    max_seconds: Annotated[float, typer.Option()] = 240.0,
    metric: Annotated[str, typer.Option(help="candidates: early-stopping metric")] = "ndcg@100",
    sets: Annotated[list[str] | None, typer.Option("--set", help="KEY=JSON setting")] = None,
) -> None:
    """YouTube DNN's candidate, ranking, popularity and ANN runs (one torch thread)."""
    import torch

    from engine.config import Settings
    from engine.data import load_dataset
    from lookalike.experiments import youtube_dnn_study as yt

    if task is YoutubeTask.summary:
        typer.echo(yt.summarise(out))
        return
    torch.set_num_threads(1)
    settings = {k: json.loads(v) for k, _, v in (s.partition("=") for s in sets or [])}
    dataset = load_dataset("ml-100k", Settings().data_dir)
    if task is YoutubeTask.popularity:
        typer.echo(json.dumps(yt.run_popularity(dataset, out)["test"], indent=1))
        return
    for seed in seeds or [0, 1, 2, 3, 4]:
        trainer = {"max_seconds": max_seconds, "metric": metric}
        if task is YoutubeTask.ann_scale:
            options = {"hnsw": {**yt.SCALE_OPTIONS["hnsw"], "ef_search": ef_search},
                       "ivf": {**yt.SCALE_OPTIONS["ivf"], "nprobe": nprobe}}
            r = yt.run_ann_scale(dataset, seed, out, catalogue, settings, trainer, options)
            typer.echo(f"seed {seed}: {json.dumps(r['ann']['kinds'])}")
        elif task is YoutubeTask.candidates:
            r = yt.run_candidates(dataset, seed, out, profiles, settings, trainer)
            t = r["test"]["recbole"]
            typer.echo(f"seed {seed}: recall@50 {t['recall@50']:.4f} recall@100 "
                       f"{t['recall@100']:.4f} ndcg@100 {t['ndcg@100']:.4f}; epochs "
                       f"{r['train']['epochs']} ({r['train']['seconds']:.0f} s); ann "
                       f"{json.dumps(r['ann']['kinds'])}")
        else:
            r = yt.run_ranking(dataset, seed, out, not unweighted, settings)
            typer.echo(f"seed {seed}: test auc {r['test']['auc']:.4f} log-loss "
                       f"{r['test']['logloss']:.4f} epochs {r['train']['epochs']}")


@study_app.command("lfm-compare")
def lfm_compare(
    runs: Annotated[list[str] | None, typer.Option(
        "--run", help="MODEL[:KEY=VALUE,...], repeatable")] = None,
    report: Annotated[list[Path] | None, typer.Option(
        help="print the table of these run files (repeatable)")] = None,
    plot: Annotated[Path | None, typer.Option(help="with --report: NDCG@20 vs clusters PNG")]
    = None,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="repeatable")] = None,
    out: Annotated[Path | None, typer.Option(help="JSON lines file the runs append to")] = None,
    max_seconds: Annotated[float, typer.Option()] = 240.0,
    epochs: Annotated[int, typer.Option()] = 200,
    patience: Annotated[int, typer.Option()] = 10,
    lr: Annotated[float | None, typer.Option()] = None,
) -> None:
    """LFM against Mult-VAE under strong generalization (docs/lfm.md)."""
    from lookalike.experiments import lfm_compare as lc

    if report:
        rows = [orjson.loads(line) for path in report
                for line in path.read_bytes().split(b"\n") if line.strip()]
        typer.echo(lc.report(rows))
        if plot:
            typer.echo(f"wrote {lc.plot(rows, plot)}")
        return
    if not runs or out is None:
        raise typer.BadParameter("--run and --out are needed to train (or --report to "
                                 "summarise)")
    trainer = {"max_seconds": max_seconds, "epochs": epochs, "patience": patience,
               **({"lr": lr} if lr else {})}
    for seed in seeds or [0]:
        for spec in runs:
            name, settings = lc.parse_run(spec)
            t0 = time.perf_counter()
            row = lc.run_one(name, settings, seed, **trainer)
            row["wall_seconds"] = time.perf_counter() - t0
            with out.open("ab") as f:
                f.write(orjson.dumps(row) + b"\n")
            typer.echo(f"{spec} seed {seed}: ndcg@20 {row['test_ndcg@20']:.4f} recall@20 "
                       f"{row['test_recall@20']:.4f} params {row['params']:,} epochs "
                       f"{row['epochs']} ({row['stopped']}) {row['wall_seconds']:.0f} s")


@study_app.command("ctr-table")
def ctr_table(folder: Annotated[Path, typer.Argument()] = Path("docs/ctr/runs")) -> None:
    """The CTR results table of docs/ctr.md from its run folders."""
    from models.ctr_train import summarise

    typer.echo(summarise(folder))


@study_app.command("zoo-table")
def zoo_table(
    folder: Path,
    json_out: Annotated[Path | None, typer.Option("--json")] = None,
    recbole: Annotated[Path | None, typer.Option(help="RecBole peers file (its table rows)")]
    = None,
    sasrec: Annotated[bool, typer.Option(
        help="FOLDER holds SASRec runs (docs/models/run_sasrec.sh)")] = False,
) -> None:
    """The general-CF table of docs/models.md; every run's figures to --json."""
    from lookalike.experiments import zoo_results as zr

    if sasrec:
        typer.echo(zr.sasrec_table(folder))
        return
    found = zr.load_runs(folder)
    if not found:
        raise typer.BadParameter(f"no */seed*/evaluate-ro-full.json under {folder}")
    typer.echo(zr.table(found, zr.recbole_rows(recbole) if recbole else {}))
    if json_out:
        doc = {"dataset": "ml-100k", "protocol": "ro-full (recbole variant)", "threads": 1,
               "note": "per-seed test metrics @10 of docs/models/run.sh's runs "
                       "(lookalike study zoo-table)", "runs": found}
        json_out.write_text(json.dumps(doc, indent=1) + "\n")


@study_app.command("capacity")
def capacity(
    items: Annotated[int, typer.Option(help="catalogue size")] = 200_000,
    shards: Annotated[list[int] | None, typer.Option("--shards", help="repeatable")] = None,
    requests: Annotated[int, typer.Option(help="requests timed per shard count")] = 200,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path, typer.Option()] = Path("docs/capacity"),
) -> None:
    """The centroid table whole or sharded by item: memory and request cost per shard
    (docs/capacity.md)."""
    import torch

    from lookalike.experiments import capacity as cap

    torch.set_num_threads(1)
    t0 = time.time()
    result = cap.run(items, tuple(shards or [1, 2, 4, 8]), requests, seed=seed)
    result["seconds"] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2
                                                     | orjson.OPT_NON_STR_KEYS))
    typer.echo(json.dumps(result, indent=1))


@study_app.command("ctr-tune")
def ctr_tune(
    protocol: Annotated[str, typer.Option(help="ctx or time")],
    model: Annotated[str, typer.Option()] = "dlrm",
    weight_seeds: Annotated[list[int] | None, typer.Option("--weight-seed",
                                                           help="repeatable")] = None,
    lr: Annotated[float, typer.Option()] = 1e-3,
    weight_decay: Annotated[float, typer.Option()] = 0.0,
    lr_decay: Annotated[float, typer.Option()] = 1.0,
    optimiser: Annotated[str, typer.Option(help="adam or sgd")] = "adam",
    user_dropout: Annotated[float, typer.Option()] = 0.0,
    batch_size: Annotated[int, typer.Option()] = 2048,
    patience: Annotated[int, typer.Option()] = 5,
    sets: Annotated[list[str] | None, typer.Option("--set", help="model KEY=VALUE")] = None,
    log: Annotated[Path, typer.Option()] = Path("docs/ctr/tuning.jsonl"),
) -> None:
    """One CTR setting's validation AUC on seed 0's split, over weight seeds
    (docs/ctr.md, Tuning); appends to the log."""
    if protocol not in ("ctx", "time") or optimiser not in ("adam", "sgd"):
        raise typer.BadParameter("--protocol is ctx or time; --optimiser adam or sgd")
    from lookalike.experiments.ctr_tune import tune

    settings = dict(s.split("=", 1) for s in sets or [])
    trainer = {"lr": lr, "weight_decay": weight_decay, "lr_decay": lr_decay,
               "optimiser": optimiser, "user_dropout": user_dropout,
               "batch_size": batch_size, "patience": patience}
    tune(model, protocol, weight_seeds or [0, 1, 2, 3, 4], settings, trainer, log,
         say=typer.echo)


@study_app.command("zoo-tune")
def zoo_tune(
    model: Annotated[str, typer.Argument(help="a zoo model's name")],
    base: Annotated[str, typer.Argument(help="base settings, JSON")] = "{}",
    variants: Annotated[list[str] | None, typer.Argument(help="one JSON per variant")] = None,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="repeatable")] = None,
    log: Annotated[Path, typer.Option()] = Path("docs/models/tuning.jsonl"),
) -> None:
    """Validation-only tuning of a general-CF model over split seeds (docs/models.md);
    appends to the log."""
    from lookalike.experiments.zoo_tune import tune

    try:
        parsed = [json.loads(v) for v in variants or ["{}"]]
        base_opts = json.loads(base)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"settings must be JSON objects: {e}") from e
    tune(model, base_opts, parsed, seeds or [0, 1, 2, 3, 4], log, say=typer.echo)
