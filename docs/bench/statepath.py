"""The clustering state path alone, at whatever commit is on PYTHONPATH: tells a code
regression from a slower machine (docs/bench.md, Results).

    git worktree add ../old <commit>
    PYTHONPATH=../old .venv/bin/python docs/bench/statepath.py old
    PYTHONPATH=. .venv/bin/python docs/bench/statepath.py new
"""

import sys

from engine.clustering import ItemClusters
from engine.config import load_settings
from lookalike.bench.cluster import seed_stream, seeds_in, state_path


def main(label: str, seeds: int = 600_000, rounds: int = 2) -> None:
    settings = load_settings(None)
    polls = seed_stream(seeds, 0)
    half = len(polls) // 2
    for _ in range(rounds):
        state = ItemClusters(settings.window)
        state_path(state, polls[:half], "warm-up")
        seconds = state_path(state, polls[half:], "measured")
        print(f"{label}: state path {seeds_in(polls[half:]) / seconds:,.0f} seed events/s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this commit")
