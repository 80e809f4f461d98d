"""Everything on disk: atomic checksummed writes, the run directory and its lock, model records,
checkpoints users bring, and the fold artifacts of a run.

- :mod:`.atomic`: torn-free writes and ``checksums.json``;
- :mod:`.rundir`: :class:`RunDir` and its single-writer lock;
- :mod:`.records`: model records (architecture + edits + weights) and saved iterations;
- :mod:`.checkpoints`: state dicts and checkpoints in the forms training scripts write;
- :mod:`.artifacts`: ``folded.pt2`` and the other fold outputs of a run.
"""
