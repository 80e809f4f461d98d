"""The paper recipes against appendix Table 4 of the EASIER paper, values written out here."""

import pytest

from easier import ConfigError
from easier.train.finetune import FineTune
from easier.train.recipes import RECIPES, recipe

# Table 4: (epochs, batch, optimizer, momentum, lr, milestones, drop, weight decay)
TABLE4 = {
    ("resnet18", "cifar10"): (160, 128, "sgd", 0.9, 0.1, (80, 120), 0.1, 1e-4),
    ("swin_t", "cifar10"): (160, 128, "sgd", 0.9, 0.001, (80, 120), 0.1, 1e-4),
    ("mobilenet_v2", "cifar10"): (160, 128, "sgd", 0.9, 0.1, (80, 120), 0.1, 1e-4),
    ("vgg16_bn", "cifar10"): (160, 128, "sgd", 0.9, 0.01, (80, 120), 0.1, 1e-4),
    ("resnet18-imagenet", "tiny-imagenet"): (160, 128, "sgd", 0.9, 0.1, (80, 120), 0.1, 1e-4),
    ("swin_t", "tiny-imagenet"): (160, 128, "sgd", 0.9, 0.001, (80, 120), 0.1, 1e-4),
    ("mobilenet_v2", "tiny-imagenet"): (160, 128, "sgd", 0.9, 0.1, (80, 120), 0.1, 1e-4),
    ("vgg16_bn", "tiny-imagenet"): (160, 128, "sgd", 0.9, 0.01, (80, 120), 0.1, 1e-4),
    # PACS / VLCS, read through the imagefolder loader
    ("resnet18", "imagefolder:/data/pacs"): (30, 16, "sgd", 0.9, 0.001, (24,), 0.1, 5e-4),
    ("swin_t", "imagefolder:/data/vlcs"): (30, 16, "sgd", 0.9, 0.001, (24,), 0.1, 5e-4),
}


@pytest.mark.parametrize(("model", "data"), list(TABLE4))
def test_paper_recipe_is_table_4(model, data):
    epochs, batch, opt, mom, lr, milestones, gamma, wd = TABLE4[model, data]
    pre, ft = recipe("paper", model, data)
    assert pre == ft  # every iteration re-runs the full recipe
    assert (ft.epochs, ft.batch_size, ft.optimizer, ft.momentum) == (epochs, batch, opt, mom)
    assert ft.lr == pytest.approx(lr) and ft.weight_decay == pytest.approx(wd)
    assert (ft.schedule, ft.milestones, ft.gamma) == ("multistep", milestones, gamma)


def test_fast_recipe_is_short_and_unknown_names_are_refused():
    assert RECIPES == ("fast", "paper")
    pre, ft = recipe("fast", "resnet18", "cifar10")
    assert (pre.epochs, ft.epochs, pre.optimizer) == (3, 1, "sgd")
    assert ft.lr == pytest.approx(pre.lr / 5)
    pre, _ = recipe("fast", "swin_t", "cifar10")
    assert (pre.optimizer, pre.lr) == ("adamw", 1e-3)
    assert isinstance(pre, FineTune)
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe("slow", "resnet18", "cifar10")
    with pytest.raises(ConfigError, match="no recipe for dataset 'mnist5k'"):
        recipe("paper", "resnet18", "mnist5k")
