"""Model checkpoints: atomic writes, safe loads, clear errors.

A checkpoint is one ``torch.save`` file holding a dict of plain Python values
and tensors::

    {"format": 1, "kind": "ralm", "version": "ralm-20240101T120000-1a2b3c4d",
     "config": {...}, "features": {...}, "<module>": state_dict, ...,
     "metrics": {...}, "created_at": 1.7e9}

Loading uses ``torch.load(weights_only=True)`` only: a checkpoint is data,
and a file that needs arbitrary unpickling (custom classes, code) is refused,
so a tampered checkpoint cannot run code in a worker.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
HEADER_KEYS = ("format", "kind", "version")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of another kind or incomplete."""


def weights_hash(*state_dicts: Mapping[str, torch.Tensor]) -> str:
    """8 hex digits of a SHA-256 over the tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for sd in state_dicts:
        for name in sorted(sd):
            t = sd[name].detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:8]


def make_version(
    kind: str, *state_dicts: Mapping[str, torch.Tensor], at: float | None = None
) -> str:
    """``<kind>-YYYYmmddTHHMMSS-<weights hash>``: sortable by time, tied to the weights."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if at is None else at))
    return f"{kind}-{stamp}-{weights_hash(*state_dicts)}"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder + rename).

    A reader never sees a half-written file, and a crash leaves the old one.
    """
    missing = [k for k in HEADER_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def portable(path: str | Path) -> str:
    """``path`` as a report records it: under the home folder as ``~/...``. Why: run
    reports are committed beside the docs, and the machine's own home (``/root``, a
    user name) says nothing to a reader; ``load_checkpoint`` expands it back."""
    path, home = Path(path).resolve(), Path.home().resolve()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def load_checkpoint(
    path: str | Path, *, kind: str | None = None, required: Iterable[str] = ()
) -> dict[str, Any]:
    """Read a checkpoint safely; raise :class:`CheckpointError` saying what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(
                f"{path}: refused, it holds objects a weights-only load does not allow: {e}"
            ) from e
        raise CheckpointError(f"{path}: not a checkpoint (UnpicklingError: {e})") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or not all(k in payload for k in HEADER_KEYS):
        raise CheckpointError(f"{path}: not a checkpoint (no {'/'.join(HEADER_KEYS)} header)")
    if payload["format"] != FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format']!r}, this code reads format {FORMAT}"
        )
    if kind is not None and payload["kind"] != kind:
        raise CheckpointError(f"{path}: a {payload['kind']!r} checkpoint, expected {kind!r}")
    missing = [k for k in required if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return payload
