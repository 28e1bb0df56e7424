"""Hostile input on every topic the engine reads today (issue 8, item 4).

Topics: ``clicks`` and ``score-requests`` (scoring worker, JSON),
``seed-events`` (clustering worker, binary S1 batches and S2 packs) and
``seed-centroids`` (every scoring worker's table reader, binary C1/C2).
``audience-requests`` and ``models`` (announcements), which arrived while this
was written, are fuzzed at their decoders only; their handlers are not yet.

For each topic, property-based fuzzing of (a) the decoder and validator and
(b) the worker's handlers, driven in-process through the real consumer loop's
decode and dead-letter path (``ConsumerLoop._decode``/``dead_letter``) with a
recording producer in place of the broker. Required of every hostile record:
it is processed correctly or dead-lettered with a reason of
``BadEvent.REASONS``; no exception leaves a handler; state stays bounded by
configuration; and good events around it end in exactly the state and outputs
they produce alone. ``tests/test_hostile_broker.py`` runs a fixed hostile corpus
through the workers on the embedded broker.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field

import numpy as np
import orjson
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.partitioner.default import murmur2

from consumers.clustering import MAX_SEED_ABS, ClusteringStage
from consumers.loop import ConsumerLoop, Event, Stage
from engine import codec
from engine import topics as T
from engine.clustering import decode_records
from engine.codec import (
    FUTURE_SLACK_S,
    MAX_ID,
    MODEL_KINDS,
    BadEvent,
    Click,
    ItemCentroids,
    Profile,
    ScoreRequest,
    SeedBatch,
    SeedPack,
    decode_audience_request,
    decode_centroids,
    decode_click,
    decode_key,
    decode_model_announcement,
    decode_score_request,
    decode_seed_message,
    encode_centroids,
    encode_click,
    encode_seed_pack,
    encode_seeds,
    key_of,
)
from engine.config import Settings, load_settings

NOW = time.time()
FUZZ = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow,
                                                        HealthCheck.data_too_large])
HANDLER_FUZZ = settings(max_examples=60, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
DIM = 8
HOSTILE_BASE = 10**9  # ids of valid hostile events: disjoint from the good events' ids
GOOD_USERS = 5 * 10**6  # good clicks' users start past the small ids fuzzing likes


# ============================================================ a worker without a broker


class Recorder:
    """The loop's producer in-process: keeps every message, knows partition counts."""

    def __init__(self, partitions: int = 2):
        self.sent: list[tuple[str, bytes | None, bytes | None, dict, int | None]] = []
        self._parts = set(range(partitions))

    def send(self, topic, key=None, value=None, headers=None, timestamp_ms=None,
             partition=None):
        self.sent.append((topic, key, value, dict(headers or []), partition))

    def partitions_for(self, topic: str) -> set[int]:
        return self._parts

    def on(self, topic: str) -> list[tuple[bytes | None, bytes | None, dict]]:
        return [(k, v, h) for t, k, v, h, _ in self.sent if t == topic]


@dataclass
class Harness:
    """One stage behind the real ConsumerLoop's decode/dead-letter path."""

    stage: Stage
    loop: ConsumerLoop
    producer: Recorder
    offsets: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, stage: Stage) -> Harness:
        loop = ConsumerLoop(stage)
        producer = Recorder(stage.settings.kafka.partitions)
        loop.producer = producer  # type: ignore[assignment]
        return cls(stage, loop, producer)

    def record(self, topic: str, key: bytes | None, value: bytes | None,
               partition: int = 0) -> ConsumerRecord:
        full = self.stage.names.name(topic)
        off = self.offsets[full] = self.offsets.get(full, -1) + 1
        return ConsumerRecord(full, partition, -1, off, int(NOW * 1000), 0, key, value, [],
                              None, -1 if key is None else len(key),
                              -1 if value is None else len(value), -1)

    def poll(self, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
        """One poll's records through decode, ``handle`` (which must not raise) and tick."""
        recs = [self.record(topic, k, v) for k, v in messages]
        events = self.loop._decode({TopicPartition(self.stage.names.name(topic), 0): recs})
        if events:
            self.stage.handle(events)
        self.stage.tick(time.time())

    def dead_letters(self, topic: str) -> list[tuple[int, str]]:
        """(source offset, reason) of each dead letter of a base topic."""
        out = []
        for _, _, h in self.producer.on(self.stage.names.dlq(topic)):
            reason = h["reason"].decode()
            assert reason in BadEvent.REASONS
            assert h["source_topic"].decode() == self.stage.names.name(topic)
            out.append((int(h["source_offset"]), reason))
        return out


def _settings(**window) -> Settings:
    s = load_settings(None)
    return s.model_copy(update={
        "window": s.window.model_copy(update={"size": 16, "k": 3, **window}),
        # outputs go at once: the harness reads what a stage sent without the loop's flush
        "kafka": s.kafka.model_copy(update={"partitions": 2, "topic_prefix": "h-",
                                            "linger_ms": {}}),
    })


# ============================================================ hostile JSON


class Raw(str):
    """A JSON text fragment placed as is (NaN, 1e400, huge literals: what json.dumps won't)."""


RAW_TOKENS = [Raw(t) for t in (
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 400, "-0", "-1", "0.5", "true",
    "null", '"²"', '"٣"', '"99999999999999999999"', '"9223372036854775808"', '"-1"', '"1e3"',
    '" 7"', '""', "[]", "{}", '"' + "x" * 70_000 + '"', "[" + "0," * 20_000 + "0]",
    "{" + ",".join(f'"k{i}": {i}' for i in range(3000)) + "}", "[" * 600 + "]" * 600,
    str(2**63), str(2**64), str(MAX_ID), "1e300", "-1e300", str(NOW + 10 * FUTURE_SLACK_S),
    '"\\ud800"',
)]

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=80) | st.sampled_from(RAW_TOKENS))
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids,
                                                              max_size=4),
    max_leaves=12,
)


