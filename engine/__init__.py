"""lookalike: streaming real-time look-alike recommendations (runtime)."""

__version__ = "0.1.0"
