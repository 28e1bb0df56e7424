"""A per-second budget as a token bucket, one second deep.

The clustering worker spends two budgets this way (centroid records
published, item refreshes run), and the cluster bench spends the refresh
budget as the worker does.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second, at most one second's worth banked.

    The balance is the caller's (``fill`` takes it and returns it topped up),
    so a budget can live where it is spent (``ItemClusters.refresh_tokens``).
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.clock = rate, clock
        self.at = clock()

    def fill(self, balance: float) -> float:
        """``balance`` plus the tokens earned since the last fill, capped at ``rate``; a
        negative balance counts as none, an unlimited one fills the bucket at once."""
        t = self.clock()
        earned, self.at = self.rate * (t - self.at), t
        return min(self.rate, max(balance, 0.0) + earned)