def _text(v) -> str:
    """JSON text of a value that may hold ``Raw`` fragments, NaN and infinities."""
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return "{" + ",".join(f"{orjson.dumps(k).decode()}:{_text(x)}"
                              for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_text(x) for x in v) + "]"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return orjson.dumps(v).decode()


def _good_profile() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional={
        "age": st.integers(0, 150), "gender": st.sampled_from(["M", "F"]),
        "occupation": st.sampled_from(["writer", "other"]), "zip_code": st.just("55105")})


PROFILE_FIELDS = ["age", "gender", "occupation", "zip_code", "extra"]
hostile_profiles = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(PROFILE_FIELDS), json_values, max_size=5),
    _good_profile(),
)


def _objects(fields: list[str], ids: list[str]) -> st.SearchStrategy[bytes]:
    """JSON objects of the topic's fields (and others), each field valid or hostile."""
    valid = {"user_id": st.integers(0, 1000), "item_id": st.integers(0, 1000),
             "ts": st.floats(0, NOW), "k": st.integers(1, 50),
             "request_id": st.text(max_size=20), "profile": _good_profile(),
             "kind": st.sampled_from(MODEL_KINDS), "path": st.text(min_size=1, max_size=40),
             "version": st.text(max_size=20)}
    value = {f: st.one_of(valid[f], json_values) for f in fields}
    if "profile" in fields:
        value["profile"] = hostile_profiles

    @st.composite
    def build(draw) -> bytes:
        obj = {}
        for f in fields:
            if f in ids or draw(st.booleans()):
                if draw(st.integers(0, 9)) or f not in ids:
                    obj[f] = draw(value[f])
        for extra in draw(st.lists(st.text(max_size=12), max_size=3)):
            obj[extra] = draw(json_values)
        text = _text(obj)
        if draw(st.integers(0, 9)) == 0:  # a duplicated field: the last one wins
            f = draw(st.sampled_from(fields))
            text = text[:-1] + ("," if len(text) > 2 else "") + f'"{f}":' + _text(
                draw(value[f])) + "}"
        return text.encode("utf-8", "surrogatepass")

    return build()


hostile_clicks = st.one_of(_objects(["user_id", "item_id", "ts", "profile"],
                                    ["user_id", "item_id"]),
                           st.binary(max_size=200), json_values.map(lambda v: _text(v).encode()),
                           st.none())
hostile_requests = st.one_of(_objects(["user_id", "k", "request_id", "profile"], ["user_id"]),
                             st.binary(max_size=200),
                             json_values.map(lambda v: _text(v).encode()), st.none())

hostile_audience_requests = st.one_of(_objects(["item_id", "k", "request_id"], ["item_id"]),
                                      st.binary(max_size=200),
                                      json_values.map(lambda v: _text(v).encode()), st.none())
hostile_announcements = st.one_of(_objects(["kind", "path", "version"], ["kind", "path"]),
                                  st.binary(max_size=200),
                                  json_values.map(lambda v: _text(v).encode()), st.none())


def _check_profile(p: Profile | None) -> None:
    if p is None:
        return
    assert p.age is None or (isinstance(p.age, float) and 0 <= p.age <= 150)
    for s in (p.gender, p.occupation, p.zip_code):
        assert s is None or (isinstance(s, str) and len(s) <= 64)


def _is_id(v) -> bool:
    return type(v) is int and 0 <= v <= MAX_ID


def check_click(raw: bytes | None, now: float = NOW, max_bytes: int = 65536) -> Click | None:
    """The decoder's contract: a valid Click, or BadEvent with a known reason."""
    try:
        c = decode_click(raw, now, max_bytes)
    except BadEvent as e:
        assert e.reason in BadEvent.REASONS
        return None
    assert _is_id(c.user_id) and _is_id(c.item_id)
    assert type(c.ts) is float and math.isfinite(c.ts) and 0 <= c.ts <= now + FUTURE_SLACK_S
    _check_profile(c.profile)
    assert decode_click(encode_click(c), now) == c  # what was accepted round-trips
    return c


def check_request(raw: bytes | None, max_k: int = 500) -> ScoreRequest | None:
    try:
        r = decode_score_request(raw, max_k)
    except BadEvent as e:
        assert e.reason in BadEvent.REASONS
        return None
    assert _is_id(r.user_id)
    assert r.k is None or (type(r.k) is int and 1 <= r.k <= max_k)
    assert r.request_id is None or (isinstance(r.request_id, str) and len(r.request_id) <= 128)
    _check_profile(r.profile)
    return r


# ------------------------------------------------------------ decoders: JSON topics


@FUZZ
@given(hostile_clicks)
def test_click_decoder_accepts_only_valid_clicks(raw):
    check_click(raw)


@FUZZ
@given(hostile_requests)
def test_score_request_decoder_accepts_only_valid_requests(raw):
    check_request(raw)


@FUZZ
@given(hostile_audience_requests)
def test_audience_request_decoder_accepts_only_valid_requests(raw):
    try:
        r = decode_audience_request(raw, 10_000)
    except BadEvent as e:
        assert e.reason in BadEvent.REASONS
        return
    assert _is_id(r.item_id)
    assert r.k is None or (type(r.k) is int and 1 <= r.k <= 10_000)
    assert r.request_id is None or (isinstance(r.request_id, str) and len(r.request_id) <= 128)


@FUZZ
@given(hostile_announcements)
def test_model_announcement_decoder_accepts_only_valid_announcements(raw):
    try:
        a = decode_model_announcement(raw)
    except BadEvent as e:
        assert e.reason in BadEvent.REASONS
        return
    assert a.kind in MODEL_KINDS
    assert isinstance(a.path, str) and 0 < len(a.path) <= 4096 and "\x00" not in a.path
    assert a.version is None or (isinstance(a.version, str) and len(a.version) <= 128)


