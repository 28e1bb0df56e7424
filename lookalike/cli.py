"""The ``lookalike`` command: every worker, the demo, data, training and the broker."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from engine.config import Settings, load_settings
from lookalike.studies import study_app

if TYPE_CHECKING:
    from engine.data import Dataset
    from models.ralm import RalmConfig

app = typer.Typer(
    help="Streaming real-time look-alike recommendations on Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Fetch and inspect datasets.", no_args_is_help=True)
topics_app = typer.Typer(help="Create the dataflow's topics.", no_args_is_help=True)
train_app = typer.Typer(help="Train models offline.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Evaluate models offline.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(topics_app, name="topics")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(study_app, name="study")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML settings file")]
BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap-servers", "-b", help="Kafka brokers (default 127.0.0.1:9092)"),
]
PrefixOpt = Annotated[str | None, typer.Option(help="prefix of every topic name")]
CacheOpt = Annotated[Path | None, typer.Option(help="data/checkpoint cache directory")]
PartitionsOpt = Annotated[int | None, typer.Option(help="partitions per topic")]


def _settings(config: Path | None = None, **overrides: object) -> Settings:
    try:
        return load_settings(config, **overrides)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e


def _dataset(name: str, s: Settings) -> Dataset:
    """The named dataset, or exit 1 with the loader's reason."""
    from engine.data import DataError, load_dataset

    try:
        return load_dataset(name, s.data_dir)
    except DataError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # kafka-python warns whenever our CPU work delays its IO thread: noise here
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _stop_on_signals() -> threading.Event:
    """Ctrl-C and SIGTERM end the command cleanly (flush, commit, close)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


# ------------------------------------------------------------------- data
@data_app.command("fetch")
def data_fetch(name: str = typer.Argument("ml-100k"), cache_dir: CacheOpt = None) -> None:
    """Download a dataset into the cache (MovieLens-100k from the recbole wheel)."""
    from engine.data import DataError, fetch_ml100k, load_dataset

    s = _settings(cache_dir=cache_dir)
    if name != "ml-100k":
        raise typer.BadParameter(f"only 'ml-100k' can be fetched, got {name!r}")
    try:
        folder = fetch_ml100k(s.data_dir)
        typer.echo(f"{folder}\n{load_dataset(name, s.data_dir).summary()}")
    except DataError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


@data_app.command("info")
def data_info(name_or_path: str = typer.Argument("ml-100k"), cache_dir: CacheOpt = None) -> None:
    """Summarise a dataset (a name or a folder of MovieLens/RecBole files)."""
    from engine.data import DataError, load_dataset

    s = _settings(cache_dir=cache_dir)
    try:
        typer.echo(load_dataset(name_or_path, s.data_dir).summary())
    except DataError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


# ------------------------------------------------------------------- broker & topics
@app.command()
def broker(
    port: Annotated[int, typer.Option(help="loopback port")] = 9092,
    partitions: PartitionsOpt = None,
    topic_prefix: PrefixOpt = None,
    create_topics: Annotated[bool, typer.Option(help="create the dataflow's topics")] = True,
    config: ConfigOpt = None,
) -> None:
    """Run the embedded Kafka-compatible broker (memory storage) until Ctrl-C/SIGTERM."""
    from engine.topics import create_topics as create
    from lookalike.broker import BrokerError, EmbeddedBroker, output_tail

    _logging()
    s = _settings(config, **{"kafka.partitions": partitions, "kafka.topic_prefix": topic_prefix})
    stop = _stop_on_signals()
    try:
        b = EmbeddedBroker(port=port).start()
    except BrokerError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    try:
        if create_topics:
            create(s.kafka.model_copy(update={"bootstrap_servers": b.bootstrap_servers}))
        typer.echo(f"broker ready on {b.bootstrap_servers} (pid {b.proc.pid}); Ctrl-C stops it")
        while not stop.wait(0.5):
            if b.proc.poll() is not None:
                typer.echo(f"error: broker exited with code {b.proc.returncode}"
                           f"{output_tail(b.log_file)}", err=True)
                raise typer.Exit(1)
    finally:
        b.stop()


@topics_app.command("create")
def topics_create(
    bootstrap_servers: BootstrapOpt = None,
    partitions: PartitionsOpt = None,
    topic_prefix: PrefixOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Create every topic of the dataflow (existing ones are kept)."""
    from engine.topics import create_topics

    _logging()
    s = _settings(config, **{"kafka.bootstrap_servers": bootstrap_servers,
                             "kafka.partitions": partitions, "kafka.topic_prefix": topic_prefix})
    created = create_topics(s.kafka)
    typer.echo(f"created {len(created)} topics: {', '.join(created) or '-'}")


