"""``lookalike train`` and ``lookalike evaluate``: RALM, the model zoo and the CTR models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lookalike.cli_common import CacheOpt, ConfigOpt, _dataset, _logging, _settings

if TYPE_CHECKING:
    from models.ralm import RalmConfig

train_app = typer.Typer(help="Train models offline.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Evaluate models offline.", no_args_is_help=True)


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
    from lookalike.experiments.lookalike_task import run_lookalike_task

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
    from lookalike.experiments.audience_expansion import MODELS, run
    from lookalike.experiments.lookalike_task import quick_config
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
    from lookalike.experiments.default_pipeline import choose
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
    from lookalike.experiments.cold_start import cold_start_curve, plot_curve
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
