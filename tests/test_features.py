"""RALM feature space: vocabularies, unknown values, truncation, serialisation, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engine.data import Dataset, Items, Users, build_dataset
from models.features import ClickLog, FeatureSpace, Profile, zip_prefix


def _dataset() -> Dataset:
    """4 users, 5 items (id 50 never clicked, user 4 never clicks)."""
    users = Users(
        ids=[1, 2, 3, 4], age=[24, np.nan, 70, 33], gender=["M", "F", "", "F"],
        occupation=["writer", "student", "writer", "pilot"],
        zip_code=["55105", "94043", "T8H1B", "10001"],
    )
    items = Items(
        ids=[10, 20, 30, 40, 50], title=list("abcde"), year=[1995] * 5,
        genres=[("Drama",), ("Comedy", "Drama"), (), ("Action",), ("Western",)],
    )
    clicks = [(1, 10, 1.0), (1, 20, 2.0), (1, 30, 3.0), (2, 20, 1.5), (2, 40, 2.5),
              (3, 20, 4.0), (1, 20, 5.0)]
    u, i, t = (np.array(c) for c in zip(*clicks, strict=True))
    return build_dataset("tiny", u, i, np.ones(len(u)), t, users, items)


@pytest.fixture(scope="module")
def space() -> FeatureSpace:
    return FeatureSpace.build(_dataset(), history_len=3)


def test_vocabularies_hold_training_values_only(space: FeatureSpace) -> None:
    assert space.genders == ("F", "M")  # "" is unknown, not a value
    assert space.occupations == ("student", "writer")  # user 4 (pilot) never clicked
    assert space.zip_prefixes == ("551", "940", "T8H")
    assert space.genres == ("Action", "Comedy", "Drama", "Western")
    # most clicked first: 20 (4 clicks), then 10, 30, 40 by id; 50 has no embedding
    assert space.item_ids == (20, 10, 30, 40)
    assert space.item_counts == (4, 1, 1, 1)
    assert space.max_activity == 4


def test_state_round_trip(space: FeatureSpace) -> None:
    state = space.to_state()
    assert all(isinstance(v, (list, int)) for v in state.values())
    again = FeatureSpace.from_state(state)
    assert again == space
    profiles = [Profile(age=30, gender="F", occupation="writer", zip_code="94043")]
    a, b = space.encode(profiles, [[10, 20]]), again.encode(profiles, [[10, 20]])
    for name in ("categorical", "items", "genres", "continuous"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_unknown_values_map_to_zero(space: FeatureSpace) -> None:
    b = space.encode(
        [Profile(gender="X", occupation="astronaut", zip_code="99999"), None, Profile()],
        [[999, -1, 2**62], [], [50]],
    )
    assert b.categorical.tolist() == [[0, 0, 0]] * 3
    assert b.items.tolist() == [[0, 0, 0]] * 3
    # item 50 has no id embedding (never clicked) but its genre is known
    western = 1 + space.genres.index("Western")
    assert b.genres[2].tolist() == [1.0 if g == western else 0.0 for g in range(5)]
    assert b.genres[:2].sum().item() == 0
    assert b.continuous[:, :2].tolist() == [[0.0, 0.0]] * 3  # unknown age


def test_encoding_of_known_values(space: FeatureSpace) -> None:
    b = space.encode([Profile(age=49, gender="M", occupation="writer", zip_code="55105-1")],
                     [[20, 10, 20]])
    assert b.categorical.tolist() == [[2, 2, 1]]
    assert b.items.tolist() == [[1, 2, 1]]
    drama, comedy = 1 + space.genres.index("Drama"), 1 + space.genres.index("Comedy")
    assert b.genres[0, drama].item() == 3 and b.genres[0, comedy].item() == 2
    age, known, activity = b.continuous[0].tolist()
    assert age == pytest.approx(0.49) and known == 1.0
    assert activity == pytest.approx(np.log1p(3) / np.log1p(4))


def test_history_keeps_the_last_clicks(space: FeatureSpace) -> None:
    b = space.encode([None, None], [[10, 30, 40, 20, 10], [40]], activity=[100, 1])
    assert b.items.tolist() == [[4, 1, 2], [4, 0, 0]]  # 40, 20, 10 — most recent last
    assert b.continuous[0, 2].item() == 1.0  # activity clipped to [0, 1]


def test_history_length_50_by_default() -> None:
    space = FeatureSpace.build(_dataset())
    b = space.encode([None], [[10, 20] * 40 + [30]])
    assert b.items.shape == (1, 50)
    assert b.items[0, -1].item() == 3  # the most recent click, item 30, kept
    assert (b.items[0, :-1] > 0).all()


def test_age_and_zip_edge_cases(space: FeatureSpace) -> None:
    b = space.encode([Profile(age=150), Profile(age=-3), Profile(age="n/a")], [[], [], []])
    assert b.continuous[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert b.continuous[:, 1].tolist() == [1.0, 1.0, 0.0]
    assert zip_prefix(" t8h1b ") == "T8H" and zip_prefix("") is None and zip_prefix(None) is None


def test_click_log_windows_cut_history_in_time() -> None:
    ds = _dataset()
    space = FeatureSpace.build(ds, history_len=2)
    log = ClickLog(ds, space)
    u1 = int(np.flatnonzero(ds.users.ids == 1)[0])
    ends = log.position_before(np.array([u1]), 3.5)  # before t=3.5 user 1 clicked 10, 20, 30
    assert (ends - log.indptr[u1]).tolist() == [3]
    rows = log.windows(np.array([u1]), ends)
    assert space.catalog_ids[rows[0, 0] - 1] == 20 and space.catalog_ids[rows[0, 1] - 1] == 30
    # the same user through the online path gives the same batch
    online = space.encode([Profile(age=24, gender="M", occupation="writer", zip_code="55105")],
                          [[10, 20, 30]])
    offline = log.encode(np.array([u1]), ends)
    for name in ("categorical", "items", "genres", "continuous"):
        assert torch.allclose(getattr(online, name), getattr(offline, name))


def test_encoding_is_fast(space: FeatureSpace) -> None:
    """A scoring poll's worth of users (300 × 50 clicks) encodes in a few milliseconds."""
    big = FeatureSpace.from_state(space.to_state() | {"history_len": 50})
    rng = np.random.default_rng(0)
    histories = [rng.choice([10, 20, 30, 40, 7], 60).tolist() for _ in range(300)]
    profiles = [Profile(age=30, gender="F", occupation="writer", zip_code="55105")] * 300
    big.encode(profiles, histories)
    t = time.perf_counter()
    for _ in range(5):
        big.encode(profiles, histories)
    per_call = (time.perf_counter() - t) / 5
    assert per_call < 0.05, f"{per_call * 1e3:.1f} ms for 300 users"