@pytest.mark.parametrize("raw, reason", [
    (b'{"user_id": "\xc2\xb2", "item_id": 1}', "schema"),  # '²'.isdigit(), int('²') raises
    (b'{"user_id": "\xd9\xa3", "item_id": 1}', "schema"),  # Arabic-Indic 3: not an id here
    (b'{"user_id": 1, "item_id": 1, "ts": NaN}', "not_json"),
    (b'{"user_id": 1, "item_id": 1, "ts": 1e400}', "not_json"),
    (b'{"user_id": 1, "item_id": 1, "ts": ' + str(NOW + 2 * FUTURE_SLACK_S).encode() + b"}",
     "schema"),
    (b'{"user_id": 1, "item_id": ' + str(2**63).encode() + b"}", "schema"),
    (b'{"user_id": 1, "item_id": 1, "profile": {"age": [1]}}', "schema"),
    (b'{"user_id": 1, "item_id": 1, "profile": {"zip_code": {"a": 1}}}', "schema"),
    (b'\xff\xfe{"user_id": 1}', "not_json"),
])
def test_fixed_hostile_clicks_are_rejected_with_their_reason(raw, reason):
    with pytest.raises(BadEvent) as e:
        decode_click(raw, NOW)
    assert e.value.reason == reason


def test_validated_profile_cache_stays_bounded(monkeypatch):
    """Every distinct profile is cached: hostile clicks with ever-new profiles must not grow it."""
    monkeypatch.setattr(codec, "_MAX_PROFILES", 50)
    monkeypatch.setattr(codec, "_PROFILES", {})
    for i in range(500):
        decode_click(orjson.dumps({"user_id": 1, "item_id": 2, "profile": {
            "age": i % 150, "zip_code": f"z{i}"}}), NOW)
        assert len(codec._PROFILES) <= 50


# ------------------------------------------------------------ decoders: binary topics


def _seed_batch(rng: np.random.Generator, n: int, dim: int = DIM, t0: float = 1.0,
                users: np.ndarray | None = None) -> SeedBatch:
    users = rng.integers(0, 50, n) if users is None else users
    return SeedBatch(users.astype(np.int64), t0 + np.arange(n, dtype=np.float64),
                     rng.normal(size=(n, dim)).astype(np.float32), "v1")


def _seed_pack(rng: np.random.Generator, items: list[int], per: int) -> SeedPack:
    n = len(items) * per
    return SeedPack(np.array(items, np.int64), np.arange(0, n + 1, per, dtype=np.int64),
                    rng.integers(0, 50, n).astype(np.int64), 1.0 + np.arange(n, dtype=np.float64),
                    rng.normal(size=(n, DIM)).astype(np.float32), "v1")


def _poke(raw: bytes, at: int, fmt: str, value) -> bytes:
    """``raw`` with one packed value written over it at ``at`` (wrapped to fit)."""
    buf = bytearray(raw)
    if len(raw) < struct.calcsize(fmt):
        return raw
    struct.pack_into(fmt, buf, at % max(1, len(raw) - struct.calcsize(fmt) + 1), value)
    return bytes(buf)


@st.composite
def mutated(draw, raw: bytes) -> bytes | None:
    """A valid binary record, corrupted: flips, cuts, growth, header fields, NaN/inf."""
    kind = draw(st.integers(0, 8))
    if kind == 0:
        return raw[:draw(st.integers(0, len(raw)))]
    if kind == 1:
        return raw + draw(st.binary(min_size=1, max_size=64))
    if kind == 2:  # flip a few bytes anywhere
        buf = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
        return bytes(buf)
    if kind == 3:  # a header count or size: 0, huge, off by one
        at = draw(st.sampled_from([2, 4, 6, 8, 10]))
        return _poke(raw, at, "<H", draw(st.sampled_from([0, 1, 4095, 4096, 4097, 65535])))
    if kind == 4:
        at = draw(st.sampled_from([2, 4, 6]))
        return _poke(raw, at, "<I", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1])))
    if kind == 5:  # a float64 (times) anywhere
        return _poke(raw, draw(st.integers(0, len(raw))), "<d", draw(st.sampled_from(
            [math.nan, math.inf, -math.inf, -1.0, 1e300, -1e300, NOW + 10 * FUTURE_SLACK_S])))
    if kind == 6:  # a float32 (vectors) anywhere
        return _poke(raw, draw(st.integers(0, len(raw))), "<f", draw(st.sampled_from(
            [math.nan, math.inf, -math.inf, 3e38, -3e38, 1e7])))
    if kind == 7:  # an int64 (ids) anywhere
        return _poke(raw, draw(st.integers(0, len(raw))), "<q", draw(st.sampled_from(
            [-1, -(2**63), 2**63 - 1])))
    return draw(st.one_of(st.none(), st.binary(max_size=300),
                          st.just(raw[:2]) | st.just(b"S1") | st.just(b"S2") | st.just(b"C1")))


hostile_keys = st.one_of(
    st.integers(0, 10**6).map(key_of), st.none(), st.binary(max_size=25),
    st.sampled_from([b"", b"-1", b"1.0", b" 1", b"\xd9\xa3", str(2**63).encode(),
                     str(MAX_ID).encode(), b"9" * 19, b"9" * 20, b"0" * 19]))


def _check_key(key: bytes | None) -> None:
    try:
        k = decode_key(key)
    except BadEvent as e:
        assert e.reason in BadEvent.REASONS
        return
    assert _is_id(k)


@FUZZ
@given(hostile_keys)
def test_key_decoder_accepts_only_int64_ids(key):
    _check_key(key)


