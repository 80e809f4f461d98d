"""Models users bring: Hugging Face transformers built from config objects, and a timm-style
fused BN-act block. Sites, entropy, linearize and fold are checked against independent counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import easier

T = pytest.importorskip("transformers")


def _hf(name: str) -> tuple[nn.Module, dict[str, torch.Tensor], int]:
    """(model, example input, hand-counted activation calls) for a tiny config."""
    ids = {"input_ids": torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))}
    pix = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    if name == "bert":  # 2 layers x GELUActivation; the pooler's Tanh is not a rectifier
        cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, vocab_size=100)
        return T.BertForSequenceClassification(cfg), ids, 2
    if name == "distilbert":  # 2 GELU + the classifier's nn.ReLU()(x) made inside forward
        cfg = T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100)
        return T.DistilBertForSequenceClassification(cfg), ids, 3
    if name == "gpt2":  # NewGELUActivation: the tanh formula, no gelu op
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, use_cache=False,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return T.GPT2ForSequenceClassification(cfg), ids, 2
    if name == "vit":
        cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, image_size=32, patch_size=8)
        return T.ViTForImageClassification(cfg), pix, 2
    if name == "swin":
        cfg = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                           num_heads=[2, 2], window_size=4)
        return T.SwinForImageClassification(cfg), pix, 2
    if name == "convnext":
        cfg = T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                               layer_scale_init_value=0.5)
        return T.ConvNextForImageClassification(cfg), pix, 2
    if name == "mobilenetv2":
        cfg = T.MobileNetV2Config(image_size=32, depth_multiplier=0.35)
        m = T.MobileNetV2ForImageClassification(cfg)
        return m, pix, sum(isinstance(x, nn.ReLU6) for x in m.modules())
    if name == "resnet":
        cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             layer_type="basic")
        m = T.ResNetForImageClassification(cfg)
        return m, pix, sum(isinstance(x, nn.ReLU) for x in m.modules())
    raise KeyError(name)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused block: F.batch_norm, then self.act."""

    def __init__(self, c: int):
        super().__init__(c)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, self.eps)
        return self.act(x)


