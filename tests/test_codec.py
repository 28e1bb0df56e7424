"""Wire formats: round trips, and every malformed input is a BadEvent with a reason."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.codec import (
    BadEvent,
    Click,
    ItemCentroids,
    Profile,
    SeedBatch,
    decode_centroids,
    decode_click,
    decode_click_checked,
    decode_score_request,
    decode_seeds,
    encode_centroid_rows,
    encode_centroids,
    encode_click,
    encode_seeds,
)

NOW = 1_700_000_000.0


def test_click_round_trip():
    c = Click(196, 242, 881250949.0, Profile(49.0, "M", "writer", "55105"))
    assert decode_click(encode_click(c), NOW) == c


_ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2**64), st.floats(allow_nan=False),
    st.sampled_from([0, 7, 2**63 - 1, 2**63, 1.0, 1.5, -0.0, 150, 150.5, NOW, NOW + 90_000]),
    st.text(max_size=70), st.sampled_from(["7", "０7", "²", "x" * 64, "x" * 65]),
    st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3),
                                                             st.integers(0, 3), max_size=2))
_PROFILE = st.one_of(_ANY_VALUE, st.dictionaries(
    st.sampled_from(["age", "gender", "occupation", "zip_code", "other"]), _ANY_VALUE))
_CLICK = st.dictionaries(st.sampled_from(["user_id", "item_id", "ts", "profile", "extra"]),
                         st.one_of(_ANY_VALUE, _PROFILE))


def _outcome(decode, raw: bytes):
    try:
        return decode(raw, NOW, 65536, NOW - 5.0)
    except BadEvent as e:
        return e.reason


@settings(max_examples=600, deadline=None)
@given(obj=_CLICK, fields=st.permutations(["user_id", "item_id", "ts", "profile", "extra"]))
def test_the_fast_click_decoder_agrees_with_the_checked_one(obj, fields):
    """Whatever arrives, ``decode_click`` (msgspec first) gives the click, or the reason,
    that the field-by-field decoder gives: the fast path accepts nothing the checks
    refuse, and what it declines goes to them."""
    ordered = {k: obj[k] for k in fields if k in obj}
    raw = json.dumps(ordered).encode()
    assert _outcome(decode_click, raw) == _outcome(decode_click_checked, raw)


@pytest.mark.parametrize("raw", [
    b'{"user_id": 1, "item_id": 2, "user_id": 3}', b'{"user_id": 1, "item_id": 2e0}',
    b'{"user_id": 1, "item_id": 2, "ts": 1e999}', b'{"user_id": 1, "item_id": 2, "ts": NaN}',
    b'{"user_id": 1, "item_id": 2, "profile": {"age": 1e999}}', b'\xef\xbb\xbf{"user_id": 1}',
    b'{"user_id": 1, "item_id": 2, "profile": {"gender": "\\ud800"}}',
    b' {"user_id": 1, "item_id": 2} ',
])
def test_the_fast_click_decoder_agrees_on_json_corner_cases(raw):
    assert _outcome(decode_click, raw) == _outcome(decode_click_checked, raw)


def test_click_ids_may_be_decimal_strings_and_ts_defaults_to_now():
    c = decode_click(b'{"user_id": "7", "item_id": 9}', NOW)
    assert (c.user_id, c.item_id, c.ts) == (7, 9, NOW)


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not_json"),
    (b"[1, 2]", "schema"),
    (b'{"item_id": 1}', "schema"),
    (b'{"user_id": -1, "item_id": 1}', "schema"),
    (b'{"user_id": true, "item_id": 1}', "schema"),
    (b'{"user_id": 1.5, "item_id": 1}', "schema"),
    (b'{"user_id": 1, "item_id": 1, "ts": "yesterday"}', "schema"),
    (b'{"user_id": 1, "item_id": 1, "ts": 1e300}', "schema"),
    (b'{"user_id": 1, "item_id": 1, "ts": -5}', "schema"),
    (b'{"user_id": 1, "item_id": 1, "profile": {"age": "old"}}', "schema"),
    (b'{"user_id": 1, "item_id": 1, "profile": {"gender": "' + b"x" * 100 + b'"}}', "schema"),
    (b'{"user_id": 1, "item_id": 1, "pad": "' + b"x" * 70_000 + b'"}', "oversized"),
    (None, "schema"),
])
def test_bad_clicks_have_reasons(raw, reason):
    with pytest.raises(BadEvent) as e:
        decode_click(raw, NOW)
    assert e.value.reason == reason


def test_score_request_validation():
    r = decode_score_request(b'{"user_id": 3, "k": 5, "request_id": "a"}', max_k=10)
    assert (r.user_id, r.k, r.request_id) == (3, 5, "a")
    for bad in (b'{"user_id": 3, "k": 0}', b'{"user_id": 3, "k": 11}', b'{"user_id": 3, "k": "5"}'):
        with pytest.raises(BadEvent):
            decode_score_request(bad, max_k=10)


def test_seed_batch_round_trip_and_corruption():
    rng = np.random.default_rng(0)
    b = SeedBatch(np.array([1, 2], np.int64), np.array([1.0, 2.0]),
                  rng.normal(size=(2, 8)).astype(np.float32), "ralm-x")
    out = decode_seeds(encode_seeds(b))
    np.testing.assert_array_equal(out.vectors, b.vectors)
    assert out.users.tolist() == [1, 2] and out.model_version == "ralm-x"
    raw = encode_seeds(b)
    for bad in (raw[:-1], b"XX" + raw[2:], None):
        with pytest.raises(BadEvent):
            decode_seeds(bad)
    nan = SeedBatch(b.users, b.ts, np.full((2, 8), np.nan, np.float32))
    with pytest.raises(BadEvent):
        decode_seeds(encode_seeds(nan))


def test_centroids_round_trip_and_tombstone():
    c = ItemCentroids(np.ones((3, 4), np.float32), np.array([2, 1, 0], np.float32), 3, NOW,
                      NOW - 1, "v1")
    out = decode_centroids(encode_centroids(c))
    np.testing.assert_array_equal(out.centroids, c.centroids)
    assert (out.n_seeds, out.updated_at, out.model_version) == (3, NOW, "v1")
    assert decode_centroids(None) is None


def test_float16_centroids_take_half_the_bytes_and_fall_back_when_they_would_overflow():
    rng = np.random.default_rng(0)
    c = ItemCentroids(rng.normal(size=(20, 128)).astype(np.float32), np.ones(20, np.float32),
                      9, NOW, NOW, "v1")
    half, full = encode_centroids(c, "float16"), encode_centroids(c)
    assert half[:2] == b"C2" and full[:2] == b"C1"
    assert len(full) - len(half) == 20 * 128 * 2
    out = decode_centroids(half)
    assert out.centroids.dtype == np.float32
    np.testing.assert_allclose(out.centroids, c.centroids, rtol=1e-3, atol=1e-3)
    big = ItemCentroids(c.centroids * 1e5, c.counts, 9, NOW, NOW, "v1")
    assert encode_centroids(big, "float16")[:2] == b"C1"  # float16 would overflow to inf
    with pytest.raises(BadEvent):
        decode_centroids(half[:-2])


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoders(raw):
    for decode in (lambda r: decode_click(r, NOW), lambda r: decode_score_request(r, 100),
                   decode_seeds, decode_centroids):
        try:
            decode(raw)
        except BadEvent:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=4),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(["user_id", "item_id", "ts", "profile", "k"]),
                       json_values, max_size=5))
def test_wrong_types_are_rejected_or_valid(obj):
    try:
        c = decode_click(json.dumps(obj).encode(), NOW)
    except BadEvent as e:
        assert e.reason in BadEvent.REASONS
        return
    assert isinstance(c.user_id, int) and c.user_id >= 0
    assert math.isfinite(c.ts) and 0 <= c.ts <= NOW + 86_400


def test_a_click_without_ts_takes_the_records_timestamp_every_time():
    raw = b'{"user_id": 7, "item_id": 9}'
    first = decode_click(raw, NOW, record_ts=NOW - 100.0)
    later = decode_click(raw, NOW + 50.0, record_ts=NOW - 100.0)  # re-read after a crash
    assert first.ts == later.ts == NOW - 100.0
    assert decode_click(raw, NOW).ts == NOW  # no record time: the wall clock, as before
    assert decode_click(b'{"user_id": 7, "item_id": 9, "ts": 5}', NOW,
                        record_ts=NOW - 100.0).ts == 5.0  # the producer's own ts wins
    with pytest.raises(BadEvent, match="future"):
        decode_click(raw, NOW, record_ts=NOW + 3 * 86400.0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_centroid_rows_encode_as_each_record_alone(dtype):
    """The batch encoder a clustering worker publishes with gives each item the bytes
    ``encode_centroids`` gives it: float16 where it fits, float32 where it would overflow."""
    rng = np.random.default_rng(4)
    n, k, d = 5, 3, 4
    cent = rng.normal(size=(n, k, d)).astype(np.float32)
    cent[2, 1, 0] = 1e5  # beyond float16: that item goes out as float32
    counts = rng.integers(0, 4, (n, k)).astype(np.float32)
    seeds = rng.integers(0, 100, n)
    last = rng.random(n) * 1e9
    versions = ["v1", "v1", "", "v22", "v1"]
    got = encode_centroid_rows(cent, counts, seeds, NOW, last, versions, dtype)
    want = [encode_centroids(ItemCentroids(cent[j], counts[j], int(seeds[j]), NOW,
                                           float(last[j]), versions[j]), dtype)
            for j in range(n)]
    assert got == want
    assert (got[0][:2], got[2][:2]) == ((b"C2", b"C1") if dtype == "float16" else (b"C1", b"C1"))
    assert encode_centroid_rows(cent[:0], counts[:0], seeds[:0], NOW, last[:0], [], dtype) == []
