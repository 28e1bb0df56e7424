"""The ``lookalike`` command: every worker, the demo, data, the broker and the benches;
training and evaluation are in ``lookalike/cli_models.py``, studies in
``lookalike/studies.py``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lookalike.cli_common import (
    BootstrapOpt,
    CacheOpt,
    ConfigOpt,
    PartitionsOpt,
    PrefixOpt,
    _logging,
    _settings,
    _stop_on_signals,
)
from lookalike.cli_models import evaluate_app, train_app
from lookalike.studies import study_app

if TYPE_CHECKING:
    pass

app = typer.Typer(
    help="Streaming real-time look-alike recommendations on Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Fetch and inspect datasets.", no_args_is_help=True)
topics_app = typer.Typer(help="Create the dataflow's topics.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(topics_app, name="topics")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(study_app, name="study")

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
    from consumers.topics_admin import create_topics as create
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
    from consumers.topics_admin import create_topics

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
def recommend(
    user: Annotated[int, typer.Argument(help="user id to recommend items to")],
    k: Annotated[int | None, typer.Option("-k", help="items (default scoring.top_k)")] = None,
    pipeline: Annotated[str | None, typer.Option(
        help="a scoring.pipelines name (default: the default pipeline)")] = None,
    explain: Annotated[bool, typer.Option(help="say which source proposed each item")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 10.0,
    bootstrap_servers: BootstrapOpt = None,
    topic_prefix: PrefixOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Ask the running scoring workers for a user's recommendations, as any client does
    (a record on `score-requests`, the answer on `recommendations`). Prints JSON; exit 3
    if no answer came in time."""
    import uuid

    import orjson

    from consumers.recommend import request_recommendations

    s = _settings(config, **{"kafka.bootstrap_servers": bootstrap_servers,
                             "kafka.topic_prefix": topic_prefix})
    req = {"user_id": user, "request_id": f"cli-{uuid.uuid4().hex[:12]}", "explain": explain}
    if k is not None:
        req["k"] = k
    if pipeline is not None:
        req["pipeline"] = pipeline
    got = request_recommendations(s, [req], timeout).get(req["request_id"])
    if got is None:
        typer.echo(f"error: no answer within {timeout} s (are the workers running on "
                   f"{s.kafka.bootstrap_servers}?)", err=True)
        raise typer.Exit(3)
    got.pop("received_at", None)
    typer.echo(orjson.dumps(got, option=orjson.OPT_INDENT_2).decode())


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


# ------------------------------------------------------------------- benchmarks
@app.command()
def bench(
    name: Annotated[str, typer.Argument(
        help="ingest, cluster, score, freshness, train, scale, all (these six), soak "
        "(ten minutes of steady load), recovery (1M clicks, workers killed 20 times, then "
        "failover) or failover (scoring workers killed under requests)")] = "all",
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
