"""Training recipes: the paper's (appendix Table 4) and a short one for CPU runs."""

from __future__ import annotations

from easier.errors import ConfigError
from easier.train.finetune import FineTune

__all__ = ["RECIPES", "recipe"]

RECIPES = ("fast", "paper")

_PAPER_LR = {"resnet18": 0.1, "resnet18-imagenet": 0.1, "swin_t": 0.001, "mobilenet_v2": 0.1,
             "vgg16_bn": 0.01}


def _paper(model: str, dataset: str) -> FineTune:
    """Appendix Table 4 of the EASIER paper; every iteration re-runs it in full."""
    ds = dataset.split(":", 1)[0]
    if ds in ("cifar10", "tiny-imagenet"):
        return FineTune(epochs=160, batch_size=128, optimizer="sgd", momentum=0.9,
                        lr=_PAPER_LR.get(model, 0.1), schedule="multistep", milestones=(80, 120),
                        gamma=0.1, weight_decay=1e-4)
    if ds == "imagefolder":  # PACS/VLCS recipe; Flowers/DTD/Aircraft use adam (see README)
        return FineTune(epochs=30, batch_size=16, optimizer="sgd", momentum=0.9, lr=0.001,
                        schedule="multistep", milestones=(24,), gamma=0.1, weight_decay=5e-4)
    raise ConfigError(
        f"the paper has no recipe for dataset {ds!r} (it covers cifar10, tiny-imagenet and "
        "imagefolder exports of PACS/VLCS/Flowers/DTD/Aircraft); use --recipe fast"
    )


def recipe(name: str, model: str, dataset: str) -> tuple[FineTune, FineTune]:
    """(pretrain, fine-tune) schedules of a named recipe for a model and dataset."""
    if name == "paper":
        ft = _paper(model, dataset)
        return ft, ft
    if name == "fast":
        lr = 0.01 if model.startswith("swin") else 0.05
        opt = "adamw" if model.startswith("swin") else "sgd"
        if opt == "adamw":
            lr = 1e-3
        return (FineTune(epochs=3, lr=lr, optimizer=opt, batch_size=64),
                FineTune(epochs=1, lr=lr / 5, optimizer=opt, batch_size=64))
    raise ConfigError(f"unknown recipe {name!r}; valid recipes: {list(RECIPES)}")
