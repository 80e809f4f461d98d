"""Stage 2, entropy: count ON/OFF states at every site and turn them into layer entropies.

- :mod:`.counters`: observer-like counters inserted in the captured graph;
- :mod:`.estimate`: the entropy pass over the data (:func:`measure_entropy`);
- :mod:`.report`: :class:`EntropyReport`, per-neuron statistics and the ranking;
- :mod:`.train_counts`: counts taken during training (the reference code's last-epoch entropy).
"""