@FUZZ
@given(st.data())
def test_seed_decoders_accept_only_sound_records(data):
    """S1 and S2: a record either decodes into finite, shaped, non-negative-id columns,
    or is a BadEvent; the clustering worker's poll-wide fast path agrees record by record."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    raws, keys = [], []
    for _ in range(data.draw(st.integers(1, 6))):
        if data.draw(st.booleans()):
            good = encode_seeds(_seed_batch(rng, data.draw(st.integers(0, 4))))
            keys.append(data.draw(hostile_keys))
        else:
            good = encode_seed_pack(_seed_pack(rng, data.draw(st.lists(
                st.integers(0, 2**40), min_size=1, max_size=3)), data.draw(st.integers(1, 3))))
            keys.append(None)
        raws.append(data.draw(st.one_of(st.just(good), mutated(good))))
    accepted = []
    for key, raw in zip(keys, raws):
        try:
            out = decode_seed_message(key, raw)
        except BadEvent as e:
            assert e.reason in BadEvent.REASONS
            accepted.append(False)
            continue
        accepted.append(True)
        for item, b in out:
            assert _is_id(item)
            n = len(b.users)
            assert b.ts.shape == (n,) and b.vectors.ndim == 2 and len(b.vectors) == n
            assert 0 < b.vectors.shape[1] <= codec.MAX_DIM
            assert (b.users >= 0).all() and np.isfinite(b.ts).all()
            assert np.isfinite(b.vectors).all()
    # the fast path (a whole poll at once) accepts exactly the same records
    items: list[int | None] = []
    fast_raws: list[bytes | None] = []
    for key, raw in zip(keys, raws):
        if raw is not None and raw[:2] == codec.PACK_MAGIC:
            items.append(None)
        else:
            try:
                items.append(decode_key(key))
            except BadEvent:
                continue  # the loop dead-letters it at decode, before the fast path
        fast_raws.append(raw)
    want = [a for a, key, raw in zip(accepted, keys, raws)
            if (raw is not None and raw[:2] == codec.PACK_MAGIC) or _key_ok(key)]
    _, bad = decode_records(items, fast_raws)
    assert [i not in {j for j, _ in bad} for i in range(len(fast_raws))] == want
    assert all(e.reason in BadEvent.REASONS for _, e in bad)


def _key_ok(key: bytes | None) -> bool:
    try:
        decode_key(key)
    except BadEvent:
        return False
    return True


@FUZZ
@given(st.data())
def test_centroid_decoder_accepts_only_sound_records(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    k, dim = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6))
    rec = ItemCentroids(rng.normal(size=(k, dim)).astype(np.float32),
                        rng.integers(0, 5, k).astype(np.float32), 5, NOW, NOW - 1, "v1")
    good = encode_centroids(rec, data.draw(st.sampled_from(["float32", "float16"])))
    raw = data.draw(st.one_of(st.just(good), mutated(good)))
    try:
        out = decode_centroids(raw)
    except BadEvent as e:
        assert e.reason in BadEvent.REASONS
        return
    if out is None:
        assert raw is None
        return
    kk, dd = out.centroids.shape
    assert 0 < kk <= codec.MAX_K and 0 < dd <= codec.MAX_DIM and out.counts.shape == (kk,)
    assert np.isfinite(out.centroids).all() and np.isfinite(out.counts).all()
    assert (out.counts >= 0).all()
    assert math.isfinite(out.updated_at) and math.isfinite(out.last_seed_ts)


# ============================================================ handlers: clustering


def _clustering() -> Harness:
    return Harness.of(ClusteringStage(_settings(max_items=10_000)))


def _good_seed_polls(seed: int) -> list[list[tuple[bytes | None, bytes]]]:
    """Valid seed-events polls (S1 and S2) over items 0..9 and users 0..49."""
    rng = np.random.default_rng(seed)
    polls, t = [], 1.0
    for _ in range(4):
        poll: list[tuple[bytes | None, bytes]] = []
        for _ in range(int(rng.integers(1, 5))):
            if rng.random() < 0.5:
                b = _seed_batch(rng, int(rng.integers(1, 4)), t0=t)
                poll.append((key_of(int(rng.integers(10))), encode_seeds(b)))
            else:
                pack = _seed_pack(rng, sorted(rng.choice(10, 2, replace=False).tolist()), 2)
                pack.ts += t
                poll.append((None, encode_seed_pack(pack)))
            t += 10.0
        polls.append(poll)
    return polls


def _hostile_seed_record(rng: np.random.Generator, item: int, pack: bool) -> tuple:
    """A valid record of unknown items from unknown users (S1 or S2)."""
    if pack:
        p = _seed_pack(rng, [item, item + 1], 2)
        p.users += HOSTILE_BASE
        return None, encode_seed_pack(p)
    b = _seed_batch(rng, 2, users=HOSTILE_BASE + rng.integers(0, 10**6, 2))
    return key_of(item), encode_seeds(b)


@st.composite
def hostile_seed_records(draw, earlier: list[tuple[bytes | None, bytes]]):
    """One hostile seed-events record: (key, value, must it be dead-lettered? None: either).

    Valid ones touch only unknown items (ids from ``HOSTILE_BASE``), except replays of
    earlier good records, which must change nothing.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    item = HOSTILE_BASE + draw(st.integers(0, 10**6))
    kind = draw(st.integers(0, 8))
    if kind == 0 and earlier:  # a replay of an earlier good record: idempotent
        key, value = draw(st.sampled_from(earlier))
        return key, value, False
    if kind == 1:  # a corrupted record
        key, value = _hostile_seed_record(rng, item, draw(st.booleans()))
        return key, draw(mutated(value)), None  # bad or, by chance, still valid
    if kind == 2:  # a bad key on a sound S1 value
        _, value = _hostile_seed_record(rng, item, False)
        key = draw(st.sampled_from([None, b"", b"x", b"-3", b"1.0", str(2**63).encode(),
                                    b"9" * 19, b"9" * 20, b"\xd9\xa3"]))
        return key, value, True
    if kind == 3:  # a negative or far-future seed time
        b = _seed_batch(rng, 2, t0=draw(st.sampled_from([-5.0, -1e300, NOW + 2 * FUTURE_SLACK_S,
                                                         1e300])))
        return key_of(draw(st.integers(0, 9))), encode_seeds(b), True
    if kind == 4:  # finite but huge vector components
        b = _seed_batch(rng, 2)
        b.vectors[0, 0] = draw(st.sampled_from([3e38, -3e38, 10 * MAX_SEED_ABS]))
        return key_of(draw(st.integers(0, 9))), encode_seeds(b), True
    if kind == 5:  # a pack with an insane seed
        pack = _seed_pack(rng, [1, 2], 2)
        pack.ts[3] = NOW + 3 * FUTURE_SLACK_S
        return None, encode_seed_pack(pack), True
    if kind == 6:  # valid seeds of unknown items from unknown users
        key, value = _hostile_seed_record(rng, item, draw(st.booleans()))
        return key, value, False
    if kind == 7:  # a huge but valid batch for an unknown item
        n = draw(st.integers(100, 2000))
        b = _seed_batch(rng, n, users=HOSTILE_BASE + np.arange(n))
        return key_of(item), encode_seeds(b), False
    return draw(hostile_keys), draw(st.one_of(st.none(), st.binary(max_size=200))), None


