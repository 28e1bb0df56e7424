"""Wire formats: JSON on external topics, compact binary on internal ones.

External topics (documented in docs/topics.md):

``clicks`` (key = user id)::

    {"user_id": 196, "item_id": 242, "ts": 881250949.0,
     "profile": {"age": 49, "gender": "M", "occupation": "writer", "zip_code": "55105"}}

``ts`` (unix seconds) and ``profile`` are optional; ids are non-negative
integers (a JSON number or a decimal string).

``score-requests`` (key = user id)::

    {"user_id": 196, "k": 10, "request_id": "r-1", "profile": {...}}

``recommendations`` (key = user id)::

    {"user_id": 196, "request_id": "r-1", "items": [{"item_id": 50, "score": 0.71}, ...],
     "model_version": "ralm-...", "request_seen_at": 1.7e9, "emitted_at": 1.7e9, "cold": false}

Internal topics pack many records per Kafka message (kafka-python's producer,
not the broker, is the throughput limit): a ``seed-events`` message carries
either all the seeds one scoring poll produced for one item (``S1``, key = the
item id) or, packed, the seeds of every item of one partition (``S2``, items
inside the value: :class:`SeedPack`); ``seed-centroids`` one item's whole
centroid table.

Every decoder raises :class:`BadEvent` with a bounded ``reason`` (a metric
label) and a human ``detail`` (a DLQ header).

Why one module of this size: each format's encoder sits beside its decoder, and
the limits every decoder enforces (sizes, magnitudes, id ranges) are defined once
for all of them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
import numpy as np
import orjson

MAX_ID = 2**63 - 1
MAX_K = 10_000
#: far-future guard for event times (a day of clock skew is tolerated)
FUTURE_SLACK_S = 86_400.0


class BadEvent(ValueError):
    """An event that cannot be processed: dead-lettered, never retried."""

    REASONS = ("not_json", "schema", "oversized", "bad_binary", "processing_error")

    def __init__(self, reason: str, detail: str):
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- JSON side


@dataclass(frozen=True)
class Profile:
    """What the user tower knows about a user besides their clicks."""

    age: float | None = None
    gender: str | None = None
    occupation: str | None = None
    zip_code: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Click:
    user_id: int
    item_id: int
    ts: float
    profile: Profile | None = None


@dataclass(frozen=True)
class ScoreRequest:
    user_id: int
    k: int | None = None
    request_id: str | None = None
    profile: Profile | None = None
    pipeline: str | None = None  # a name of scoring.pipelines (None: the default)
    explain: bool = False  # each item says which source proposed it and why it ranks


def _load_object(raw: bytes | None, max_bytes: int) -> dict:
    if raw is None:
        raise BadEvent("schema", "empty value")
    if len(raw) > max_bytes:
        raise BadEvent("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadEvent("not_json", str(e)[:200]) from None
    if not isinstance(obj, dict):
        raise BadEvent("schema", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _id(obj: dict, name: str) -> int:
    if name not in obj:
        raise BadEvent("schema", f"missing field '{name}'")
    v = obj[name]
    if isinstance(v, bool):
        raise BadEvent("schema", f"'{name}' must be an integer id, got a boolean")
    # ASCII only: str.isdigit() also accepts '²' and other digits int() refuses
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 19:
        v = int(v)
    if not isinstance(v, int) or not 0 <= v <= MAX_ID:
        raise BadEvent("schema", f"'{name}' must be a non-negative integer id, got {v!r:.60}")
    return v


def _opt_str(obj: dict, name: str, max_len: int = 64) -> str | None:
    v = obj.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise BadEvent("schema", f"'{name}' must be a string of at most {max_len} chars")
    return v


def _profile(obj: dict) -> Profile | None:
    p = obj.get("profile")
    if p is None:
        return None
    if not isinstance(p, dict):
        raise BadEvent("schema", "'profile' must be an object")
    age = p.get("age")
    # the same profile arrives with every click of a user: reuse the validated object
    key = (type(age), age, p.get("gender"), p.get("occupation"), p.get("zip_code"))
    try:
        hit = _PROFILES.get(key)
    except TypeError:  # an unhashable field (list, object): invalid, reported below
        hit = None
    if hit is not None:
        return hit
    if age is not None:
        if isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 <= age <= 150:
            raise BadEvent("schema", f"'profile.age' must be a number in [0, 150], got {age!r:.40}")
        age = float(age)
    prof = Profile(
        age=age,
        gender=_opt_str(p, "gender"),
        occupation=_opt_str(p, "occupation"),
        zip_code=_opt_str(p, "zip_code"),
    )
    if len(_PROFILES) >= _MAX_PROFILES:
        _PROFILES.clear()
    _PROFILES[key] = prof
    return prof


#: validated profiles by their raw fields (the key includes the age's type:
#: ``True == 1``, and a boolean age is invalid); bounded, cleared when full
_PROFILES: dict[tuple, Profile] = {}
_WIRE_PROFILES: dict[_ProfileWire, Profile] = {}  # the same for decode_click's fast path
_MAX_PROFILES = 200_000


def _ts(obj: dict, now: float, default: float | None = None) -> float:
    v = obj.get("ts")
    if v is None:
        if default is None:
            return now
        v = default  # checked as a producer's own ts would be
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadEvent("schema", f"'ts' must be a finite number of unix seconds, got {v!r:.40}")
    if v < 0 or v > now + FUTURE_SLACK_S:
        raise BadEvent("schema", f"'ts' {v} is negative or in the future")
    return float(v)


def decode_click(raw: bytes | None, now: float, max_bytes: int = 65536,
                 record_ts: float | None = None) -> Click:
    """A click; without a ``ts`` it takes ``record_ts`` (the Kafka record's timestamp, in
    seconds), else ``now``. Why the record's: it is the same on every read, so a click
    re-read after a crash is the same click (the seed window drops it), where the wall
    clock at decode time would make it a newer one, admitted and counted again.

    A click as producers send it (integer ids, a number ``ts``) is decoded into a typed
    struct in one pass (msgspec); anything else, valid or not, takes
    :func:`decode_click_checked`, which says what is wrong. Both give the same click
    (tested over generated input)."""
    if raw is not None and len(raw) <= max_bytes:
        try:
            w = _CLICK_WIRE.decode(raw)
        except msgspec.MsgspecError:
            w = None
        if w is not None:
            ts = (now if record_ts is None else record_ts) if w.ts is None else w.ts
            if 0.0 <= ts <= now + FUTURE_SLACK_S:  # NaN fails too
                return Click(w.user_id, w.item_id, float(ts),
                             None if w.profile is None else _wire_profile(w.profile))
    return decode_click_checked(raw, now, max_bytes, record_ts)


def decode_click_checked(raw: bytes | None, now: float, max_bytes: int = 65536,
                         record_ts: float | None = None) -> Click:
    """:func:`decode_click` field by field, with a :class:`BadEvent` naming what is wrong."""
    obj = _load_object(raw, max_bytes)
    return Click(_id(obj, "user_id"), _id(obj, "item_id"), _ts(obj, now, record_ts),
                 _profile(obj))


_WireId = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
_WireStr = Annotated[str, msgspec.Meta(max_length=64)]


class _ProfileWire(msgspec.Struct, frozen=True):
    age: Annotated[float, msgspec.Meta(ge=0, le=150)] | None = None
    gender: _WireStr | None = None
    occupation: _WireStr | None = None
    zip_code: _WireStr | None = None


class _ClickWire(msgspec.Struct):
    user_id: _WireId
    item_id: _WireId
    ts: float | None = None
    profile: _ProfileWire | None = None


_CLICK_WIRE = msgspec.json.Decoder(_ClickWire)


def _wire_profile(w: _ProfileWire) -> Profile:
    """One :class:`Profile` per distinct profile, as ``_profile`` keeps them."""
    prof = _WIRE_PROFILES.get(w)
    if prof is None:
        if len(_WIRE_PROFILES) >= _MAX_PROFILES:
            _WIRE_PROFILES.clear()
        prof = _WIRE_PROFILES[w] = Profile(w.age, w.gender, w.occupation, w.zip_code)
    return prof


def encode_click(c: Click) -> bytes:
    obj: dict = {"user_id": c.user_id, "item_id": c.item_id, "ts": c.ts}
    if c.profile is not None:
        obj["profile"] = c.profile.to_json()
    return orjson.dumps(obj)


def _k_and_request_id(obj: dict, max_k: int) -> tuple[int | None, str | None]:
    """The optional ``k`` (1..max_k) and ``request_id`` (echoed back) of a request."""
    k = obj.get("k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k):
        raise BadEvent("schema", f"'k' must be an integer in [1, {max_k}], got {k!r:.40}")
    rid = obj.get("request_id")
    if rid is not None and (not isinstance(rid, str | int) or len(str(rid)) > 128):
        raise BadEvent("schema", "'request_id' must be a string of at most 128 chars")
    return k, None if rid is None else str(rid)


def decode_score_request(raw: bytes | None, max_k: int, max_bytes: int = 65536) -> ScoreRequest:
    obj = _load_object(raw, max_bytes)
    k, rid = _k_and_request_id(obj, max_k)
    explain = obj.get("explain", False)
    if not isinstance(explain, bool):
        raise BadEvent("schema", f"'explain' must be true or false, got {explain!r:.40}")
    return ScoreRequest(_id(obj, "user_id"), k, rid, _profile(obj), _opt_str(obj, "pipeline"),
                        explain)


@dataclass(frozen=True)
class AudienceRequest:
    """Who looks like an item's seeds: the top ``k`` users for ``item_id``."""

    item_id: int
    k: int | None = None
    request_id: str | None = None


