"""Audience extension, RALM's own use case: the users who look like an item's seeds.

An advertiser brings an item (a campaign) and its seeds; the engine answers
with the K users most like them who are not seeds yet. Here the seeds are the
item's seed window as the clustering workers summarise it (its centroids on
``seed-centroids``), and the candidates are the users a scoring worker holds,
each with the embedding of their latest click (``UserStore.vecs``).

How one worker answers, for an item with centroids C [k, h] and counts:

1. shortlist: the ``audience_candidates`` users nearest to the item's global
   vector by cosine (one [users, h] product: ~10 ms at a million users), plus
   the model's activity prior (``RalmModel.audience_prior``: zero unless the
   model was trained with ``activity_prior``);
2. drop the item's seeds, i.e. the shortlisted users whose remembered clicks
   (the last ``scoring.max_seen``) include the item;
3. re-rank with the full RALM score (global + local attention, the same
   ``RalmModel.score_table`` recommendations use: the item's score for
   that user) plus the same prior, keep the top K: the score
   ``lookalike evaluate audience`` measures.

Users are partitioned over scoring workers (by the clicks partition they
click on), so every worker answers every request for the users it holds: one
partial answer per worker, saying which clicks partitions it covers.
:func:`merge_partials` joins them into the audience over all partitions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import orjson

from engine.config import Settings
from engine.topics import AUDIENCE_REQUESTS, AUDIENCES, Topics

if TYPE_CHECKING:
    from engine.centroid_table import CentroidTable
    from engine.user_store import UserState, UserStore
    from models.ralm import RalmModel


@dataclass(frozen=True)
class Audience:
    """One worker's answer: (user id, score) best first, or why there is none."""

    users: list[tuple[int, float]]
    reason: str | None = None  # "no_seeds": the item has no centroids here; "no_users"
    shortlisted: int = 0
    seeds_dropped: int = 0


def refresh_vectors(store: UserStore, embed: Callable[[list[UserState]], np.ndarray],
                    batch: int = 4096, limit: int | None = None) -> int:
    """Embed the held users whose stored embedding is stale (at most ``limit`` of them);
    returns how many.

    Users embedded on the click path are fresh already; users restored from
    the log, changed without a seed (a profile-only update), or embedded by a model
    swapped out since, are embedded here, once, in batches: a slice per poll by the
    scoring worker's tick, the rest (if any) before an audience is searched.
    """
    stale = np.flatnonzero((store.user_of >= 0) & ~store.fresh[: len(store.user_of)])
    stale = stale[:limit]
    for lo in range(0, len(stale), batch):
        states = [store.users[int(u)] for u in store.user_of[stale[lo:lo + batch]]]
        store.set_vectors(states, embed(states))
    return len(stale)


def look_alike_users(model: RalmModel, table: CentroidTable, store: UserStore, item: int,
                     k: int, candidates: int) -> Audience:
    """The top ``k`` users of ``store`` for ``item`` by RALM score, seeds excluded."""
    slot = table.slot_of.get(item)
    if slot is None or table.n_seeds[slot] == 0 or not table.version_ok[slot]:
        return Audience([], "no_seeds")  # none, or of another model version than serves
    live = np.flatnonzero(store.user_of >= 0)
    if not len(live) or store.vecs.shape[1] != table.dim:
        return Audience([], "no_users")
    cent, counts = table.centroids[slot], table.counts[slot]
    g = model.item_global(cent[None], counts[None])[0]
    vecs = store.vecs[live]
    n_seeds = float(counts.sum())  # the window's seeds
    prior = model.audience_prior(store.n_clicks[live], n_seeds)  # 0 unless trained with one
    cos = vecs @ g / np.maximum(np.linalg.norm(vecs, axis=1), 1e-12) + prior
    n = min(len(live), candidates + k)
    short = live[np.argpartition(-cos, n - 1)[:n]] if n < len(live) else live
    seeds = store.clicked(short, item)
    cand = short[~seeds]
    if not len(cand):
        return Audience([], None, len(short), int(seeds.sum()))
    scores = _ralm_scores(model, store.vecs[cand], cent, counts, g) + model.audience_prior(
        store.n_clicks[cand], n_seeds)
    order = np.argsort(-scores, kind="stable")[:k]
    users = list(zip(store.user_of[cand[order]].tolist(), scores[order].tolist(), strict=True))
    return Audience(users, None, len(short), int(seeds.sum()))


def _ralm_scores(model: RalmModel, users: np.ndarray, cent: np.ndarray, counts: np.ndarray,
                 g: np.ndarray) -> np.ndarray:
    """[N] each user's RALM score for one item (centroids [k, h]): the recommendation
    score (``RalmModel.score_table``), every user reading the item as a one-row table."""
    n = len(users)
    one = np.zeros((n, 1), np.int64)
    scores, _ = model.score_table(users, one, np.ones((n, 1), bool), cent[None],
                                  counts[None], g[None], (cent @ cent.T)[None])
    return scores[:, 0]


def merge_partials(records: Iterable[dict], k: int) -> tuple[list[dict], bool]:
    """One audience from the workers' partial answers to one request.

    Returns the top ``k`` users over all partials (a user is held by one worker
    at a time; after a rebalance two may answer for them: the best score is
    kept) and whether the partials cover every clicks partition.
    """
    best: dict[int, float] = {}
    covered: set[int] = set()
    total = None
    for rec in records:
        covered.update(rec.get("partitions", []))
        total = rec.get("partitions_total", total)
        for u in rec.get("users", []):
            if u["score"] > best.get(u["user_id"], -np.inf):
                best[u["user_id"]] = u["score"]
    top = sorted(best.items(), key=lambda x: (-x[1], x[0]))[:k]
    complete = total is not None and covered >= set(range(total))
    return [{"user_id": u, "score": s} for u, s in top], complete


def request_audience(s: Settings, item: int, k: int | None = None,
                     timeout_s: float = 10.0) -> tuple[list[dict], bool, list[dict]]:
    """Ask the running scoring workers for ``item``'s audience and merge their answers.

    Returns (users best first, whether every clicks partition answered, the
    partial records). Waits until the partials cover all partitions or
    ``timeout_s`` passes (then what came, marked incomplete).
    """
    from kafka import TopicPartition

    from consumers.kafka import make_consumer, make_producer
    from engine.codec import encode_json, key_of

    names = Topics(s.kafka.topic_prefix)
    rid = uuid.uuid4().hex
    consumer = make_consumer(s.kafka, None, fetch_max_wait_ms=50)
    producer = make_producer(s.kafka, linger_ms=0)
    try:
        parts = consumer.partitions_for_topic(names.name(AUDIENCES)) or set()
        if not parts:
            raise RuntimeError(f"no topic {names.name(AUDIENCES)!r}: is the dataflow set up "
                               "(`lookalike topics create`)?")
        tps = [TopicPartition(names.name(AUDIENCES), p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_end(*tps)
        for tp in tps:  # the end before the request, so no answer is missed
            consumer.position(tp)
        req = {"item_id": item, "request_id": rid, **({"k": k} if k else {})}
        producer.send(names.name(AUDIENCE_REQUESTS), key=key_of(item), value=encode_json(req))
        producer.flush()
        partials: list[dict] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=100).values():
                partials += [v for v in (orjson.loads(r.value) for r in records)
                             if v.get("request_id") == rid]
            users, complete = merge_partials(partials, k or s.scoring.audience_k)
            if complete:
                return users, True, partials
        users, complete = merge_partials(partials, k or s.scoring.audience_k)
        return users, complete, partials
    finally:
        consumer.close(autocommit=False)
        producer.close(timeout=5)