def _touches(key: bytes | None, value: bytes | None, items: set[int]) -> bool:
    """Whether a record is a valid seed record of any of ``items``."""
    try:
        return any(i in items for i, _ in decode_seed_message(key, value))
    except BadEvent:
        return False


def _item_state(h: Harness, items: set[int]) -> dict[int, tuple]:
    """Window, newest seed time, centroids and counts of each held item, as they are:
    the windowed k-means depends on each item's seed order, not on how records fell
    into polls or k-means steps (a record between two S1 runs, an S2 pack, valid or not)."""
    s: ClusteringStage = h.stage  # type: ignore[assignment]
    out = {}
    for i in items & s.state.items.keys():
        st_ = s.state.items[i]
        out[i] = (st_.window.users(), st_.window.vectors().copy(), st_.last_seed_ts,
                  st_.centroids.copy(), st_.counts.copy())
    return out


def _published(h: Harness) -> dict[int, ItemCentroids | None]:
    out = {}
    for key, value, _ in h.producer.on(h.stage.names.seed_centroids):
        out[int(key)] = decode_centroids(value)
    return out


def _run_clustering(polls) -> Harness:
    h = _clustering()
    for poll in polls:
        h.poll(T.SEED_EVENTS, [(k, v) for k, v, *_ in poll])
    h.stage.drain()
    return h


@HANDLER_FUZZ
@given(st.data())
def test_clustering_handler_survives_hostile_seeds_and_good_ones_are_unaffected(data):
    polls = _good_seed_polls(data.draw(st.integers(0, 1000)))
    mixed, earlier = [], []
    for poll in polls:
        new = [(k, v, False) for k, v in poll]
        for _ in range(data.draw(st.integers(0, 4))):
            new.insert(data.draw(st.integers(0, len(new))),
                       data.draw(hostile_seed_records(earlier)))
        mixed.append(new)
        earlier.extend(poll)
    mixed.append([data.draw(hostile_seed_records(earlier)) for _ in range(3)])
    for poll in mixed:  # a corruption that by chance is valid for a good item: not hostile
        for key, value, must_die in poll:
            if must_die is None:
                assume(not _touches(key, value, set(range(10))))

    alone, hostile = _run_clustering(polls), _run_clustering(mixed)

    goods = set(range(10))
    want, got = _item_state(alone, goods), _item_state(hostile, goods)
    assert want.keys() == got.keys()
    for i in want:
        (wu, wv, wt, wc, wn), (gu, gv, gt, gc, gn) = want[i], got[i]
        assert wu == gu and wt == gt
        np.testing.assert_array_equal(wv, gv)
        np.testing.assert_array_equal(gc, wc)
        np.testing.assert_array_equal(gn, wn)
    pub_alone, pub_hostile = _published(alone), _published(hostile)
    assert pub_alone.keys() <= pub_hostile.keys()
    for i in pub_alone:
        assert pub_hostile[i].n_seeds == pub_alone[i].n_seeds
        assert pub_hostile[i].last_seed_ts == pub_alone[i].last_seed_ts
    assert not (pub_hostile.keys() - pub_alone.keys()) & goods  # no good item gained a record

    # every record is applied or dead-lettered; the known-bad ones are dead-lettered
    dead = dict(hostile.dead_letters(T.SEED_EVENTS))
    offset = 0
    for poll in mixed:
        for _, _, must_die in poll:
            if must_die is True:
                assert offset in dead, offset
            if must_die is False:
                assert offset not in dead, offset
            offset += 1
    assert not any(r == "processing_error" for r in dead.values())


def test_seed_state_stays_bounded_by_max_items_under_a_flood_of_new_items():
    h = Harness.of(ClusteringStage(_settings(max_items=20, size=4)))
    rng = np.random.default_rng(0)
    s: ClusteringStage = h.stage  # type: ignore[assignment]
    for p in range(30):
        h.poll(T.SEED_EVENTS, [
            (key_of(HOSTILE_BASE + 50 * p + j), encode_seeds(_seed_batch(
                rng, 6, t0=float(p * 100 + j), users=np.arange(6) + 10 * j)))
            for j in range(50)])
        assert len(s.state) <= 20 and s.state.seeds_held() <= 20 * 4
        assert len(s._partition_of) <= 20 and len(s._dirty) <= 20
        assert len(s._dirty_since) <= 20


def test_tables_of_evicted_embedding_sizes_are_freed():
    h = Harness.of(ClusteringStage(_settings(max_items=3, size=4)))
    s: ClusteringStage = h.stage  # type: ignore[assignment]
    rng = np.random.default_rng(0)
    for dim in range(1, 40):
        h.poll(T.SEED_EVENTS, [(key_of(HOSTILE_BASE + dim), encode_seeds(_seed_batch(
            rng, 1, dim=dim, t0=float(dim))))])
    assert len(s.state) <= 3
    assert set(s.state._tables) <= {st.dim for st in s.state.items.values()}


