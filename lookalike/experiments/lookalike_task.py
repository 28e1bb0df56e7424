"""RALM on the look-alike task against its baselines and ablations, over several seeds.

One command (``lookalike evaluate lookalike-task``) trains, per seed:

- RALM (attention merge, the paper's settings from :class:`RalmConfig`);
- RALM with a concatenating user tower (``merge="concat"``); its user tower,
  scored by dot product with its sampled-softmax item table, is also the
  YouTube-DNN-style baseline (one training serves both);
- logistic regression on user features × item id, its L2 strength chosen on a
  validation split carved from the training period;

and scores every model on the same time split (:class:`Protocol`). The
inference-time variants of the trained RALM are: RALM with average (seed
mean instead of attention), local only (α=0, β=1), global only (α=1, β=0),
and k ∈ ``K_VALUES`` (seeds re-clustered with that k; the tower was trained
with the config's k). Popularity needs no training.

Outputs in ``out_dir``: ``lookalike-task.json`` (every figure, per seed, with
the settings), ``lookalike-task.md`` (mean ± std over seeds, the paper's
WeChat numbers beside them), ``prec-vs-k.png`` and ``audience-by-seeds.png``
(per-item audience prec@10 by the item's seed count: the offline view of
cold start). Test numbers are reported, never tuned on.

Why one module of this size: the task, the ablations and the multi-seed report are
one experiment, read top to bottom.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from models.baselines import (
    popularity_scores,
    ralm_clusters,
    ralm_parts,
    seed_mean_scores,
    tune_item_lr,
    youtube_scores,
)
from models.evaluate_lookalike import Protocol, audience_per_item, embed_everyone, protocol_metrics
from models.ralm import RalmConfig
from models.train_ralm import fit_ralm

if TYPE_CHECKING:
    from engine.data import Dataset

K_VALUES = (5, 10, 20, 50, 100)
K_LIST = (10, 50)
#: lower bounds of the seed-count buckets of the audience curve
SEED_BUCKETS = (1, 2, 5, 10, 20, 50)
LR_GRID = (1e-3, 1e-2, 1e-1)
SPLIT = 0.8

#: the paper's offline table on WeChat data (AUC, prec@10, prec@50), Liu et al. 2019, Table 2
PAPER = {
    "LR": (0.5252, 0.0811, 0.0729),
    "Yahoo look-alike": (0.5512, 0.1023, 0.0941),
    "YouTube DNN": (0.5903, 0.1217, 0.1087),
    "RALM with average": (0.5842, 0.1108, 0.0980),
    "RALM": (0.6012, 0.1295, 0.1099),
}

MAIN_ROWS = {
    "popularity": "popularity (seed count; audience: most active users)",
    "lr": "LR (user features × item id)",
    "youtube_dnn": "YouTube-DNN-style tower (concat merge, dot product)",
    "ralm_average": "RALM with average (inference-time)",
    "ralm": "RALM (attention merge, local+global)",
}
#: rows of the audience-by-seeds curve
CURVE_ROWS = tuple(MAIN_ROWS)
METRICS = ("auc", "user_auc", "prec@10", "prec@50", "prec@10_returning", "prec@10_new",
           "audience_auc", "audience_prec@10")


def ablation_rows(k_values: Sequence[int], cfg: RalmConfig) -> dict[str, str]:
    rows = {f"ralm_k{k}": f"RALM, seeds re-clustered with k={k}" for k in k_values}
    rows["ralm_local"] = "RALM local only (α=0, β=1)"
    rows["ralm_global"] = "RALM global only (α=1, β=0)"
    rows["ralm_both"] = f"RALM both (α={cfg.alpha:g}, β={cfg.beta:g})"
    rows["ralm_concat"] = "RALM with concat-merge user tower (retrained)"
    rows["ralm_leave_out"] = "RALM, stage 2 on every click, its clicker not a seed (retrained)"
    return rows


def quick_config(**overrides: object) -> RalmConfig:
    """Small epochs and sizes: the whole quick task runs in a couple of minutes on ml-100k."""
    base: dict[str, object] = dict(embed_dim=64, attention_dim=32, dim=64, user_epochs=2,
                                   lookalike_epochs=1, episode_steps=150)
    return RalmConfig(**(base | overrides))


# ---------------------------------------------------------------- one seed


def _bucket_of(n_seeds: np.ndarray) -> np.ndarray:
    """Index into SEED_BUCKETS of each seed count (counts ≥ 1)."""
    return np.searchsorted(SEED_BUCKETS, n_seeds, side="right") - 1


def bucket_labels() -> list[str]:
    out = []
    for lo, hi in zip(SEED_BUCKETS, (*SEED_BUCKETS[1:], None), strict=True):
        out.append(f"{lo}+" if hi is None else (str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"))
    return out


def audience_by_seeds(proto: Protocol, scores: np.ndarray, k: int = 10) -> dict[str, dict]:
    """Per seed-count bucket: mean audience prec@k over the bucket's items, and their number."""
    cols, precs = audience_per_item(scores, proto.seen, proto.clicked, k)
    buckets = _bucket_of(proto.n_seeds[cols])
    out = {}
    for b, label in enumerate(bucket_labels()):
        sel = buckets == b
        out[label] = {"prec": float(precs[sel].mean()) if sel.any() else float("nan"),
                      "items": int(sel.sum())}
    return out