def decode_audience_request(raw: bytes | None, max_k: int,
                            max_bytes: int = 65536) -> AudienceRequest:
    obj = _load_object(raw, max_bytes)
    k, rid = _k_and_request_id(obj, max_k)
    return AudienceRequest(_id(obj, "item_id"), k, rid)


@dataclass(frozen=True)
class ModelAnnouncement:
    """A new checkpoint every scoring worker should load (the ``models`` topic)."""

    kind: str  # "ralm"
    path: str  # a path the workers can read
    version: str | None = None


MODEL_KINDS = ("ralm",)


def decode_model_announcement(raw: bytes | None, max_bytes: int = 65536) -> ModelAnnouncement:
    obj = _load_object(raw, max_bytes)
    kind = obj.get("kind")
    if kind not in MODEL_KINDS:
        raise BadEvent("schema", f"'kind' must be one of {MODEL_KINDS}, got {kind!r:.40}")
    path = obj.get("path")
    if not isinstance(path, str) or not 0 < len(path) <= 4096 or "\x00" in path:
        raise BadEvent("schema", "'path' must be a non-empty string of at most 4096 chars")
    return ModelAnnouncement(kind, path, _opt_str(obj, "version", 128))


def encode_json(obj: dict) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def key_of(entity_id: int) -> bytes:
    """Message keys are the decimal id: readable in any Kafka tool."""
    return str(entity_id).encode()


