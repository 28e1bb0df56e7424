"""Experiment runners: the evaluations and studies behind the docs' figures (``lookalike
evaluate ...``, ``lookalike study ...``). They drive the models; nothing below the
application imports them."""
