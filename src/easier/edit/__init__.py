"""Stage 3, edits: switch activation sites to identity (or an affine map) in the eager model.

- :mod:`.switches`: the per-site switch that replaces an activation without touching user code;
- :mod:`.linearize`: :func:`linearize` and the edit records a checkpoint replays;
- :mod:`.padding`: padding relocation so that a later fold is exact at the borders;
- :mod:`.affine`: the least-squares affine replacement of an activation;
- :mod:`.recalibrate`: batch-norm re-estimation after an edit.
"""
