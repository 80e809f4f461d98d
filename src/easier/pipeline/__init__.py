"""Stage 6, the loop: :func:`easier.reduce` and what runs several methods side by side.

- :mod:`.settings`: the run's settings (:class:`StopRule`, :class:`RunConfig`);
- :mod:`.reduce`: start / resume / iterate / finish over a run state;
- :mod:`.scores`: what each iteration measures (accuracy, cost, stop limits);
- :mod:`.saving`: what each iteration writes;
- :mod:`.compare`, :mod:`.fronts`: several methods on one budget; accuracy vs folded latency.
"""
