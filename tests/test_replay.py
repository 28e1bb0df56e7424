"""Replay pacing: the schedule each speed setting asks for (no wall-clock assertions)."""

import numpy as np
import pytest

from consumers.replay import Pacer
from engine.data import profiles_of


def test_fixed_rate_schedules_evenly():
    p = Pacer(np.array([0.0, 50.0, 51.0, 900.0]), rate=100.0, speedup=None)
    np.testing.assert_allclose(p.offsets, [0, 0.01, 0.02, 0.03])


def test_speedup_compresses_the_dataset_clock():
    p = Pacer(np.array([1000.0, 1060.0, 4600.0]), rate=None, speedup=3600.0)
    np.testing.assert_allclose(p.offsets, [0, 60 / 3600, 1.0])


def test_as_fast_as_possible_has_no_schedule():
    assert Pacer(np.array([1.0, 2.0]), None, None).offsets is None


@pytest.mark.parametrize("rate, speedup", [(0.0, None), (-1.0, None), (None, -2.0)])
def test_nonsense_speeds_are_refused(rate, speedup):
    with pytest.raises(ValueError):
        Pacer(np.array([1.0]), rate, speedup)


def test_profiles_follow_the_user_table(ml100k):
    profiles = profiles_of(ml100k)
    one = profiles[ml100k.user_index()[1]]
    assert (one.age, one.gender, one.occupation, one.zip_code) == (24.0, "M", "technician",
                                                                   "85711")