def test_a_far_future_seed_no_longer_freezes_an_items_window():
    """Before the fix, a seed timed 1e300 became its window's oldest and the window then
    refused every newer seed (its replay guard): the item froze for good."""
    h = Harness.of(ClusteringStage(_settings(size=3)))
    s: ClusteringStage = h.stage  # type: ignore[assignment]
    rng = np.random.default_rng(0)
    h.poll(T.SEED_EVENTS, [(key_of(1), encode_seeds(_seed_batch(
        rng, 1, t0=1e300, users=np.array([99]))))])
    for t in range(1, 6):
        h.poll(T.SEED_EVENTS, [(key_of(1), encode_seeds(_seed_batch(
            rng, 1, t0=float(t), users=np.array([t]))))])
    assert s.state.items[1].window.users() == [3, 4, 5]
    assert h.dead_letters(T.SEED_EVENTS) == [(0, "bad_binary")]


# ============================================================ handlers: scoring


@pytest.fixture(scope="module")
def ralm():
    from engine.synthetic import SyntheticSpec, generate
    from models.features import FeatureSpace
    from models.ralm import RalmConfig, RalmModel

    torch.set_num_threads(1)
    data = generate(SyntheticSpec(n_users=100, n_items=60, clicks_per_user=10, seed=5))
    torch.manual_seed(0)
    cfg = RalmConfig.tiny(history_len=8)
    model = RalmModel.new(cfg, FeatureSpace.build(data, cfg.history_len), version="t")
    return data, model


class Feeder:
    """Stands in for the table reader's KafkaConsumer: hands over queued records once."""

    def __init__(self):
        self.queue: list[ConsumerRecord] = []

    def poll(self, timeout_ms: int = 0, max_records: int = 10_000):
        out, self.queue = self.queue, []
        return {TopicPartition("seed-centroids", 0): out} if out else {}

    def close(self, autocommit: bool = False) -> None:
        pass


def _scoring(ralm, max_users: int = 1000) -> Harness:
    from consumers.scoring import ScoringStage

    data, model = ralm
    s = _settings(k=model.k)
    s = s.model_copy(update={"scoring": s.scoring.model_copy(update={
        "max_users": max_users, "min_seeds": 1, "history_len": 8, "index_refresh_s": 0.001,
        "recall_sample_every": 0})})
    stage = ScoringStage(s, model)
    h = Harness.of(stage)
    stage.table_reader = Feeder()  # type: ignore[assignment]
    rng = np.random.default_rng(1)
    for item in data.items.ids[:40].tolist():  # a fixed centroid table to rank against
        rec = ItemCentroids(rng.normal(size=(model.k, model.dim)).astype(np.float32),
                            np.ones(model.k, np.float32), 5, NOW, NOW, model.version)
        stage.table_reader.queue.append(h.record(T.SEED_CENTROIDS, key_of(int(item)),
                                                 encode_centroids(rec)))
    stage.tick(time.time())
    stage.tick(time.time() + 1)
    assert len(stage.table) == 40
    return h


def _good_scoring_polls(ralm, seed: int) -> list[list[tuple[str, bytes, bytes]]]:
    data, _ = ralm
    rng = np.random.default_rng(seed)
    users, items = GOOD_USERS + data.users.ids[:30], data.items.ids
    polls = []
    for p in range(3):
        poll = []
        for _ in range(int(rng.integers(1, 6))):
            u = int(rng.choice(users))
            c = Click(u, int(rng.choice(items)), 1000.0 + p, Profile(30.0, "M", "writer", "1"))
            poll.append((T.CLICKS, key_of(u), encode_click(c)))
        for r in range(int(rng.integers(0, 3))):
            u = int(rng.choice(users))
            poll.append((T.SCORE_REQUESTS, key_of(u), orjson.dumps(
                {"user_id": u, "k": 5, "request_id": f"good-{p}-{r}"})))
        polls.append(poll)
    return polls


@st.composite
def hostile_scoring_records(draw, good):
    """(topic, key, value, must be dead-lettered?) on clicks or score-requests."""
    kind = draw(st.integers(0, 6))
    u = HOSTILE_BASE + draw(st.integers(0, 10**6))
    if kind == 0:
        return T.CLICKS, draw(hostile_keys), draw(hostile_clicks), None
    if kind == 1:
        return T.SCORE_REQUESTS, draw(hostile_keys), draw(hostile_requests), None
    if kind == 2:  # a valid click of an unknown user on an unknown item, odd profile
        obj = {"user_id": u, "item_id": draw(st.sampled_from([0, MAX_ID, HOSTILE_BASE])),
               "ts": draw(st.sampled_from([0.0, NOW + FUTURE_SLACK_S / 2])),
               "profile": {"gender": "q" * 64, "occupation": draw(st.text(max_size=64)),
                           "age": 150}}
        return T.CLICKS, key_of(u), orjson.dumps(obj), False
    if kind == 3:  # a valid request of an unknown user, the largest k, a long id
        obj = {"user_id": u, "k": 500, "request_id": "r" * 128}
        return T.SCORE_REQUESTS, draw(hostile_keys), orjson.dumps(obj), False
    if kind == 4:  # invalid in a way the decoder must name
        topic, bad = draw(st.sampled_from([
            (T.CLICKS, b'{"user_id": 1, "item_id": 2, "ts": -1}'),
            (T.CLICKS, b'{"user_id": 1, "item_id": 2, "ts": ' + str(
                NOW + 3 * FUTURE_SLACK_S).encode() + b"}"),
            (T.CLICKS, b'{"user_id": "\xc2\xb2", "item_id": 2}'),
            (T.CLICKS, b'{"user_id": 1, "item_id": 2, "pad": "' + b"x" * 70_000 + b'"}'),
            (T.SCORE_REQUESTS, b'{"user_id": 1, "k": 501}'),
            (T.SCORE_REQUESTS, b'{"user_id": 1, "request_id": "' + b"r" * 129 + b'"}'),
            (T.SCORE_REQUESTS, b"[" * 10_000),
        ]))
        return topic, draw(hostile_keys), bad, True
    if kind == 5:  # a duplicated valid request (answered twice: each is a request)
        topic, key, value = draw(st.sampled_from([g for g in good if g[0] == T.SCORE_REQUESTS]
                                                 or [(T.SCORE_REQUESTS, b"1",
                                                      b'{"user_id": 1, "request_id": "x"}')]))
        obj = orjson.loads(value)
        obj["user_id"] = u  # a hostile user: the good users' outputs must not move
        obj["request_id"] = f"dup-{obj['request_id']}"
        return topic, key, orjson.dumps(obj), False
    return draw(st.sampled_from([T.CLICKS, T.SCORE_REQUESTS])), draw(hostile_keys), None, True


