"""Stage 5, performance: paired wall-clock timing, FLOPs, latency, depth.

- :mod:`.timing`: the one paired-timing implementation (the library and ``bench/`` use it);
- :mod:`.measure`: :func:`measure` — params, FLOPs, latency, depth, activations left.
"""
