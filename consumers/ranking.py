"""The scoring worker's ranking: RALM's score over the centroid table (the fast path
``lookalike bench score`` measures) and the serving pipelines' terms, for a batch of
users. A part of ``ScoringStage`` (``consumers/scoring.py``), kept apart because it is
the hot path a reader profiles: it reads the stage's model, table, users and settings.
"""

from __future__ import annotations

import numba
import numpy as np

from consumers.pipelines import (
    Pool,
    Ranked,
    explanation,
    popular_items,
    popularity,
    ralm_scores,
    rank_user,
    standardised,
    top_unseen,
)
from engine.codec import Profile
from engine.config import PipelineConfig
from engine.user_store import UserState

#: the items never recommended to a user without state
_NONE_SEEN = np.zeros(0, np.int64)
#: the sources and terms the centroid table alone provides
TABLE_TERMS = frozenset({"ralm", "popular"})


def table_only(p: PipelineConfig) -> bool:
    """Whether every source and term of ``p`` is the table's (``Ranking._rank_table``)."""
    terms = set(p.blend) if p.ranker == "blend" else {p.ranker}
    return set(p.sources) <= TABLE_TERMS and terms <= TABLE_TERMS


@numba.njit(cache=True, nogil=True)
def first_occurrences(slots: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Each row's slots (>= 0) at their first occurrence, in order, then -1 pads, as
    wide as the longest row: a user's pool when several sources propose the same item.
    Why compiled: numpy's version (two stable argsorts and three gathers a row) was
    ~0.2 ms of a batch-1 request."""
    b_n, c_n = slots.shape
    if slots.size == 0:
        return slots.copy()
    stamp = np.zeros(max(slots.max(), 0) + 1, np.int64)  # stamp[s] == b + 1: s in row b
    out = np.full((b_n, c_n), -1, np.int64)
    width = 0
    for b in range(b_n):
        n = 0
        for c in range(c_n):
            s = slots[b, c]
            if s >= 0 and stamp[s] != b + 1:
                stamp[s] = b + 1
                out[b, n] = s
                n += 1
        width = max(width, n)
    return out[:, :width].copy()


@numba.njit(cache=True, nogil=True)
def unseen(slots: np.ndarray, item_of: np.ndarray, seen: np.ndarray, offsets: np.ndarray,
           width: int) -> np.ndarray:  # pragma: no cover - compiled
    """[B, width] each row's first ``width`` slots (>= 0, in order) whose item
    (``item_of[slot]``) is none of row b's clicked items, ``seen[offsets[b]:offsets[b +
    1]]`` (any order, repeats allowed); -1 pads. A sort and a binary search per row,
    and a row stops once it has ``width``. Why compiled: ``np.isin`` over the batch's
    (item, row) keys and a stable argsort cost ~0.2 ms a call at batch 1, two calls
    per default-pipeline request (the popular source scans past every clicked item)."""
    out = np.full((slots.shape[0], width), -1, np.int64)
    for b in range(slots.shape[0]):
        clicked = np.sort(seen[offsets[b]:offsets[b + 1]])
        n = 0
        for c in range(slots.shape[1]):
            if n == width:
                break
            s = slots[b, c]
            if s < 0:
                continue
            if len(clicked):
                j = np.searchsorted(clicked, item_of[s])
                if j < len(clicked) and clicked[j] == item_of[s]:
                    continue
            out[b, n] = s
            n += 1
    return out


def _best(score: np.ndarray, ks: list[int | None], top_k: int) -> list[np.ndarray]:
    """Each row's positions of its finite scores, best first (ties: first position),
    the first ``k`` of them."""
    key = np.where(np.isfinite(score), -score, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    n = np.isfinite(score).sum(1)
    return [order[b, :min(int(n[b]), k or top_k)] for b, k in enumerate(ks)]


class Ranking:
    """Ranking methods of ``ScoringStage``."""

    def rank(self, users: np.ndarray, states: list[UserState | None],
             ks: list[int | None]) -> list[list[tuple[int, float]]]:
        """The default pipeline's (item, score) lists: what a request naming none gets."""
        cfg = self.settings.scoring
        p = cfg.pipelines[cfg.default_pipeline]
        who: list[tuple[int, Profile | None]] = [(-1, None)] * len(states)
        return [r.items for r in self.ranked(p, users, states, ks, False, who)]

    def ranked(self, p: PipelineConfig, users: np.ndarray, states: list[UserState | None],
               ks: list[int | None], explain: bool,
               who: list[tuple[int, Profile | None]]) -> list[Ranked]:
        """Pipeline ``p``'s answers: RALM alone and the pipelines over the table's own
        sources batched over table slots; the others a user at a time. ``who``: each
        user's id and profile, for CTR rankers."""
        if p.sources == ["ralm"] and p.ranker == "ralm":
            return self._rank_fast(users, states, ks, explain)
        if table_only(p):
            return self._rank_table(p, users, states, ks, explain)
        return self.rank_pipeline(p, users, states, ks, explain, who)

    def _rank_fast(self, users: np.ndarray, states: list[UserState | None],
                   ks: list[int | None], explain: bool) -> list[Ranked]:
        """Faiss candidates by cos(global), re-ranked by the full RALM score (the
        ``ralm`` pipeline): one index search for the whole batch, the user's own
        clicks dropped, then RALM over the shortlist (:meth:`_ralm_over`)."""
        cfg = self.settings.scoring
        seen = [s.seen if s else _NONE_SEEN for s in states]
        want = max(cfg.candidates, *(k or cfg.top_k for k in ks))  # a large K widens the shortlist
        cands = self._ralm_candidates(users, seen, want)
        if cands.shape[1] == 0:
            return [Ranked([], [] if explain else None) for _ in states]
        scores, att = self._ralm_over(users, cands, explain)
        order = _best(scores, ks, cfg.top_k)
        return [self._ranked(cands[b], scores[b], o, [["ralm"]] * len(o) if explain else None,
                             "ralm", scores[b], None if att is None else att[b])
                for b, o in enumerate(order)]

    def _rank_table(self, p: PipelineConfig, users: np.ndarray,
                    states: list[UserState | None], ks: list[int | None],
                    explain: bool) -> list[Ranked]:
        """A pipeline whose sources and terms are all the table's (``table_only``),
        batched over table slots: what :meth:`rank_pipeline` computes for it, a user at
        a time over item ids (the reference it is tested equal to)."""
        cfg = self.settings.scoring
        seen = [s.seen if s else _NONE_SEEN for s in states]
        cols = []
        for src in p.sources:
            if src == "ralm":
                cols.append(self._ralm_candidates(users, seen, p.per_source))
            else:  # popular
                head = self.table.popular_slots()[:p.per_source + max(len(x) for x in seen)]
                cols.append(self._unseen(np.broadcast_to(head, (len(users), len(head))),
                                         seen, p.per_source))
        cands = first_occurrences(np.concatenate(cols, axis=1))
        if cands.shape[1] == 0:
            return [Ranked([], [] if explain else None) for _ in states]
        valid = cands >= 0
        needed = set(p.blend) if p.ranker == "blend" else {p.ranker}
        terms: dict[str, np.ndarray] = {}
        ralm = att = None
        if "ralm" in needed or explain:
            ralm, att = self._ralm_over(users, cands, explain)
            terms["ralm"] = ralm
        if "popular" in needed:
            terms["popular"] = popularity(self.table, cands)
        if p.ranker == "blend":
            score = sum(w * standardised(terms[t], valid) for t, w in p.blend.items())
            score = np.where(valid, np.asarray(score, np.float64), np.nan)
        else:
            score = terms[p.ranker].astype(np.float64)
        order = _best(score, ks, cfg.top_k)
        out = []
        for b, o in enumerate(order):
            by = None
            if explain:
                slots = cands[b, o]
                by = [[src for src, col in zip(p.sources, cols, strict=True)
                       if s in col[b]] for s in slots.tolist()]
            out.append(self._ranked(cands[b], score[b], o, by, p.ranker,
                                    None if ralm is None else ralm[b],
                                    None if att is None else att[b]))
        return out

    def _ralm_candidates(self, users: np.ndarray, seen: list[np.ndarray],
                         want: int) -> np.ndarray:
        """[B, <= want] the index's best unclicked slots (-1 pads)."""
        n = want + max(len(s) for s in seen)
        found = self.table.search(users, n)
        self._sample_recall(users, found, n)
        return self._unseen(found, seen, want)

    def _ralm_over(self, users: np.ndarray, cands: np.ndarray,
                   explain: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """RALM's score of every candidate slot [B, C] (NaN: -1 or not servable) and,
        if ``explain``, its local attention [B, C, k]: one compiled pass over the
        table's rows (``RalmModel.score_table``, equal to ``RalmModel.score``)."""
        t = self.table
        return self.model.score_table(users, cands, t.servable(cands), t.centroids, t.counts,
                                      t.global_vec, t.gram, explain)

    def _ranked(self, slots: np.ndarray, score: np.ndarray, order: np.ndarray,
                by: list[list[str]] | None, ranker: str, ralm: np.ndarray | None,
                att: np.ndarray | None) -> Ranked:
        """One user's answer: the items at ``order`` of ``slots`` with their scores and,
        where ``by`` (each item's proposing sources) is given, why."""
        t = self.table
        chosen = slots[order]
        items = list(zip(t.item_ids[chosen].tolist(), score[order].tolist(), strict=True))
        if by is None:
            return Ranked(items)
        why = [explanation(src, ranker,
                           None if att is None or ralm is None or not np.isfinite(ralm[j])
                           else att[j], t.counts[slots[j]])
               for src, j in zip(by, order.tolist(), strict=True)]
        return Ranked(items, why)

    def rank_pipeline(self, p: PipelineConfig, users: np.ndarray,
                      states: list[UserState | None], ks: list[int | None],
                      explain: bool, who: list[tuple[int, Profile | None]]) -> list[Ranked]:
        """A configured pipeline other than the default (consumers/pipelines.py);
        ``who``: each user's id and profile, for CTR rankers."""
        cfg = self.settings.scoring
        seen = [s.seen if s else _NONE_SEEN for s in states]
        seen_sets = [set(x.tolist()) for x in seen]
        histories = [self.users.recent_ids(s, cfg.history_len) if s else [] for s in states]
        pools = [Pool() for _ in states]
        rows: dict[str, np.ndarray] = {}
        for src in p.sources:
            if src == "ralm":
                found = self.table.search(users, p.per_source + max(len(x) for x in seen))
                for pool, c in zip(pools, self._unseen(found, seen, p.per_source)):
                    pool.add(src, self.table.item_ids[c[c >= 0]].tolist())
            elif src == "popular":
                pop = popular_items(self.table)
                for pool, s in zip(pools, seen_sets):
                    pool.add(src, top_unseen(pop, None, s, p.per_source))
            else:
                model = self.zoo[src]
                rows[src] = model.score(histories)  # [B, n_items], item_ids_ order
                for pool, row, s in zip(pools, rows[src], seen_sets):
                    pool.add(src, top_unseen(model.item_ids_, row, s, p.per_source))
        terms_needed = set(p.blend) if p.ranker == "blend" else {p.ranker}
        for term in terms_needed & set(self.zoo) - set(rows):  # a zoo model ranking only
            rows[term] = self.zoo[term].score(histories)
        out = []
        for b, pool in enumerate(pools):
            terms: dict[str, np.ndarray] = {}
            att = counts = None
            if "ralm" in terms_needed or explain:
                terms["ralm"], att, counts = ralm_scores(self.model, self.table, users[b],
                                                         pool.items)
            for term in terms_needed - {"ralm"}:
                if term in self.rankers:
                    user_id, profile = who[b]
                    terms[term] = self.rankers[term].score(
                        user_id, profile.to_json() if profile else None, pool.items)
                else:
                    terms[term] = self._term(term, pool.items, rows.get(term), b)
            out.append(rank_user(p, pool, ks[b] or cfg.top_k, terms, explain, att, counts))
        return out

    def _term(self, term: str, items: list[int], rows: np.ndarray | None, b: int) -> np.ndarray:
        """A source's score of each pooled item (NaN where it has none)."""
        if term == "popular":
            return popularity(self.table, np.array([self.table.slot_of.get(i, -1)
                                                    for i in items], np.int64))
        assert rows is not None
        index = self.zoo[term]._item_index
        cols = np.array([index.get(i, -1) for i in items], np.int64)
        return np.where(cols >= 0, rows[b][np.maximum(cols, 0)], np.nan)

    def _sample_recall(self, users: np.ndarray, found: np.ndarray, n: int) -> None:
        """Now and then, the approximate index's recall on a live request (real data's
        geometry, not the bench's) into ``lookalike_index_recall``."""
        every = self.settings.scoring.recall_sample_every
        self._searches += 1
        if not every or self._searches % every or not self.table.approximate:
            return
        exact = self.table.search_exact(users[:1], n)[0]
        got = set(found[0].tolist())
        self.metrics.index_recall.labels(self.name).observe(
            sum(int(x) in got for x in exact) / max(len(exact), 1))

    def _unseen(self, slots: np.ndarray, seen: list[np.ndarray], want: int) -> np.ndarray:
        """[B, <= want] the first ``want`` slots of each row that are no item the user
        clicked (-1 pads): seen items are dropped before the re-rank, not after it.

        One compiled pass for the whole batch (:func:`unseen`): a Python set per row
        cost ~50 µs per user at 220 candidates, a quarter of a batched request's
        non-Faiss time.
        """
        lens = np.fromiter((len(s) for s in seen), np.int64, len(seen))
        clicks = np.concatenate(seen).astype(np.int64, copy=False) if lens.any() else \
            np.zeros(0, np.int64)
        # writable always: a batch-1 request's broadcast view is read-only, another type
        return unseen(np.require(slots, np.int64, ["C", "W"]), self.table.item_ids, clicks,
                      np.concatenate(([0], np.cumsum(lens))), min(want, slots.shape[1]))