def decode_key(raw: bytes | None) -> int:
    if raw is None or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_ID:
        # 19 digits reach past int64: numpy id arrays would overflow on such an id
        raise BadEvent("schema", f"key must be a decimal id, got {raw!r:.40}")
    return int(raw)


# -------------------------------------------------------------- binary side

_SEED_HEAD = struct.Struct("<2sIH")  # magic, n, dim
_SEED_MAGIC = b"S1"
_PACK_HEAD = struct.Struct("<2sIIH")  # magic, items, seeds, dim
_PACK_MAGIC = b"S2"
PACK_MAGIC = _PACK_MAGIC  # how a reader tells an S2 pack from an S1 batch
SEED_MAGIC = _SEED_MAGIC
_CENT_HEAD = struct.Struct("<2sHHIdd")  # magic, k, dim, n_seeds, updated_at, last_seed_ts
_CENT_MAGIC = b"C1"
_CENT16_MAGIC = b"C2"  # the same record with float16 centroids: half the bytes on the wire
_F16_SAFE = 6.0e4  # larger magnitudes overflow float16: such a record goes out as C1
_MAX_DIM = 4096
MAX_DIM = _MAX_DIM  # the largest embedding a binary record may carry
#: largest |component| of a centroid on the wire (and of a seed, checked by the
#: clustering worker). Why: squared and summed over a dim (k-means distances, the
#: table's Gram matrices) larger ones overflow float32 to inf; embeddings are far smaller
MAX_ABS = 1e6
#: an S1 record's head with its version's length: what a poll-wide decoder reads first
SEED_HEAD_WITH_VERSION = struct.Struct("<2sIHH")


