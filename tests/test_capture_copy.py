import warnings

import torch
from torch import nn

from easier.graph.capture import capture, copy_graph


def test_copy_of_a_capture_is_independent_equal_and_silent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(3)).eval()
    x = torch.randn(2, 1, 6, 6)
    model(x)
    gm = capture(model, x).gm
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's LeafSpec FutureWarning would raise here
        twin = copy_graph(gm)
    y = torch.randn(5, 1, 6, 6)
    assert torch.equal(twin(y)[0] if isinstance(twin(y), tuple) else twin(y), model(y))
    # editing the copy leaves the original as it was
    for p in twin.parameters():
        p.data.zero_()
    out = gm(y)
    assert torch.equal(out[0] if isinstance(out, tuple) else out, model(y))