def _run_scoring(ralm, polls) -> Harness:
    h = _scoring(ralm)
    for poll in polls:
        # the loop polls clicks and score-requests together: one handle per poll
        recs = {}
        for topic, key, value, *_ in poll:
            # where kafka-python's producer puts it (murmur2 of the key; null key: 0), so
            # records keyed by their user land on the user's partition; others are forwarded
            p = (murmur2(key) & 0x7FFFFFFF) % h.stage.settings.kafka.partitions if key else 0
            tp = TopicPartition(h.stage.names.name(topic), p)
            recs.setdefault(tp, []).append(h.record(topic, key, value, partition=p))
        events = h.loop._decode(recs)
        if events:
            h.stage.handle(events)
        h.stage.tick(time.time())
    return h


def _recommendations(h: Harness) -> dict[str, list[int]]:
    out = {}
    for _, value, _ in h.producer.on(h.stage.names.recommendations):
        rec = orjson.loads(value)
        out[rec["request_id"]] = [(i["item_id"], i["score"]) for i in rec["items"]]
    return out


def _seeds(h: Harness) -> dict[tuple[int, int, float], np.ndarray]:
    out = {}
    for key, value, _ in h.producer.on(h.stage.names.seed_events):
        for item, b in decode_seed_message(key, value):
            for u, t, v in zip(b.users.tolist(), b.ts.tolist(), b.vectors):
                out[(item, u, t)] = v
    return out


@HANDLER_FUZZ
@given(st.data())
def test_scoring_handler_survives_hostile_events_and_good_ones_are_unaffected(ralm, data):
    polls = _good_scoring_polls(ralm, data.draw(st.integers(0, 1000)))
    good = [m for p in polls for m in p]
    mixed = []
    for poll in polls:
        new = [(*m, False) for m in poll]
        for _ in range(data.draw(st.integers(0, 5))):
            new.insert(data.draw(st.integers(0, len(new))),
                       data.draw(hostile_scoring_records(good)))
        mixed.append(new)
    good_users = {orjson.loads(v)["user_id"] for _, _, v in good}
    for poll in mixed:  # a fuzzed event that by chance is a valid one of a good user
        for topic, _, value, must_die in poll:
            if must_die is None:
                ok = check_click(value) if topic == T.CLICKS else check_request(value)
                assume(ok is None or ok.user_id not in good_users)

    alone, hostile = _run_scoring(ralm, polls), _run_scoring(ralm, mixed)

    for u in good_users:
        a, b = alone.stage.users.get(u), hostile.stage.users.get(u)
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.history, a.clicks, a.last_ts, a.profile) == (
                b.history, b.clicks, b.last_ts, b.profile)
    want_seeds, got_seeds = _seeds(alone), _seeds(hostile)
    assert want_seeds.keys() <= got_seeds.keys()
    for k, v in want_seeds.items():
        np.testing.assert_allclose(got_seeds[k], v, rtol=1e-4, atol=1e-5)
    assert not {u for _, u, _ in got_seeds.keys() - want_seeds.keys()} & good_users
    want_recs, got_recs = _recommendations(alone), _recommendations(hostile)
    for rid, items in want_recs.items():
        assert [i for i, _ in got_recs[rid]] == [i for i, _ in items], rid
        np.testing.assert_allclose([s for _, s in got_recs[rid]], [s for _, s in items],
                                   rtol=1e-4, atol=1e-5)

    dead: dict[tuple[str, int], str] = {}
    for topic in (T.CLICKS, T.SCORE_REQUESTS):
        dead.update({(topic, off): r for off, r in hostile.dead_letters(topic)})
    offsets: dict[str, int] = {}
    forwarded = {check_request(v).request_id  # to their user's partition: answered there
                 for _, v, _ in hostile.producer.on(hostile.stage.names.score_requests)}
    answered = set(got_recs) | forwarded
    for poll in mixed:
        for topic, _, value, must_die in poll:
            off = offsets[topic] = offsets.get(topic, -1) + 1
            if must_die is True:
                assert (topic, off) in dead
            elif must_die is False:
                assert (topic, off) not in dead
            elif (topic, off) not in dead:  # accepted: a valid event, processed
                ok = check_click(value) if topic == T.CLICKS else check_request(value)
                assert ok is not None
                if topic == T.SCORE_REQUESTS and ok.request_id is not None:
                    assert ok.request_id in answered
    assert "processing_error" not in dead.values()


def test_user_state_stays_bounded_by_max_users(ralm):
    h = _scoring(ralm, max_users=50)
    for p in range(20):
        h.poll(T.CLICKS, [(b"1", orjson.dumps({"user_id": HOSTILE_BASE + 100 * p + j,
                                               "item_id": HOSTILE_BASE + j}))
                          for j in range(100)])
        assert len(h.stage.users) <= 50
        assert len(h.stage.users.rows) <= 51