def _version_at(raw: bytes, off: int) -> tuple[str, int]:
    """The model version string at ``off`` (u16 length, utf-8) and the offset after it."""
    (vlen,) = struct.unpack_from("<H", raw, off)
    off += 2
    return raw[off:off + vlen].decode("utf-8", "replace"), off + vlen


def _seed_bytes(users: np.ndarray, ts: np.ndarray, vectors: np.ndarray) -> list[bytes]:
    """The seed columns as S1 and S2 both lay them out: users, timestamps, vectors."""
    return [np.ascontiguousarray(users, "<i8").tobytes(),
            np.ascontiguousarray(ts, "<f8").tobytes(),
            np.ascontiguousarray(vectors, "<f4").tobytes()]


def _seed_arrays(raw: bytes, off: int, n: int, dim: int,
                 what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_seed_bytes`` read back (zero-copy), rejecting negative ids and non-finite values."""
    users = np.frombuffer(raw, "<i8", n, off)
    ts = np.frombuffer(raw, "<f8", n, off + 8 * n)
    vec = np.frombuffer(raw, "<f4", n * dim, off + 16 * n).reshape(n, dim)
    if (users < 0).any() or not np.isfinite(ts).all() or not np.isfinite(vec).all():
        raise BadEvent("bad_binary", f"negative id or non-finite value in {what}")
    return users, ts, vec


@dataclass
class SeedBatch:
    """Seeds of one item from one scoring poll (item id is the message key)."""

    users: np.ndarray  # int64 [n]
    ts: np.ndarray  # float64 [n]
    vectors: np.ndarray  # float32 [n, d]
    model_version: str = ""


def encode_seeds(b: SeedBatch) -> bytes:
    n, dim = b.vectors.shape
    ver = b.model_version.encode()
    return b"".join([
        _SEED_HEAD.pack(_SEED_MAGIC, n, dim),
        struct.pack("<H", len(ver)), ver,
        *_seed_bytes(b.users, b.ts, b.vectors),
    ])


def decode_seeds(raw: bytes | None) -> SeedBatch:
    if raw is None or len(raw) < _SEED_HEAD.size + 2:
        raise BadEvent("bad_binary", "seed batch too short")
    magic, n, dim = _SEED_HEAD.unpack_from(raw)
    if magic != _SEED_MAGIC or not 0 < dim <= _MAX_DIM:
        raise BadEvent("bad_binary", f"not a seed batch (magic {magic!r}, dim {dim})")
    off = _SEED_HEAD.size
    ver, off = _version_at(raw, off)
    need = off + n * (8 + 8 + 4 * dim)
    if len(raw) != need:
        raise BadEvent("bad_binary", f"seed batch of {n}x{dim} needs {need} bytes, got {len(raw)}")
    return SeedBatch(*_seed_arrays(raw, off, n, dim, "seed batch"), ver)


@dataclass
class SeedPack:
    """Seeds of many items in one message (``S2``): item ``items[i]`` owns rows
    ``starts[i]:starts[i + 1]`` of ``users``/``ts``/``vectors``.

    Why: kafka-python produces ~15-60k messages/s whatever their size, while a
    scoring poll touches nearly one distinct item per click (Zipf over 43.5k
    items); one message per partition and poll lifts that limit. The producer
    picks the partition the item's own key would hash to, so ownership of an
    item's state is the same as with ``S1``.
    """

    items: np.ndarray  # int64 [m]
    starts: np.ndarray  # int64 [m + 1], starts[0] = 0, starts[m] = n
    users: np.ndarray  # int64 [n]
    ts: np.ndarray  # float64 [n]
    vectors: np.ndarray  # float32 [n, d]
    model_version: str = ""

    def batches(self) -> list[tuple[int, SeedBatch]]:
        """(item, its seeds) in order: the ``S1`` view of the pack."""
        st = self.starts.tolist()
        return [(item, SeedBatch(self.users[a:b], self.ts[a:b], self.vectors[a:b],
                                 self.model_version))
                for item, a, b in zip(self.items.tolist(), st[:-1], st[1:], strict=True)]


def encode_seed_pack(p: SeedPack) -> bytes:
    n, dim = p.vectors.shape
    ver = p.model_version.encode()
    counts = np.diff(np.asarray(p.starts, np.int64))
    return b"".join([
        _PACK_HEAD.pack(_PACK_MAGIC, len(p.items), n, dim),
        struct.pack("<H", len(ver)), ver,
        np.ascontiguousarray(p.items, "<i8").tobytes(),
        np.ascontiguousarray(counts, "<u4").tobytes(),
        *_seed_bytes(p.users, p.ts, p.vectors),
    ])


def decode_seed_pack(raw: bytes | None) -> SeedPack:
    if raw is None or len(raw) < _PACK_HEAD.size + 2:
        raise BadEvent("bad_binary", "seed pack too short")
    magic, m, n, dim = _PACK_HEAD.unpack_from(raw)
    if magic != _PACK_MAGIC or not 0 < dim <= _MAX_DIM:
        raise BadEvent("bad_binary", f"not a seed pack (magic {magic!r}, dim {dim})")
    off = _PACK_HEAD.size
    ver, off = _version_at(raw, off)
    need = off + 12 * m + n * (8 + 8 + 4 * dim)
    if len(raw) != need:
        raise BadEvent("bad_binary", f"seed pack of {m} items, {n}x{dim} needs {need} bytes, "
                       f"got {len(raw)}")
    items = np.frombuffer(raw, "<i8", m, off)
    counts = np.frombuffer(raw, "<u4", m, off + 8 * m)
    starts = np.zeros(m + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    if starts[-1] != n or (items < 0).any():
        raise BadEvent("bad_binary", "seed pack counts do not add up, or a negative item id")
    return SeedPack(items, starts, *_seed_arrays(raw, off + 12 * m, n, dim, "seed pack"), ver)


def decode_seed_message(key: bytes | None, raw: bytes | None) -> list[tuple[int, SeedBatch]]:
    """(item, seeds) of one ``seed-events`` message, ``S1`` (item = key) or ``S2``."""
    if raw is not None and raw[:2] == _PACK_MAGIC:
        return decode_seed_pack(raw).batches()
    return [(decode_key(key), decode_seeds(raw))]


@dataclass
class ItemCentroids:
    """One row of the compacted centroid table (item id is the key)."""

    centroids: np.ndarray  # float32 [k, d]
    counts: np.ndarray  # float32 [k]; 0 marks an empty slot
    n_seeds: int
    updated_at: float  # wall clock of the publishing worker
    last_seed_ts: float = 0.0  # newest seed's event time
    model_version: str = ""
    extra: dict = field(default_factory=dict)


def encode_centroids(c: ItemCentroids, dtype: str = "float32") -> bytes:
    """``C1`` (float32 centroids) or, with ``dtype="float16"``, ``C2``: a clustering
    worker's publishing is bound by kafka-python's producer, which sends ~1.5x more
    5 KB messages than 10 KB ones per second. Counts stay float32."""
    k, dim = c.centroids.shape
    ver = c.model_version.encode()
    half = dtype == "float16" and float(np.abs(c.centroids).max(initial=0.0)) < _F16_SAFE
    return b"".join([
        _CENT_HEAD.pack(_CENT16_MAGIC if half else _CENT_MAGIC, k, dim, c.n_seeds,
                        c.updated_at, c.last_seed_ts),
        struct.pack("<H", len(ver)), ver,
        np.ascontiguousarray(c.counts, "<f4").tobytes(),
        np.ascontiguousarray(c.centroids, "<f2" if half else "<f4").tobytes(),
    ])


def encode_centroid_rows(centroids: np.ndarray, counts: np.ndarray, n_seeds: np.ndarray,
                         updated_at: float, last_seed_ts: np.ndarray, versions: list[str],
                         dtype: str = "float32") -> list[bytes]:
    """``encode_centroids`` of many items at once (centroids [n, k, d], counts [n, k]):
    the same bytes per item (tested), with the array conversions done once for all.
    Why: a clustering worker publishes thousands of records a second, and converting
    them one at a time was most of what a record cost it (bench cluster)."""
    n, k, dim = centroids.shape
    if not n:
        return []
    half = (np.full(n, False) if dtype != "float16" else
            np.abs(centroids).max(axis=(1, 2)) < _F16_SAFE)
    with np.errstate(over="ignore"):  # rows too large for float16 go out as float32
        c16 = np.ascontiguousarray(centroids, "<f2").reshape(n, -1).view(np.uint8) \
            if half.any() else None
    c32 = np.ascontiguousarray(centroids, "<f4").reshape(n, -1).view(np.uint8) \
        if not half.all() else None
    cnt = np.ascontiguousarray(counts, "<f4").reshape(n, -1).view(np.uint8)
    vers = {v: struct.pack("<H", len(b := v.encode())) + b for v in set(versions)}
    pack, out = _CENT_HEAD.pack, []
    for j, (h, seeds, last, ver) in enumerate(zip(half.tolist(), n_seeds.tolist(),
                                                  last_seed_ts.tolist(), versions, strict=True)):
        body = c16[j] if h else c32[j]  # type: ignore[index]
        out.append(b"".join([pack(_CENT16_MAGIC if h else _CENT_MAGIC, k, dim, seeds,
                                  updated_at, last), vers[ver], cnt[j], body]))
    return out


def decode_centroids(raw: bytes | None) -> ItemCentroids | None:
    """``None`` for a tombstone (the item was deleted)."""
    if raw is None:
        return None
    if len(raw) < _CENT_HEAD.size + 2:
        raise BadEvent("bad_binary", "centroid record too short")
    magic, k, dim, n_seeds, updated, last_ts = _CENT_HEAD.unpack_from(raw)
    if magic not in (_CENT_MAGIC, _CENT16_MAGIC) or not 0 < dim <= _MAX_DIM or not 0 < k <= MAX_K:
        raise BadEvent("bad_binary", f"not a centroid record (magic {magic!r}, k {k}, dim {dim})")
    off = _CENT_HEAD.size
    ver, off = _version_at(raw, off)
    width = 2 if magic == _CENT16_MAGIC else 4
    need = off + 4 * k + width * k * dim
    if len(raw) != need:
        raise BadEvent("bad_binary", f"centroids {k}x{dim} need {need} bytes, got {len(raw)}")
    counts = np.frombuffer(raw, "<f4", k, off)
    cent = np.frombuffer(raw, f"<f{width}", k * dim, off + 4 * k).reshape(k, dim)
    cent = cent.astype(np.float32) if width == 2 else cent
    if (not np.isfinite(cent).all() or not np.isfinite(counts).all() or (counts < 0).any()
            or not (math.isfinite(updated) and math.isfinite(last_ts))):
        # a NaN time would turn the centroid-age gauge and freshness figures into NaN
        raise BadEvent("bad_binary", "non-finite or negative value in centroid record")
    if cent.size and max(float(cent.max()), -float(cent.min())) > MAX_ABS:
        raise BadEvent("bad_binary", f"centroid component beyond {MAX_ABS:g}")
    return ItemCentroids(cent, counts, n_seeds, updated, last_ts, ver)