class FusedInvertedResidual(nn.Module):
    def __init__(self, c: int = 8, e: int = 4):
        super().__init__()
        self.pw = nn.Conv2d(c, c * e, 1, bias=False)
        self.bn1 = BatchNormAct2d(c * e)
        self.dw = nn.Conv2d(c * e, c * e, 3, padding=1, groups=c * e, bias=False)
        self.bn2 = BatchNormAct2d(c * e)
        self.pwl = nn.Conv2d(c * e, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn3(self.pwl(self.bn2(self.dw(self.bn1(self.pw(x))))))


NAMES = ["bert", "distilbert", "gpt2", "vit", "swin", "convnext", "mobilenetv2", "resnet"]


def _brute_entropy(model: nn.Module, path: str, x: dict, axis: int) -> float:
    """Layer entropy from the module's eager input, counted with plain comparisons."""
    seen: list[torch.Tensor] = []
    h = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(**x)
    h.remove()
    z = seen[0].double().movedim(axis, -1).reshape(-1, seen[0].shape[axis])
    on, off = (z > 0).sum(0).double(), (z < 0).sum(0).double()
    p = torch.where(on + off > 0, on / (on + off).clamp(min=1), torch.zeros_like(on))
    hs = [0.0 if q in (0.0, 1.0) else -(q * math.log2(q) + (1 - q) * math.log2(1 - q))
          for q in p.tolist()]
    return sum(hs) / len(hs)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_hf_sites_entropy_linearize(name: str) -> None:
    torch.manual_seed(0)
    model, x, calls = _hf(name)
    model.eval()
    sites = easier.find_sites(model, x)
    assert len(sites) == calls
    report = easier.measure_entropy(model, [x])
    for s in sites:
        assert 0.0 <= report[s.name] <= 1.0
        if s.form == "module":
            axis = 1 if s.channel_axis == 1 else -1
            assert report[s.name] == pytest.approx(_brute_entropy(model, s.name, x, axis),
                                                   abs=1e-12)
    low = report.ranking()[0]
    lin = easier.linearize(model, [low], example_input=x).eval()
    with torch.no_grad():
        a, b = model(**x).logits, lin(**x).logits
    assert float((a - b).abs().max()) > 1e-4 * float(a.abs().max())
    left = easier.find_sites(lin, x)
    assert len(left) == calls - 1 and low not in {s.name for s in left}
    lin.load_state_dict(model.state_dict())  # names kept: strict load works


def test_hf_module_kinds_by_what_they_compute() -> None:
    from transformers.activations import ACT2CLS

    from easier.graph.sites import module_kind

    for act, want in [("gelu", "GELU"), ("gelu_new", "GELU"), ("quick_gelu", "GELU"),
                      ("silu", "SiLU"), ("relu", "ReLU"), ("relu6", "ReLU6"),
                      ("gelu_pytorch_tanh", "GELU"), ("tanh", None), ("sigmoid", None)]:
        cls = ACT2CLS[act]
        mod = cls[0](**cls[1]) if isinstance(cls, tuple) else cls()
        assert module_kind(mod) == want, act


@pytest.mark.parametrize("name,layers", [("bert", 2), ("gpt2", 2), ("vit", 2), ("convnext", 2)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_transformer_mlp_folds_to_one_linear(name: str, layers: int, dtype: torch.dtype,
                                             rtol: float) -> None:
    torch.manual_seed(0)
    model, x, _ = _hf(name)
    model = model.to(dtype).eval()
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    mlp = [s.name for s in easier.find_sites(model, x)]
    lin = easier.linearize(model, mlp, example_input=x).eval()
    folded = easier.fold(lin, x, plan="all", rtol=rtol, atol=0)
    linear = [c for c in folded.fold_plan.merged if c.kind == "linear"]
    assert len(linear) == layers
    with torch.no_grad():
        want, got = lin(**x).logits, folded(**x).logits
    assert torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    # the folded graph has one weight layer fewer per MLP
    depth_before = easier.measure(lin, x, latency=False).depth
    depth_after = easier.measure(folded, x, latency=False).depth
    assert depth_after == depth_before - layers


def test_fused_bn_act_block_sites_and_fold() -> None:
    torch.manual_seed(0)
    m = FusedInvertedResidual().eval()
    for bn in (m.bn1, m.bn2, m.bn3):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 8, 8)
    sites = easier.find_sites(m, x)
    assert [s.name for s in sites] == ["bn1.act", "bn2.act"]
    assert all(s.kind == "ReLU6" and s.channel_axis == 1 for s in sites)
    lin = easier.linearize(m, ["bn1.act", "bn2.act"], example_input=x, fold_ready=True).eval()
    folded = easier.fold(lin, x, plan="all")
    assert len(folded.fold_plan.merged) == 1  # pw -> dw -> pwl (+ identity) in one conv
    assert folded.fold_plan.merged[0].residual == "identity"
    assert len(folded.fold_plan.bn_folded) == 3  # functional and module BNs alike
    with torch.no_grad():
        assert torch.allclose(folded(x), lin(x), rtol=1e-4, atol=1e-5)


class _Pairs(torch.utils.data.Dataset):
    """Token batches as dicts with labels, as a Hugging Face pipeline yields them."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 100, (n, 8), generator=g)
        self.y = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.y[i]}


@pytest.mark.slow
def test_reduce_runs_on_a_hf_model_with_dict_batches(tmp_path) -> None:
    torch.manual_seed(0)
    model, _, _ = _hf("bert")
    res = easier.reduce(model, _Pairs(64, 0), _Pairs(32, 1), finetune=easier.FineTune(epochs=1),
                        out=tmp_path / "bert", stop=easier.StopRule(max_removals=1, delta=100.0))
    assert len(res.linearized) == 1 and res.linearized[0].endswith("intermediate_act_fn")
    x = {"input_ids": _Pairs(2, 2).ids}
    assert len(easier.find_sites(res.model, x)) == 1
    back = easier.load_model(tmp_path / "bert" / "model.pt", model=_hf("bert")[0])
    with torch.no_grad():
        assert torch.equal(back.eval()(**x).logits, res.model.eval()(**x).logits)


class _DataDependent(nn.Module):
    """Python control flow on tensor values: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(4, 16), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(16, 16), nn.ReLU()
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.fc1(x))
        if h.mean() > 0:  # data-dependent branch
            h = self.act2(self.fc2(h))
        return self.head(h)


@pytest.mark.slow
def test_reduce_runs_on_a_model_with_data_dependent_control_flow() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    with pytest.warns(easier.EasierWarning, match="torch.export could not capture"):
        res = easier.reduce(_DataDependent(), data, data, finetune=easier.FineTune(epochs=1),
                            stop=easier.StopRule(max_removals=1, delta=100.0))
    assert len(res.linearized) == 1 and res.linearized[0] in {"act1", "act2"}
    from easier.edit.linearize import Linearized

    assert isinstance(res.model.get_submodule(res.linearized[0]), Linearized)
