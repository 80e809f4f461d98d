"""Stage 1, the graph: capture a model with ``torch.export`` and find its activation call sites.

- :mod:`.capture`: the exported program (:class:`Capture`), model calls, eval mode;
- :mod:`.activations`: what an activation *computes* (op recognition, module kinds);
- :mod:`.neuron_axis`: which axis of a pre-activation holds the neurons;
- :mod:`.sites`: the activation call sites, named by module path.
"""