def test_profile_field_caches_are_bounded_like_the_zip_cache(ralm):
    h = _scoring(ralm)
    g_of, o_of, _ = h.stage._field_index
    g_of.update(dict.fromkeys(range(1_000_001), 0))  # as if 1M hostile genders were seen
    o_of.update(dict.fromkeys(range(1_000_001), 0))
    h.poll(T.CLICKS, [(b"1", orjson.dumps({"user_id": 1, "item_id": 2, "profile": {
        "gender": "g-new", "occupation": "o-new", "zip_code": "z-new"}}))])
    assert len(g_of) <= 1_000_001 and len(o_of) <= 1_000_001


# ============================================================ handlers: seed-centroids


@st.composite
def hostile_centroid_records(draw, model_k: int, dim: int):
    """(key, value, must be dead-lettered?) on seed-centroids."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.integers(0, 5))
    rec = ItemCentroids(rng.normal(size=(model_k, dim)).astype(np.float32),
                        np.ones(model_k, np.float32), 5, NOW, NOW, "t")
    hostile_item = key_of(HOSTILE_BASE + draw(st.integers(0, 10**6)))
    if kind == 0:  # corrupted
        return hostile_item, draw(mutated(encode_centroids(rec))), None
    if kind == 1:  # wrong shape for this table: k or dim off
        bad = ItemCentroids(rng.normal(size=(model_k + 1, dim)).astype(np.float32),
                            np.ones(model_k + 1, np.float32), 5, NOW, NOW, "t")
        return hostile_item, encode_centroids(bad), True
    if kind == 2:  # a bad key on a sound record
        return draw(st.sampled_from([None, b"", b"x", b"-1", str(2**63).encode(), b"9" * 19,
                                     b"9" * 20])), encode_centroids(rec), True
    if kind == 3:  # a tombstone of an unknown item: nothing to delete
        return hostile_item, None, False
    if kind == 4:  # NaN or infinite times
        rec.updated_at = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return hostile_item, encode_centroids(rec), True
    return hostile_item, encode_centroids(rec), False  # a valid record of a new item


@HANDLER_FUZZ
@given(st.data())
def test_table_reader_survives_hostile_centroids_and_good_items_are_unaffected(ralm, data):
    _, model = ralm
    hostile = [data.draw(hostile_centroid_records(model.k, model.dim))
               for _ in range(data.draw(st.integers(1, 12)))]
    h = _scoring(ralm)
    before = _table_rows(h)
    feeder: Feeder = h.stage.table_reader  # type: ignore[assignment]
    for key, value, _ in hostile:
        feeder.queue.append(h.record(T.SEED_CENTROIDS, key, value))
    h.stage.tick(time.time())  # must not raise
    h.stage.tick(time.time() + 1)
    after = _table_rows(h)
    for item, row in before.items():
        for a, b in zip(row, after[item]):
            np.testing.assert_array_equal(a, b)
    dead = dict(h.dead_letters(T.SEED_CENTROIDS))
    first = 40  # the good records took offsets 0..39
    for off, (_, _, must_die) in enumerate(hostile, start=first):
        if must_die is True:
            assert off in dead
        elif must_die is False:
            assert off not in dead
    assert set(dead.values()) <= set(BadEvent.REASONS) - {"processing_error"}


def _table_rows(h: Harness) -> dict[int, tuple]:
    t = h.stage.table
    return {item: (t.centroids[s].copy(), t.counts[s].copy(), t.n_seeds[s], t.versions[s])
            for item, s in t.slot_of.items() if item < HOSTILE_BASE}


def test_tombstones_of_unknown_items_do_not_pile_up(ralm):
    h = _scoring(ralm)
    feeder: Feeder = h.stage.table_reader  # type: ignore[assignment]
    for p in range(20):
        for j in range(100):
            feeder.queue.append(h.record(T.SEED_CENTROIDS, key_of(HOSTILE_BASE + 100 * p + j),
                                         None))
        h.stage.tick(time.time())
        h.stage.tick(time.time())  # an empty poll: caught up
    assert len(h.stage._pending_fresh) <= 100


def test_out_of_range_key_on_the_table_is_dead_lettered_not_a_crash(ralm):
    """Before the fix, a 19-digit key past int64 passed decode_key and the table's
    ``item_ids[slot] = item`` raised OverflowError out of tick: the worker died."""
    h = _scoring(ralm)
    _, model = ralm
    rec = ItemCentroids(np.ones((model.k, model.dim), np.float32), np.ones(model.k, np.float32),
                        5, NOW, NOW, "t")
    h.stage.table_reader.queue.append(h.record(T.SEED_CENTROIDS, b"9" * 19,
                                               encode_centroids(rec)))
    h.stage.tick(time.time())
    assert h.dead_letters(T.SEED_CENTROIDS) == [(40, "schema")]


# ============================================================ the loop itself


class _Fragile(Stage):
    """A stage whose decoder has a bug on some records (not a BadEvent)."""

    name = "fragile"
    topics = (T.CLICKS,)

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.handled: list[bytes] = []

    def decode(self, topic: str, record: ConsumerRecord) -> bytes:
        if record.value == b"boom":
            raise RuntimeError("decoder bug")
        return record.value

    def handle(self, events: list[Event]) -> None:
        self.handled.extend(ev.value for ev in events)


def test_a_decoder_bug_dead_letters_the_record_and_the_rest_go_on():
    h = Harness.of(_Fragile(_settings()))
    h.poll(T.CLICKS, [(b"1", b"a"), (b"1", b"boom"), (b"1", b"b")])
    assert h.stage.handled == [b"a", b"b"]  # type: ignore[attr-defined]
    assert h.dead_letters(T.CLICKS) == [(1, "processing_error")]

