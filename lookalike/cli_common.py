"""What every ``lookalike`` command shares: option types, settings, logging, signals."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from engine.config import Settings, load_settings

if TYPE_CHECKING:
    from engine.data import Dataset

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
