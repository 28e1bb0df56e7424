"""What every bench writes: a JSON of every figure and a Markdown table."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from engine.config import Settings


@dataclass
class BenchOptions:
    """Shared knobs: where reports go, how big, which broker."""

    settings: Settings
    out_dir: Path
    quick: bool = False  # small sizes: a smoke run in seconds (tests, CI)
    bootstrap_servers: str | None = None  # None: start an embedded broker
    seed: int = 0


@dataclass
class Figure:
    """One measured quantity; ``target`` (if any) is checked on ``value``."""

    name: str
    value: float
    unit: str
    target: str = ""  # e.g. ">= 0.5" or "<= 2.0"; empty: reported only
    note: str = ""

    @property
    def ok(self) -> bool | None:
        if not self.target:
            return None
        op, bound = self.target.split()
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)


@dataclass
class BenchReport:
    """A bench's figures, settings and machine, written as ``<name>.json`` and ``<name>.md``."""

    name: str
    figures: list[Figure] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    machine: dict = field(default_factory=lambda: machine_info())
    started_at: float = field(default_factory=time.time)

    def add(self, name: str, value: float, unit: str, target: str = "", note: str = "") -> Figure:
        f = Figure(name, float(value), unit, target, note)
        self.figures.append(f)
        return f

    @property
    def ok(self) -> bool:
        """True when every figure with a target meets it."""
        return all(f.ok is not False for f in self.figures)

    def to_dict(self) -> dict:
        d = asdict(self)
        for f, row in zip(self.figures, d["figures"], strict=True):
            row["ok"] = f.ok
        d["ok"] = self.ok
        return d

    def markdown(self) -> str:
        m = self.machine
        lines = [f"## bench {self.name}", "",
                 f"{m['cores']} cores, {m['platform']}, Python {m['python']}", "",
                 "| figure | value | unit | target | ok | note |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for f in self.figures:
            ok = {True: "yes", False: "**no**", None: ""}[f.ok]
            cells = (f.name, _fmt(f.value), f.unit, f.target, ok, f.note)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        js, md = out_dir / f"{self.name}.json", out_dir / f"{self.name}.md"
        js.write_bytes(orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2,
                                    default=str))
        md.write_text(self.markdown())
        return js, md


def summary(reports: list[BenchReport]) -> str:
    """Every target of every report, one line each, PASS or FAIL first: what ``bench all``
    ends with, so a reader sees the verdicts without reading six tables."""
    lines = ["| bench | target | measured | verdict |", "| --- | --- | --- | --- |"]
    for r in reports:
        for f in r.figures:
            if f.ok is not None:
                lines.append(f"| {r.name} | {f.name} {f.target} | {_fmt(f.value)} {f.unit} | "
                             f"{'PASS' if f.ok else '**FAIL**'} |")
    n = sum(1 for r in reports for f in r.figures if f.ok is not None)
    passed = sum(1 for r in reports for f in r.figures if f.ok)
    return "\n".join([f"## targets: {passed} of {n} met", "", *lines]) + "\n"


def _fmt(v: float) -> str:
    if v == 0 or 0.01 <= abs(v) < 1e6:
        return f"{v:,.3f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def machine_info() -> dict:
    """Enough to compare runs: cores, CPU model, Python and library versions."""
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "numpy": numpy.__version__,
            "torch": torch.__version__}


@contextmanager
def compute_threads(n: int) -> Iterator[None]:
    """torch, Faiss and BLAS on ``n`` threads inside the block (the caller's after)."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)
        faiss.omp_set_num_threads(before)
