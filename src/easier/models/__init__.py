"""The paper's model zoo behind one registry: `create(name, ...)`, `list_models()`, specs.

Every model traces with plain `torch.fx.symbolic_trace` (shapes are fixed at construction from
`image_size`) and uses one activation module per call site, so each site can be measured and
linearized on its own. Any other nn.Module works with easier too; these are the paper's.
"""

from easier.models import mobilenet, resnet, small, swin, vgg  # noqa: F401  (fills the registry)
from easier.models._registry import (
    create,
    create_from_spec,
    list_models,
    register_model,
    spec_of,
)

__all__ = ["create", "create_from_spec", "list_models", "register_model", "spec_of"]
