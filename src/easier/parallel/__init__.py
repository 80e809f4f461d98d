"""The pieces of :mod:`easier.distributed`, split by job (import them from there).

- :mod:`.runtime`: the process group (join, describe, barrier, timeout, cleanup);
- :mod:`.loaders`: the seeded single-process loader and the sharded ones;
- :mod:`.collectives`: sums across ranks (entropy counters, accuracy, failure flags);
- :mod:`.passes`: DDP wrapping and the sharded entropy and evaluation passes.

Nothing here imports :mod:`easier.train`; training imports these, so the arrows point one way.
"""
