"""What a person reads: report files, the dense-vs-returned outcome, progress lines.

- :mod:`.files`: history as JSON lines, CSV, markdown and a figure;
- :mod:`.outcome`: the dense model vs the model returned, side by side;
- :mod:`.progress`: progress bars and the one line per iteration.
"""