def run_seed(
    train: Dataset,
    test: Dataset,
    seed: int,
    cfg: RalmConfig,
    *,
    k_values: Sequence[int] = K_VALUES,
    lr_grid: Sequence[float] = LR_GRID,
    lr_epochs: int = 4,
    progress: bool = False,
    step: Callable[[str], object] = lambda _: None,
) -> dict:
    """Train every model with ``seed`` and score it on (train, test): rows, curves, timings."""
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    quiet = dict(progress=progress, log=lambda _: None)
    proto = Protocol.build(train, test, cfg.max_seeds)
    rows: dict[str, dict] = {}
    curves: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    def record(name: str, scores: np.ndarray, audience: np.ndarray | None = None) -> None:
        rows[name] = protocol_metrics(proto, scores, K_LIST, audience)
        if name in CURVE_ROWS:
            curves[name] = audience_by_seeds(proto, scores if audience is None else audience)

    pop, active = popularity_scores(proto)
    record("popularity", pop, active)

    step(f"seed {seed}: LR")
    t = time.perf_counter()
    lr_model, lr_tuning = tune_item_lr(train, lr_grid, max_seeds=cfg.max_seeds, seed=seed,
                                       epochs=lr_epochs)
    seconds["lr"] = time.perf_counter() - t
    record("lr", lr_model.scores(proto.users, proto.candidates))

    step(f"seed {seed}: RALM")
    c_att = cfg.model_copy(update={"seed": seed, "merge": "attention"})
    t = time.perf_counter()
    ralm = fit_ralm(train, c_att, **quiet)
    seconds["ralm"] = time.perf_counter() - t
    emb = embed_everyone(ralm, train)
    record("ralm_average", seed_mean_scores(emb, proto))
    users = emb[proto.users]
    own = None  # the parts at the trained k
    for k in sorted(set(k_values) | {c_att.k}):
        cent, counts = ralm_clusters(ralm, emb, proto, k)
        parts = ralm_parts(ralm, users, cent, counts)
        if k in k_values:
            record(f"ralm_k{k}", parts.combine(c_att.alpha, c_att.beta))
        if k == c_att.k:
            own = parts
    assert own is not None
    record("ralm", own.combine(c_att.alpha, c_att.beta))
    rows["ralm_both"] = rows["ralm"]
    record("ralm_local", own.combine(0.0, 1.0))
    record("ralm_global", own.combine(1.0, 0.0))

    step(f"seed {seed}: concat tower")
    c_cat = cfg.model_copy(update={"seed": seed, "merge": "concat"})
    t = time.perf_counter()
    concat = fit_ralm(train, c_cat, **quiet)
    seconds["ralm_concat"] = time.perf_counter() - t
    record("youtube_dnn", youtube_scores(concat, proto))
    emb_c = embed_everyone(concat, train)
    cent, counts = ralm_clusters(concat, emb_c, proto)
    record("ralm_concat", ralm_parts(concat, emb_c[proto.users], cent, counts)
           .combine(c_cat.alpha, c_cat.beta))

    step(f"seed {seed}: leave-one-out stage 2")
    c_loo = c_att.model_copy(update={"lookalike_examples": "leave_out"})
    t = time.perf_counter()
    loo = fit_ralm(train, c_loo, **quiet)
    seconds["ralm_leave_out"] = time.perf_counter() - t
    emb_l = embed_everyone(loo, train)
    cent, counts = ralm_clusters(loo, emb_l, proto)
    record("ralm_leave_out", ralm_parts(loo, emb_l[proto.users], cent, counts)
           .combine(c_loo.alpha, c_loo.beta))
    seconds["total"] = time.perf_counter() - started
    return {
        "seed": seed,
        "rows": rows,
        "audience_by_seeds": curves,
        "lr_tuning": lr_tuning,
        "seconds": seconds,
        "versions": {"ralm": ralm.version, "ralm_concat": concat.version,
                     "ralm_leave_out": loo.version},
        "train_losses": {name: {k: v for k, v in m.metrics.items() if k.endswith("loss")}
                         for name, m in (("ralm", ralm), ("ralm_concat", concat),
                                         ("ralm_leave_out", loo))},
        "split": {"test_users": int(proto.clicked.any(1).sum()),
                  "candidates": int(len(proto.candidates)),
                  "audience_items": int(proto.clicked.any(0).sum())},
    }


