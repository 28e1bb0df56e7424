"""The scoring worker's user state: rings of recent clicks, LRU eviction, no leaks between users."""

from __future__ import annotations

from engine.codec import Click
from engine.user_store import UserStore


def test_history_and_seen_are_the_recent_clicks_in_order() -> None:
    store = UserStore(history_len=3, max_users=10, max_seen=5)
    for i in range(8):
        st = store.click(Click(1, 100 + i, float(i)))
    assert st.history == [105, 106, 107]
    assert sorted(st.seen.tolist()) == [103, 104, 105, 106, 107]
    assert st.clicks == 8 and st.last_ts == 7.0


def test_an_evicted_users_slot_carries_nothing_to_the_next_user() -> None:
    store = UserStore(history_len=4, max_users=2, max_seen=6)
    for i in range(5):
        store.click(Click(1, 500 + i, 0.0))
    store.click(Click(2, 600, 0.0))
    store.click(Click(3, 700, 0.0))  # evicts user 1, the least recently active
    assert store.get(1) is None and len(store) == 2
    st = store.click(Click(4, 800, 0.0))  # evicts user 2; slots get reused
    assert st.history == [800] and st.seen.tolist() == [800]
    assert store.get(3).seen.tolist() == [700]
