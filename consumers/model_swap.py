"""A hot-reloaded model waits until its centroids cover the items before it serves.

Meanwhile the old model serves with its own centroids and the stage re-sends every
held user's seeds embedded by the new one, a slice per poll; the clustering workers
move each window to the new version. One model version per score, always
(``CentroidTable.servable``). A part of ``ScoringStage`` (``consumers/scoring.py``).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord

from engine import topics as T
from engine.codec import BadEvent
from engine.user_store import UserState
from models.ralm import RalmModel

log = logging.getLogger(__name__)


class ModelSwap:
    """Model swap methods of ``ScoringStage``."""

    def begin_swap(self, new: RalmModel, now: float) -> None:
        """A new model: it serves once the centroid table has its version's centroids
        for ``scoring.reload_min_coverage`` of the items the serving model serves now
        (or after ``scoring.reload_max_wait_s``); meanwhile the serving model goes on
        with its own centroids, and the new one sends the seeds: every held user's
        recent clicks again (a slice per poll), then every new click's, so the
        clustering workers' windows move to the new version in seconds.

        Why not at once: centroids are averages of one model's user embeddings;
        scoring a user of one model against another's centroids mixes two spaces. One
        model version per score (``CentroidTable.servable``)."""
        if new.version in (self.model.version, getattr(self.pending, "version", None)):
            log.info("model %s is already serving or pending", new.version)
            return
        covered = self.table.coverage(self.model.version)
        share = self.settings.scoring.reload_min_coverage
        if share <= 0 or covered == 0:
            self.swap_model(new)  # nothing served that the new model would have to cover
            return
        self.pending, self._pending_since = new, now
        self._cover_target = max(1, int(np.ceil(share * covered)))
        self._reseed = list(self.users.users)
        log.info("model %s loaded; it serves once %d items have its centroids (%s: %d), "
                 "re-sending the seeds of %d users", new.version, self._cover_target,
                 self.model.version, covered, len(self._reseed))

    def _advance_swap(self, now: float) -> None:
        """One poll's share of a pending swap: re-send some users' seeds, then swap if the
        new version covers enough items or the wait is over."""
        assert self.pending is not None
        self._reseed_some(self.refresh_per_tick)
        covered = self.table.coverage(self.pending.version)
        waited = now - self._pending_since
        if covered >= self._cover_target or waited >= self.settings.scoring.reload_max_wait_s:
            if covered < self._cover_target:
                log.warning("model %s serves after %.0f s with %d of %d items covered",
                            self.pending.version, waited, covered, self._cover_target)
            self.swap_coverage_s = waited
            self.metrics.swap_wait.labels(self.name).set(waited)
            new, self.pending, self._reseed = self.pending, None, []
            self.swap_model(new)

    def _reseed_some(self, n: int) -> None:
        """The pending model's seeds of up to ``n`` held users' recent clicks (their ids
        ring), at the user's last click time (per-click times are not kept: spaced a
        millisecond apart, oldest first, so each user's order holds)."""
        assert self.pending is not None
        batch, self._reseed = self._reseed[:n], self._reseed[n:]
        states = [st for u in batch if (st := self.users.get(u)) is not None]
        if not states:
            return
        vecs = self._embed_with(self.pending, states)
        items: list[int] = []
        users: list[int] = []
        ts: list[float] = []
        lens = []
        for st in states:
            ids = self.users.recent_ids(st, self.users.id_len)
            items += ids
            users += [int(self.users.user_of[st.slot])] * len(ids)
            ts += (st.last_ts - 1e-3 * np.arange(len(ids))[::-1]).tolist()
            lens.append(len(ids))
        if not items:
            return
        at = np.repeat(np.arange(len(states)), lens)
        self._emit_seeds(np.array(items, np.int64), np.array(users, np.int64),
                         np.array(ts, np.float64), vecs[at],
                         np.full(len(items), int(time.time() * 1000), np.int64),
                         self.pending.version)

    def _embed_with(self, model: RalmModel, states: list[UserState]) -> np.ndarray:
        """[B, h] ``model``'s embeddings of held users, from their item ids (their
        catalogue rows are the serving model's)."""
        if model is self.model:
            return self._embed(states, [s.profile for s in states])
        return model.embed_users([s.profile for s in states],
                                 [self.users.recent_ids(s, self.users.history_len)
                                  for s in states], [s.clicks for s in states])

    def swap_model(self, new: RalmModel) -> None:
        """Serve ``new`` from the next request on (called between polls: no request
        sees two models). Items' global vectors are recomputed with it now, users'
        stored embeddings when an audience next needs them; outputs carry its version.
        """
        old = self.model
        if new.version == old.version:
            log.info("model %s is already serving", new.version)
            return
        t0 = time.perf_counter()
        self.model = new
        self._field_index = ({}, {}, {})  # profile field indices are the model's
        self.users.remap_rows(new.features.catalog_rows)  # so are the catalogue rows
        self.users.fresh[:] = False
        self._stale_users = True
        self.table.serve_version(new.version)  # invalidates every item's global vector
        self.table.refresh(new.item_global)
        self.metrics.build_info.labels(self.name).info(
            {"model_version": new.version, "version": __import__("engine").__version__})
        self.metrics.model_reloads.labels(self.name, "loaded").inc()
        log.info("model %s -> %s swapped in (%.2f s, %d items re-embedded)", old.version,
                 new.version, time.perf_counter() - t0, len(self.table))

    def _dead_letter_model(self, rec: ConsumerRecord, err: BadEvent) -> None:
        assert self.loop is not None
        self.loop.dead_letter(T.MODELS, rec, err)

    # ------------------------------------------------------------- audiences