# ------------------------------------------------------------------- workers
@app.command()
def worker(
    kind: Annotated[str, typer.Argument(help="scoring | clustering")],
    bootstrap_servers: BootstrapOpt = None,
    topic_prefix: PrefixOpt = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (0: any)")] = None,
    metrics_addr: Annotated[str | None, typer.Option(
        help="address /metrics binds to (default: metrics.addr, loopback)")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="RALM checkpoint (scoring)")] = None,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run one worker of a stage's consumer group until Ctrl-C/SIGTERM."""
    from consumers.runner import (
        KINDS,
        NoCheckpointError,
        build_stage,
        start_worker,
        tune_gc_for_a_worker,
    )

    if kind not in KINDS:
        raise typer.BadParameter(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    _logging()
    s = _settings(config, cache_dir=cache_dir, **{
        "kafka.bootstrap_servers": bootstrap_servers, "kafka.topic_prefix": topic_prefix,
        "metrics.port": metrics_port, "metrics.addr": metrics_addr,
    })
    stop = _stop_on_signals()
    try:
        stage = build_stage(kind, s, checkpoint)
    except NoCheckpointError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    tune_gc_for_a_worker()
    w = start_worker(stage, s.metrics.port, s.metrics.addr, stop)
    typer.echo(f"{kind} worker: metrics on http://{s.metrics.addr}:{w.metrics_port}/metrics",
               err=True)
    while not stop.wait(0.5) and w.thread.is_alive():
        pass
    w.stop()
    if w.loop.failure is not None:
        typer.echo(f"error: {kind} worker stopped: {w.loop.failure}", err=True)
        raise typer.Exit(3)


@app.command()
def replay(
    dataset: Annotated[str, typer.Argument(help="'ml-100k' or a MovieLens folder")] = "ml-100k",
    rate: Annotated[float | None, typer.Option(help="events per second")] = None,
    speedup: Annotated[float | None, typer.Option(help="dataset seconds per wall second")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N clicks")] = None,
    bootstrap_servers: BootstrapOpt = None,
    topic_prefix: PrefixOpt = None,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Produce a dataset's clicks to `clicks` in timestamp order, keyed by user."""
    from consumers.replay import replay as run_replay
    from engine.data import load_dataset

    if rate is not None and speedup is not None:
        raise typer.BadParameter("give --rate or --speedup, not both")
    _logging()
    s = _settings(config, cache_dir=cache_dir, **{
        "kafka.bootstrap_servers": bootstrap_servers, "kafka.topic_prefix": topic_prefix})
    ds = load_dataset(dataset, s.data_dir)
    rep = run_replay(ds, s.kafka, rate=rate, speedup=speedup, limit=limit)
    typer.echo(f"replayed {rep.events:,} clicks in {rep.seconds:.1f} s ({rep.rate:,.0f}/s)")


@app.command()
def audience(
    item: Annotated[int, typer.Argument(help="item id whose look-alike users you want")],
    k: Annotated[int | None, typer.Option("-k", help="users (default scoring.audience_k)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for every worker")] = 10.0,
    bootstrap_servers: BootstrapOpt = None,
    topic_prefix: PrefixOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Ask the running scoring workers for an item's audience: the top-K users most like
    its seeds, its seeds excluded. Prints JSON; exit 3 if some worker did not answer."""
    import orjson

    from consumers.audience import request_audience

    s = _settings(config, **{"kafka.bootstrap_servers": bootstrap_servers,
                             "kafka.topic_prefix": topic_prefix})
    try:
        users, complete, partials = request_audience(s, item, k, timeout)
    except RuntimeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    reasons = sorted({p["reason"] for p in partials if p.get("reason")})
    typer.echo(orjson.dumps({"item_id": item, "users": users, "complete": complete,
                             "workers_answered": len(partials), "reasons": reasons},
                            option=orjson.OPT_INDENT_2).decode())
    if not complete:
        typer.echo(f"warning: not every clicks partition answered within {timeout} s", err=True)
        raise typer.Exit(3)


@app.command()
def announce(
    checkpoint: Annotated[Path, typer.Argument(help="RALM checkpoint every scoring worker "
                                               "should load (a path they can read)")],
    version: Annotated[str | None, typer.Option(help="label (default: the model's)")] = None,
    bootstrap_servers: BootstrapOpt = None,
    topic_prefix: PrefixOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Hot-reload a model: announce it on the `models` topic. The file is checked here
    first; each worker loads and validates it again, and keeps its old model if that fails."""
    from consumers.model_reload import announce as send_announcement
    from models.checkpoint import CheckpointError

    s = _settings(config, **{"kafka.bootstrap_servers": bootstrap_servers,
                             "kafka.topic_prefix": topic_prefix})
    try:
        ann = send_announcement(s, checkpoint, version)
    except CheckpointError as e:
        typer.echo(f"error: not announced: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"announced {ann.version} ({ann.path})")


# ------------------------------------------------------------------- training
@train_app.command("ralm")
def train_ralm_cmd(
    dataset: Annotated[str, typer.Option(help="'ml-100k' or a MovieLens folder")] = "ml-100k",
    split: Annotated[float, typer.Option(help="train on clicks before this time quantile")] = 0.8,
    epochs: Annotated[int | None, typer.Option(help="user-tower epochs")] = None,
    lookalike_epochs: Annotated[int | None, typer.Option(help="look-alike epochs")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train RALM (user tower, then look-alike tower) and save a versioned checkpoint."""
    from engine.data import load_dataset
    from models.ralm import RalmConfig
    from models.train_ralm import train_ralm

    _logging()
    s = _settings(config, cache_dir=cache_dir)
    ds = load_dataset(dataset, s.data_dir)
    train, _ = ds.time_split(split)
    updates = {"user_epochs": epochs, "lookalike_epochs": lookalike_epochs, "seed": seed}
    cfg = RalmConfig().model_copy(update={k: v for k, v in updates.items() if v is not None})
    path = train_ralm(train, cfg, s.checkpoint_dir)
    typer.echo(str(path))


# ------------------------------------------------------------------- evaluation
@evaluate_app.command("lookalike-task")
def evaluate_lookalike_task_cmd(
    seeds: Annotated[int, typer.Option(help="training seeds (0..N-1); quick uses 2")] = 5,
    quick: Annotated[bool, typer.Option(help="small epochs and 2 seeds (minutes)")] = False,
    out: Annotated[Path | None, typer.Option(
        help="output folder (default <cache_dir>/reports/lookalike-task)")] = None,
    dataset: Annotated[str, typer.Option(help="'ml-100k' or a MovieLens folder")] = "ml-100k",
    jobs: Annotated[int, typer.Option(help="seeds trained in parallel processes")] = 1,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
) -> None:
    """RALM vs its baselines and ablations on the look-alike task: table, JSON, plots."""
    from models.lookalike_task import run_lookalike_task

    if seeds < 1:
        raise typer.BadParameter("--seeds must be at least 1")
    s = _settings(config, cache_dir=cache_dir)
    out_dir = out or s.cache_dir / "reports" / "lookalike-task"
    ds = _dataset(dataset, s)
    run_lookalike_task(ds, seeds=tuple(range(seeds)), quick=quick, out_dir=out_dir, jobs=jobs)
    typer.echo((out_dir / "lookalike-task.md").read_text())
    typer.echo(f"wrote {out_dir}/lookalike-task.json, lookalike-task.md, prec-vs-k.png, "
               "audience-by-seeds.png")


@evaluate_app.command("audience")
def evaluate_audience_cmd(
    models: Annotated[str, typer.Option(
        help="comma-separated: random, activity, seed_mean, item_knn, item_lr, ralm, "
        "ralm_average, tower_seed_mean")] = "random,activity,seed_mean,item_knn,item_lr,"
    "ralm,ralm_average,tower_seed_mean",
    folds: Annotated[int, typer.Option(help="item folds")] = 5,
    fold_seed: Annotated[int, typer.Option(help="seed of the items' split into folds")] = 0,
    train_seeds: Annotated[int, typer.Option(help="RALM trainings per fold (seeds 0..N-1)")] = 1,
    quick: Annotated[bool, typer.Option(help="small RALM epochs and sizes (minutes)")] = False,
    inner: Annotated[bool, typer.Option(
        help="tuning: score an inner fold of each fold's training items, never its test "
        "items")] = False,
    ralm: Annotated[list[str] | None, typer.Option(
        "--set", help="RalmConfig field=value for the trained models (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="output folder (default <cache_dir>/reports/audience)")] = None,
    dataset: Annotated[str, typer.Option(help="'ml-100k' or a MovieLens folder")] = "ml-100k",
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Cold-item audience expansion: N seeds of a held-out item -> rank every other user."""
    from models.audience_expansion import MODELS, run
    from models.lookalike_task import quick_config
    from models.ralm import RalmConfig

    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        raise typer.BadParameter(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    if folds < 2 or train_seeds < 1:
        raise typer.BadParameter("--folds must be at least 2 and --train-seeds at least 1")
    s = _settings(config, cache_dir=cache_dir)
    out_dir = out or s.cache_dir / "reports" / "audience"
    ds = _dataset(dataset, s)
    cfg = _ralm_config(quick_config() if quick else RalmConfig(), ralm)
    run(ds, names, cfg, out_dir, n_folds=folds, fold_seed=fold_seed,
        train_seeds=tuple(range(train_seeds)), inner=inner)
    typer.echo((out_dir / "audience.md").read_text())
    typer.echo(f"wrote {out_dir}/audience.json, audience.md, audience-prec10.png")


@evaluate_app.command("default-pipeline")
def evaluate_default_pipeline_cmd(
    ralm: Annotated[list[str] | None, typer.Option(
        "--set", help="RalmConfig field=value (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="output folder (default <cache_dir>/reports/default-pipeline)")] = None,
    dataset: Annotated[str, typer.Option(help="'ml-100k' or a MovieLens folder")] = "ml-100k",
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
) -> None:
    """RALM alone or blended with popularity: which serves requests naming no pipeline
    (time-split user view; the weight chosen on a validation split)."""
    from lookalike.default_pipeline import choose
    from models.ralm import RalmConfig

    s = _settings(config, cache_dir=cache_dir)
    cfg = _ralm_config(RalmConfig(), ralm)
    out_dir = out or s.cache_dir / "reports" / "default-pipeline"
    choose(_dataset(dataset, s), cfg, out_dir)
    typer.echo(f"wrote {out_dir}/default-pipeline.json")


@evaluate_app.command("cold-start")
def evaluate_cold_start_cmd(
    checkpoint: Annotated[Path | None, typer.Option(help="RALM checkpoint (default: latest)")] = (
        None
    ),
    split: Annotated[float, typer.Option(help="items start cold at this time quantile")] = 0.8,
    k: Annotated[int, typer.Option(help="prec@K of each audience")] = 10,
    out: Annotated[Path | None, typer.Option(
        help="output folder (default <cache_dir>/reports/cold-start)")] = None,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Audience prec@K as an item's seeds arrive, replayed through the workers' state."""
    import orjson

    from consumers.runner import NoCheckpointError, resolve_checkpoint
    from engine.data import load_dataset
    from models.cold_start import cold_start_curve, plot_curve
    from models.ralm import RalmModel

    s = _settings(config, cache_dir=cache_dir)
    try:
        model = RalmModel.load(resolve_checkpoint(s, checkpoint))
    except NoCheckpointError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    curve = cold_start_curve(model, load_dataset("ml-100k", s.data_dir), split=split, k=k,
                             window=s.window.model_copy(update={"k": model.k}))
    out_dir = out or s.cache_dir / "reports" / "cold-start"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = curve.table()
    (out_dir / "cold-start.json").write_bytes(orjson.dumps(
        {"model": model.version, "split": split, "k": k, "rows": rows}, option=orjson.OPT_INDENT_2))
    plot_curve(curve, out_dir / "cold-start.png")
    typer.echo("| seeds | items | RALM | seed mean | most active users |\n|---|---|---|---|---|")
    for r in rows:
        typer.echo(f"| {r['seeds']} | {r['items']} | {r['ralm']:.3f} | {r['seed_mean']:.3f} | "
                   f"{r['active_users']:.3f} |")
    typer.echo(f"wrote {out_dir}/cold-start.json, cold-start.png")


# ------------------------------------------------------------------- model zoo
# Names of models/recommender.py's registry, listed here so that `lookalike --help` does
# not import torch; tests/test_model_conformance.py checks the two lists agree.
ZOO_MODELS = ("autorec", "cdae", "lightgcn", "multdae", "multvae", "ncf-gmf", "ncf-mlp", "neumf",
              "ngcf", "sasrec", "lfm", "youtube-dnn")
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="model setting KEY=VALUE (repeatable), e.g. --set loss=ce")]


def _zoo_train(name: str, dataset: str, max_seconds: float | None, epochs: int | None,
               patience: int | None, lr: float | None, seed: int, threads: int,
               metric: str | None, settings: list[str] | None, out: Path | None,
               cache_dir: Path | None, config: Path | None) -> None:
    """Fit a registered model on its family's split; write checkpoint, JSON and PNG."""
    import orjson

    from engine.data import load_dataset
    from models.checkpoint import portable
    from models.recommender import get_model
    from models.splits import make_split
    from models.trainer import plot_learning_curve

    s = _settings(config, cache_dir=cache_dir)
    cls = get_model(name)
    try:
        model = cls(**_key_values(settings))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    split = make_split(load_dataset(dataset, s.data_dir), cls.split, seed=seed)
    typer.echo(split.summary())
    options = {"epochs": epochs, "patience": patience, "lr": lr, "metric": metric,
               "max_seconds": max_seconds}
    result = model.fit(split, seed=seed, threads=threads,
                       **{k: v for k, v in options.items() if v is not None})
    report = {"model": name, "dataset": dataset, "split": split.summary(), "seed": seed,
              "threads": threads, "config": model.config.model_dump(),
              "trainer": {k: v for k, v in options.items() if v is not None},
              "train": result.to_json()}
    ckpt = model.save(s.checkpoint_dir / name / f"pending-{os.getpid()}.pt", metrics=report)
    final = ckpt.rename(ckpt.with_name(f"{model.version_}.pt"))
    report["checkpoint"] = portable(final)
    out_dir = out or s.cache_dir / "reports" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    plot_learning_curve(result, out_dir / "learning-curve.png")
    typer.echo(f"{name}: {result.epochs} epochs ({result.stopped}), best epoch "
               f"{result.best_epoch} valid {result.metric} {result.best_value:.4f}, "
               f"{result.seconds_per_epoch:.2f} s/epoch, {result.seconds:.0f} s")
    typer.echo(f"wrote {final}, {out_dir}/train.json, learning-curve.png")


def _ralm_config(base: RalmConfig, sets: list[str] | None) -> RalmConfig:
    """``base`` with the ``--set field=value`` pairs, or a usage error saying which is bad."""
    pairs = _key_values(sets)
    unknown = sorted(set(pairs) - set(type(base).model_fields))
    if unknown:
        raise typer.BadParameter(f"--set: unknown RalmConfig field(s) {', '.join(unknown)}")
    try:
        return type(base).model_validate(base.model_dump() | pairs)
    except ValueError as e:
        raise typer.BadParameter(f"--set: {e}") from e


def _key_values(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set wants KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _zoo_evaluate(name: str, protocol: str, checkpoint: Path | None, dataset: str,
                  ks: list[int], seed: int, out: Path | None, cache_dir: Path | None,
                  config: Path | None) -> None:
    """Evaluate a checkpoint on its split's test set: both variants, JSON (+ per-user NPZ)."""
    import numpy as np
    import orjson

    from engine.data import load_dataset
    from models.checkpoint import portable
    from models.evaluator import evaluate_protocol, protocols_for
    from models.recommender import get_model
    from models.splits import make_split
    from models.trainer import plot_learning_curve, result_from_json

    s = _settings(config, cache_dir=cache_dir)
    cls = get_model(name)
    allowed = protocols_for(cls.split)
    protocols = allowed if protocol == "all" else [protocol]
    if any(p not in allowed for p in protocols):
        raise typer.BadParameter(f"--protocol must be one of {', '.join(allowed)} or all "
                                 f"for {name} (split {cls.split!r})")
    found = sorted((s.checkpoint_dir / name).glob(f"{name}-*.pt"))  # versions sort by time
    path = checkpoint or (found[-1] if found else None)
    if path is None:
        typer.echo(f"error: no {name} checkpoint in {s.checkpoint_dir / name}: run "
                   f"`lookalike train {name}` or pass --checkpoint", err=True)
        raise typer.Exit(1)
    model = cls.load(path)
    trained = _checkpoint_metrics(path)
    split = make_split(load_dataset(dataset, s.data_dir), cls.split,
                       seed=int(trained.get("seed", 0)))
    out_dir = out or s.cache_dir / "reports" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    own = _own_task_metrics(model, split.test)  # e.g. AutoRec's test RMSE
    for line in (f"{name} test {m} {v:.4f}" for m, v in own.items()):
        typer.echo(line)
    for p in protocols:
        results = evaluate_protocol(model, split.test, p, ks=ks, seed=seed)
        report = {"model": name, "checkpoint": portable(path), "version": model.version_,
                  "protocol": p, "dataset": dataset, "split": split.summary(),
                  "sampling_seed": seed, "train": trained.get("train", {}),
                  "config": model.config.model_dump(), "own_task": own,
                  "variants": {v: r.to_json() for v, r in results.items()}}
        (out_dir / f"evaluate-{p}.json").write_bytes(
            orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        np.savez_compressed(out_dir / f"evaluate-{p}-per-user.npz", users=split.test.users,
                            **{f"{v}/{m}": a for v, r in results.items()
                               for m, a in r.per_user.items()})
        for v, r in results.items():
            means = r.mean()
            cut = f"@{10 if 10 in ks else max(ks)}"
            shown = ", ".join(f"{m} {means[m]:.4f}" for m in means if m.endswith(cut))
            typer.echo(f"{name} {p} ({v}: {r.protocol.name}): {shown}")
    if trained.get("train"):
        plot_learning_curve(result_from_json(trained["train"]), out_dir / "learning-curve.png")
    typer.echo(f"wrote {out_dir}/evaluate-*.json, per-user .npz, learning-curve.png")


def _own_task_metrics(model, data) -> dict[str, float]:  # noqa: ANN001 - zoo model, EvalSet
    """The model's own task on the test set (``Recommender.extra_metrics``), with the
    trainer's "higher is better" signs undone: AutoRec's ``neg_rmse`` is reported as ``rmse``."""
    out = {}
    for m, v in model.extra_metrics(data).items():
        out[m.removeprefix("neg_")] = -v if m.startswith("neg_") else v
    return out


def _checkpoint_metrics(path: Path) -> dict:
    from models.checkpoint import load_checkpoint

    return load_checkpoint(path).get("metrics", {})


def _add_zoo_commands(name: str) -> None:
    @train_app.command(name)
    def train_zoo_cmd(
        dataset: Annotated[str, typer.Option(help="'ml-100k' or a MovieLens folder")] = (
            "ml-100k"),
        max_seconds: Annotated[float | None, typer.Option(
            help="wall-clock budget of training, e.g. 600")] = None,
        epochs: Annotated[int | None, typer.Option(help="at most this many epochs")] = None,
        patience: Annotated[int | None, typer.Option(
            help="stop after this many epochs without validation gain")] = None,
        lr: Annotated[float | None, typer.Option(help="Adam learning rate")] = None,
        metric: Annotated[str | None, typer.Option(
            help="validation metric for early stopping (default ndcg@10)")] = None,
        seed: Annotated[int, typer.Option()] = 0,
        threads: Annotated[int, typer.Option(help="torch threads")] = 1,
        set_: SetOpt = None,
        out: Annotated[Path | None, typer.Option(
            help="report folder (default <cache_dir>/reports/<model>)")] = None,
        cache_dir: CacheOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        _zoo_train(name, dataset, max_seconds, epochs, patience, lr, seed, threads, metric,
                   set_, out, cache_dir, config)

    @evaluate_app.command(name)
    def evaluate_zoo_cmd(
        protocol: Annotated[str, typer.Option(
            help="loo-full, loo-uni100 (RecBole's variant and the paper's), ro-full, "
            "or all of the model's split")] = (
            "all"),
        checkpoint: Annotated[Path | None, typer.Option(help="default: the newest")] = None,
        dataset: Annotated[str, typer.Option(help="'ml-100k' or a MovieLens folder")] = (
            "ml-100k"),
        k: Annotated[list[int] | None, typer.Option(
            "--k", "-k", help="cut-offs (repeatable; default 5, 10, 20)")] = None,
        seed: Annotated[int, typer.Option(help="seed of the sampled negatives")] = 0,
        out: Annotated[Path | None, typer.Option(
            help="report folder (default <cache_dir>/reports/<model>)")] = None,
        cache_dir: CacheOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        _zoo_evaluate(name, protocol, checkpoint, dataset, k or [5, 10, 20], seed, out,
                      cache_dir, config)

    train_zoo_cmd.__doc__ = (f"Train {name} (model zoo) on its split with early stopping; "
                             "write a checkpoint, train.json and learning-curve.png.")
    evaluate_zoo_cmd.__doc__ = (f"Evaluate the newest {name} checkpoint on the test users; "
                                "write evaluate-<protocol>.json with 95% CIs.")


for _name in ZOO_MODELS:
    _add_zoo_commands(_name)


# ------------------------------------------------------------------- CTR models
# Point-wise CTR models (models/ctr_train.py) read labelled feature rows, not histories,
# so they are not `Recommender`s: their own train/evaluate commands, beside the zoo's.
CTR_MODELS = ("dlrm", "fm", "lr")


def _add_ctr_commands(name: str) -> None:
    @train_app.command(name)
    def train_ctr_cmd(
        protocol: Annotated[str, typer.Option(
            help="time (80/10/10 by timestamp) or ctx (RecBole's random 8:1:1)")] = "time",
        hash_buckets: Annotated[int | None, typer.Option(
            help="hash every sparse value into this many rows per table")] = None,
        dataset: Annotated[str, typer.Option(help="'ml-100k' or a MovieLens folder")] = (
            "ml-100k"),
        epochs: Annotated[int | None, typer.Option(help="at most this many epochs")] = None,
        patience: Annotated[int | None, typer.Option(
            help="stop after this many epochs without validation AUC gain")] = None,
        lr: Annotated[float | None, typer.Option(help="Adam learning rate")] = None,
        weight_decay: Annotated[float | None, typer.Option(help="Adam weight decay")] = None,
        lr_decay: Annotated[float | None, typer.Option(
            help="learning rate x this after every epoch (1: constant)")] = None,
        batch_size: Annotated[int | None, typer.Option()] = None,
        user_dropout: Annotated[float | None, typer.Option(
            help="share of training rows seen as a new user (id and count unknown)")] = None,
        max_seconds: Annotated[float | None, typer.Option(help="wall-clock budget")] = None,
        seed: Annotated[int, typer.Option(help="seed of the weights, batches and ctx split")] = 0,
        threads: Annotated[int, typer.Option(help="torch threads")] = 1,
        set_: SetOpt = None,
        out: Annotated[Path | None, typer.Option(
            help="report folder (default <cache_dir>/reports/<model>)")] = None,
        cache_dir: CacheOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        from engine.data import load_dataset
        from models.ctr_train import train_run

        s = _settings(config, cache_dir=cache_dir)
        options = {"epochs": epochs, "patience": patience, "lr": lr, "batch_size": batch_size,
                   "weight_decay": weight_decay, "user_dropout": user_dropout, "lr_decay": lr_decay,
                   "max_seconds": max_seconds}
        trainer = {"threads": threads, **{k: v for k, v in options.items() if v is not None}}
        try:
            report, path = train_run(
                name, load_dataset(dataset, s.data_dir), protocol=protocol, seed=seed,
                hash_buckets=hash_buckets, settings=_key_values(set_), trainer=trainer,
                checkpoint_dir=s.checkpoint_dir / name,
                out_dir=out or s.cache_dir / "reports" / name)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        t = report["train"]
        typer.echo(f"{report['split']}\n{name}: {t['epochs']} epochs ({t['stopped']}), best "
                   f"epoch {t['best_epoch']} valid auc {report['valid']['auc']:.4f} log-loss "
                   f"{report['valid']['logloss']:.4f}, {t['seconds_per_epoch']:.2f} s/epoch")
        typer.echo(f"wrote {path}, train.json, learning-curve.png")

    @evaluate_app.command(name)
    def evaluate_ctr_cmd(
        checkpoint: Annotated[Path | None, typer.Option(help="default: the newest")] = None,
        dataset: Annotated[str, typer.Option(help="'ml-100k' or a MovieLens folder")] = (
            "ml-100k"),
        out: Annotated[Path | None, typer.Option(
            help="report folder (default <cache_dir>/reports/<model>)")] = None,
        cache_dir: CacheOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        from engine.data import load_dataset
        from models.ctr_train import evaluate_run

        s = _settings(config, cache_dir=cache_dir)
        found = sorted((s.checkpoint_dir / name).glob(f"{name}-*.pt"),
                       key=lambda p: p.stat().st_mtime)
        path = checkpoint or (found[-1] if found else None)
        if path is None:
            typer.echo(f"error: no {name} checkpoint in {s.checkpoint_dir / name}: run "
                       f"`lookalike train {name}` or pass --checkpoint", err=True)
            raise typer.Exit(1)
        r = evaluate_run(path, load_dataset(dataset, s.data_dir),
                         out or s.cache_dir / "reports" / name)
        base = ", ".join(f"{k} auc {v['auc']:.4f}" for k, v in r["baselines"].items())
        typer.echo(f"{name} {r['data']['protocol']}: test auc {r['test']['auc']:.4f} log-loss "
                   f"{r['test']['logloss']:.4f}" + (f" ({base})" if base else ""))

    train_ctr_cmd.__doc__ = (f"Train {name} (CTR: label = rating >= 4) with early stopping on "
                             "validation AUC; write a checkpoint, train.json, learning-curve.png.")
    evaluate_ctr_cmd.__doc__ = (f"Test AUC and log-loss of the newest {name} checkpoint; "
                                "write evaluate-<protocol>.json.")


for _name in CTR_MODELS:
    _add_ctr_commands(_name)


# ------------------------------------------------------------------- benchmarks
@app.command()
def bench(
    name: Annotated[str, typer.Argument(
        help="ingest, cluster, score, freshness, train, scale, all (these six), soak "
        "(ten minutes of steady load) or recovery (1M clicks, workers killed 20 times)")] = "all",
    quick: Annotated[bool, typer.Option(help="small sizes: a smoke run")] = False,
    out: Annotated[Path | None, typer.Option(
        help="output folder (default <cache_dir>/reports/bench)")] = None,
    bootstrap_servers: BootstrapOpt = None,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Measure a stage against a baseline run beside it; write <name>.json and <name>.md."""
    from lookalike.bench import NAMES, BenchOptions, runner
    from lookalike.bench.report import summary

    _logging()
    s = _settings(config, cache_dir=cache_dir)
    names = NAMES if name == "all" else (name,)
    try:
        runs = [(n, runner(n)) for n in names]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    opts = BenchOptions(settings=s, out_dir=out or s.cache_dir / "reports" / "bench",
                        quick=quick, bootstrap_servers=bootstrap_servers)
    failed, reports = [], []
    for n, run_bench in runs:
        report = run_bench(opts)
        js, _ = report.write(opts.out_dir)
        typer.echo(report.markdown())
        typer.echo(f"wrote {js} and {js.with_suffix('.md')}")
        reports.append(report)
        if not report.ok:
            failed.append(n)
    if len(reports) > 1:
        verdicts = summary(reports)
        (opts.out_dir / "summary.md").write_text(verdicts)
        typer.echo(verdicts)
    if failed:
        typer.echo(f"targets missed: {', '.join(failed)}", err=True)
        raise typer.Exit(2)


# ------------------------------------------------------------------- the demo
@app.command()
def run(
    rate: Annotated[float | None, typer.Option(help="replay rate, events/s (default: max)")] = None,
    limit: Annotated[int | None, typer.Option(help="replay only the first N clicks")] = None,
    partitions: PartitionsOpt = None,
    scoring_workers: Annotated[int, typer.Option(help="scoring processes")] = 1,
    clustering_workers: Annotated[int, typer.Option(help="clustering processes")] = 1,
    users: Annotated[int, typer.Option(help="users to show recommendations for")] = 4,
    retrain: Annotated[bool, typer.Option(help="train a new checkpoint even if one exists")] = (
        False
    ),
    bootstrap_servers: BootstrapOpt = None,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The whole pipeline in one command: data, training, broker, every stage, live recs."""
    from lookalike.pipeline import DemoOptions, run_demo

    _logging()
    s = _settings(config, cache_dir=cache_dir, **{"kafka.partitions": partitions})
    opts = DemoOptions(rate=rate, limit=limit, scoring_workers=scoring_workers,
                       clustering_workers=clustering_workers, show_users=users, retrain=retrain,
                       bootstrap_servers=bootstrap_servers)
    sys.exit(run_demo(s, opts))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