def _run_seed_job(args: tuple) -> dict:
    """Process-pool entry point (must be importable)."""
    train, test, seed, cfg, kwargs = args
    return run_seed(train, test, seed, cfg, **kwargs)


# ---------------------------------------------------------------- the task


def _summary(per_seed: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """row -> metric -> {mean, std (ddof=1; 0 with one seed), values}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in per_seed[0]["rows"]:
        out[row] = {}
        for metric in per_seed[0]["rows"][row]:
            v = np.array([r["rows"][row][metric] for r in per_seed], np.float64)
            ok = v[np.isfinite(v)]  # a metric can be undefined (no new users in a split)
            out[row][metric] = {"mean": float(ok.mean()) if len(ok) else float("nan"),
                                "std": float(ok.std(ddof=1)) if len(ok) > 1 else 0.0,
                                "values": v.tolist()}
    return out


def _curve_summary(per_seed: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in [r for r in CURVE_ROWS if r in per_seed[0]["audience_by_seeds"]]:
        out[row] = {}
        for label in bucket_labels():
            v = np.array([r["audience_by_seeds"][row][label]["prec"] for r in per_seed])
            n = [r["audience_by_seeds"][row][label]["items"] for r in per_seed]
            ok = np.isfinite(v)
            out[row][label] = {
                "mean": float(v[ok].mean()) if ok.any() else float("nan"),
                "std": float(v[ok].std(ddof=1)) if ok.sum() > 1 else 0.0,
                "items": int(n[0]),
            }
    return out


def _fingerprint() -> dict[str, str]:
    """Git commit (and whether the tree was dirty) and hashes of the model sources."""
    root = Path(__file__).resolve().parent.parent
    out: dict[str, str] = {}
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
            timeout=10).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "models"], cwd=root,
            capture_output=True, text=True, timeout=10).stdout.split("\n")
        out["uncommitted"] = " ".join(sorted(c[3:] for c in changed if c.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    for name in ("ralm.py", "train_ralm.py", "features.py", "baselines.py",
                 "evaluate_lookalike.py", "lookalike_task.py"):
        f = root / "models" / name
        if f.is_file():
            out[f"sha256:{name}"] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return out


def run_lookalike_task(
    dataset: Dataset,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    quick: bool = False,
    out_dir: str | Path = "lookalike-task",
    progress: bool = True,
    *,
    config: RalmConfig | None = None,
    k_values: Sequence[int] = K_VALUES,
    lr_grid: Sequence[float] | None = None,
    split: float = SPLIT,
    jobs: int = 1,
) -> dict:
    """Train and score every model for each seed; write JSON, markdown and plots to ``out_dir``.

    ``quick``: :func:`quick_config`, the first 2 seeds, a 2-value LR grid and
    2 LR epochs (tests/CI). ``config`` overrides the RALM settings (the seed
    and merge fields are set per run). ``jobs`` > 1 runs seeds in parallel
    processes (each on ``config.threads`` torch threads). Returns the JSON content.
    """
    started = time.perf_counter()
    cfg = config or (quick_config() if quick else RalmConfig())
    seeds = tuple(seeds)[:2] if quick else tuple(seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    grid = tuple(lr_grid or (LR_GRID[1:] if quick else LR_GRID))
    kwargs = dict(k_values=tuple(k_values), lr_grid=grid, lr_epochs=2 if quick else 4)
    train, test = dataset.time_split(split)
    per_seed: list[dict] = []
    if jobs > 1 and len(seeds) > 1:
        ctx = get_context("spawn")  # torch and fork do not mix
        with ProcessPoolExecutor(min(jobs, len(seeds)), mp_context=ctx) as pool, \
                tqdm(total=len(seeds), desc="look-alike task (seeds)", disable=not progress) as bar:
            futures = [pool.submit(_run_seed_job, (train, test, s, cfg, kwargs)) for s in seeds]
            for f in as_completed(futures):
                per_seed.append(f.result())
                bar.update(1)
        per_seed.sort(key=lambda r: r["seed"])
    else:
        # three steps per seed: LR, RALM, concat tower (each ticks when the next starts)
        with tqdm(total=3 * len(seeds), desc="look-alike task", disable=not progress) as bar:
            def step(what: str) -> None:
                if not what.endswith(": LR"):
                    bar.update(1)
                bar.set_postfix_str(what)

            for s in seeds:
                per_seed.append(run_seed(train, test, s, cfg, step=step, **kwargs))
                bar.update(1)
    result = {
        "settings": {
            "dataset": dataset.summary(),
            "split_quantile": split,
            "train_clicks": int(len(train)),
            "test_clicks": int(len(test)),
            "seeds": list(seeds),
            "quick": quick,
            "ralm_config": cfg.model_dump(),
            "k_values": list(k_values),
            "k_list": list(K_LIST),
            "seed_buckets": bucket_labels(),
            "lr": {"grid": list(grid), "epochs": kwargs["lr_epochs"],
                   "tuned_on": f"time split of the training period at its {0.8:g} quantile"},
            "jobs": jobs,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch "
                       f"{torch.__version__}",
            "code": _fingerprint(),
            "std": "sample standard deviation over seeds (ddof=1)",
        },
        "paper_wechat": {k: dict(zip(("auc", "prec@10", "prec@50"), v, strict=True))
                         for k, v in PAPER.items()},
        "rows": {**MAIN_ROWS, **ablation_rows(k_values, cfg)},
        "summary": _summary(per_seed),
        "audience_by_seeds": _curve_summary(per_seed),
        "per_seed": per_seed,
    }
    result["settings"]["wall_seconds"] = time.perf_counter() - started
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lookalike-task.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out / "lookalike-task.md").write_text(markdown(result))
    plot_prec_vs_k(result, out / "prec-vs-k.png")
    plot_audience_by_seeds(result, out / "audience-by-seeds.png")
    return result


# ---------------------------------------------------------------- reporting


def _pm(cell: dict[str, float]) -> str:
    m, s = cell["mean"], cell["std"]
    return "–" if not np.isfinite(m) else f"{m:.4f} ± {s:.4f}"


def _table(result: dict, names: Sequence[str]) -> list[str]:
    head = ["model", "AUC", "user AUC", "prec@10", "prec@50", "prec@10 returning users",
            "prec@10 new users", "audience AUC", "audience prec@10"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in names:
        row = result["summary"][name]
        lines.append(f"| {result['rows'][name]} | "
                     + " | ".join(_pm(row[m]) for m in METRICS) + " |")
    return lines


def markdown(result: dict) -> str:
    """The report: main table, ablations, the paper's numbers, the audience curve, settings."""
    st = result["settings"]
    cfg = st["ralm_config"]
    n = len(st["seeds"])
    ks = [f"ralm_k{k}" for k in st["k_values"]]
    lines = [
        "# RALM on the look-alike task",
        "",
        f"{st['dataset']}; time split at the {st['split_quantile']:g} quantile "
        f"({st['train_clicks']:,} train / {st['test_clicks']:,} test clicks); "
        f"seeds {st['seeds']} (mean ± std over {n}); quick={st['quick']}; "
        f"wall time {st['wall_seconds']:.0f} s.",
        "",
        "Seeds of an item = its training-period clickers (the last "
        f"{cfg['max_seeds']}); each test user ranks every seeded item; prec@K is the paper's "
        "eq. 12 averaged over users; AUC pools every (user, item) pair, user AUC averages "
        "per user; the audience view ranks each item's non-seed test users.",
        "",
        "## Models",
        "",
        *_table(result, list(MAIN_ROWS)),
        "",
        "## Ablations (one trained RALM per seed unless noted)",
        "",
        *_table(result, [*ks, "ralm_local", "ralm_global", "ralm_both", "ralm_concat",
                         "ralm_leave_out"]),
        "",
        "## The paper's offline table (WeChat data; not comparable in absolute terms)",
        "",
        "| model | AUC | prec@10 | prec@50 |",
        "| --- | --- | --- | --- |",
        *[f"| {k} | {v['auc']:.4f} | {v['prec@10']:.4f} | {v['prec@50']:.4f} |"
          for k, v in result["paper_wechat"].items()],
        "",
        "## Audience prec@10 by the item's number of seeds",
        "",
    ]
    labels = st["seed_buckets"]
    curve = result["audience_by_seeds"]
    first = next(iter(curve.values()))
    lines.append("| model | " + " | ".join(f"{b} seed{'' if b == '1' else 's'} "
                                            f"({first[b]['items']} items)"
                                            for b in labels) + " |")
    lines.append("|" + " --- |" * (len(labels) + 1))
    for name, row in curve.items():
        lines.append(f"| {result['rows'][name]} | "
                     + " | ".join(_pm(row[b]) for b in labels) + " |")
    lr = [r["lr_tuning"]["chosen"] for r in result["per_seed"]]
    secs = np.array([r["seconds"]["total"] for r in result["per_seed"]])
    lines += [
        "",
        "## Settings",
        "",
        f"- RALM: embed {cfg['embed_dim']}, dim {cfg['dim']}, k {cfg['k']}, "
        f"user epochs {cfg['user_epochs']}, look-alike epochs {cfg['lookalike_epochs']}, "
        f"α {cfg['alpha']}, β {cfg['beta']}, max seeds {cfg['max_seeds']}, "
        f"threads {cfg['threads']}.",
        f"- LR: L2 chosen per seed on a validation split of the training period from "
        f"{st['lr']['grid']} by AUC: {lr}.",
        f"- Per seed {secs.mean():.0f} s on average ({st['machine']}, jobs={st['jobs']}).",
        f"- Code: {st['code'].get('git_commit', '?')[:12]}"
        + (f" with uncommitted changes to {st['code']['uncommitted']}"
           if st["code"].get("uncommitted") else "") + ".",
        "",
    ]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_prec_vs_k(result: dict, path: Path) -> None:
    """prec@10 / prec@50 (user view) and audience prec@10 against k, RALM-average for reference."""
    plt = _pyplot()
    ks = result["settings"]["k_values"]
    summ = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metrics in ((axes[0], ("prec@10", "prec@50")), (axes[1], ("audience_prec@10",))):
        for m in metrics:
            mean = [summ[f"ralm_k{k}"][m]["mean"] for k in ks]
            std = [summ[f"ralm_k{k}"][m]["std"] for k in ks]
            line = ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=f"RALM {m}")
            ax.axhline(summ["ralm_average"][m]["mean"], ls="--", color=line[0].get_color(),
                       alpha=0.6, label=f"RALM with average {m}")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (seed centroids per item)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("user view")
    axes[1].set_title("audience view")
    fig.suptitle(f"prec@K vs k (mean ± std over {len(result['settings']['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_audience_by_seeds(result: dict, path: Path) -> None:
    """Per-item audience prec@10 against the item's seed count, one line per model."""
    plt = _pyplot()
    labels = result["settings"]["seed_buckets"]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in result["audience_by_seeds"].items():
        mean = np.array([row[b]["mean"] for b in labels])
        std = np.array([row[b]["std"] for b in labels])
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=result["rows"][name])
    first = next(iter(result["audience_by_seeds"].values()))
    ax.set_xticks(x, [f"{b}\n({first[b]['items']})" for b in labels])
    ax.set_xlabel("seeds of the item in the training period (items)")
    ax.set_ylabel("audience prec@10")
    ax.set_title("Audience quality by number of seeds (offline cold start)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
