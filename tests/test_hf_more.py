"""More models users bring (Hugging Face from tiny configs, and the patterns inside them): gated
MLPs, copies before views, string conv padding, channels moved by transposes, hardswish, and
language-model labels. Every check is against an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import easier

T = pytest.importorskip("transformers")

IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=100)


def _llama(layers: int = 2) -> nn.Module:
    cfg = T.LlamaConfig(**dict(TINY, num_hidden_layers=layers), num_key_value_heads=1,
                        use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return T.LlamaForCausalLM(cfg)


def _hooked_calls(model: nn.Module, x: dict, cls: type[nn.Module]) -> list[torch.Tensor]:
    """Inputs of every call of a module of class ``cls``, recorded by forward pre-hooks."""
    seen: list[torch.Tensor] = []
    hs = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
          for m in model.modules() if isinstance(m, cls)]
    with torch.no_grad():
        model(**x)
    for h in hs:
        h.remove()
    return seen


def _fold_matches_float64(model: nn.Module, x: dict, sites: list[str]) -> easier.merge.FoldPlan:
    model = model.double().eval()
    lin = easier.linearize(model, sites, example_input=x).eval()
    folded = easier.fold(lin, x, plan="all", rtol=1e-10, atol=0)
    with torch.no_grad():
        want, got = lin(**x).logits, folded(**x).logits
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    return folded.fold_plan


def test_gated_mlp_act_is_a_site_and_is_never_merged() -> None:
    """act(gate(x)) * up(x) -> down: the act is a site; linearized, gate * up is bilinear, so
    no linear may be merged with another, and the fold still equals the eager model."""
    torch.manual_seed(0)
    model = _llama(layers=1).eval()
    x = {"input_ids": IDS}
    sites = easier.find_sites(model, x)
    assert [(s.name, s.kind, s.channel_axis) for s in sites] == [
        ("model.layers.0.mlp.act_fn", "SiLU", -1)]
    report = easier.measure_entropy(model, [x])
    z = _hooked_calls(model, x, type(model.model.layers[0].mlp.act_fn))[0].reshape(-1, 64)
    stats = report.neurons("model.layers.0.mlp.act_fn")
    assert torch.equal(stats.on, (z > 0).sum(0)) and torch.equal(stats.off, (z < 0).sum(0))
    plan = _fold_matches_float64(model, x, [s.name for s in sites])
    assert plan.merged == []


class _HeadsAttention(nn.Module):
    """q projection -> heads -> permute -> .contiguous() -> view: the view needs the copy."""

    def __init__(self, c: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.q = heads, nn.Linear(c, c)
        self.fc1, self.fc2 = nn.Linear(c, 32), nn.Linear(32, c)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.h, c // self.h).permute(0, 2, 1, 3).contiguous()
        q = q.view(b * self.h, t, c // self.h).transpose(0, 1).reshape(t, b, c).transpose(0, 1)
        return x + self.fc2(self.act(self.fc1(q)))


def test_fold_keeps_a_contiguous_copy_a_view_needs() -> None:
    torch.manual_seed(0)
    m = _HeadsAttention().double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    lin = easier.linearize(m, ["act"], example_input=x).eval()
    folded = easier.fold(lin, x, plan="all", rtol=1e-10, atol=0)
    assert [c.modules for c in folded.fold_plan.merged] == [["fc1", "fc2"]]
    with torch.no_grad():
        assert torch.allclose(folded(x), lin(x), rtol=1e-10, atol=1e-12)


def test_deberta_v2_folds_its_mlps() -> None:
    torch.manual_seed(0)
    cfg = T.DebertaV2Config(**dict(TINY, num_hidden_layers=1), max_position_embeddings=64)
    model = T.DebertaV2ForSequenceClassification(cfg)
    x = {"input_ids": IDS}
    sites = [s.name for s in easier.find_sites(model, x)]
    assert sites[-1] == "pooler:gelu"  # ACT2FN[...] called inline: a functional site
    plan = _fold_matches_float64(model, x, sites)
    assert [c.kind for c in plan.merged] == ["linear"] * 2  # the MLP, pooler + classifier


class _ValidSame(nn.Module):
    """Convs with string padding (EfficientNet's "valid", Keras ports' "same"), each + BN."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding="valid"), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding="same"), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 2, padding="same"), nn.BatchNorm2d(8)  # asymmetric
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b3(self.c3(self.act(self.b2(self.c2(self.act(self.b1(self.c1(x))))))))


def test_string_padding_convs_fold_their_bn() -> None:
    torch.manual_seed(0)
    m = _ValidSame().eval()
    for bn in (m.b1, m.b2, m.b3):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 9, 9)
    folded = easier.fold(m, x, plan="none")
    assert sorted(folded.fold_plan.bn_folded) == ["c1<-b1", "c2<-b2"]  # "same" k=2 left as is
    with torch.no_grad():
        assert torch.allclose(folded(x), m(x), rtol=1e-5, atol=1e-6)


class _MixFFN(nn.Module):
    """Segformer's Mix-FFN: tokens -> map -> depthwise conv -> tokens -> act."""

    def __init__(self, c: int = 8, hidden: int = 12):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H*W, C), H = W = 4
        h = self.fc1(x)
        b, _, c = h.shape
        h = self.dw(h.transpose(1, 2).reshape(b, c, 4, 4)).flatten(2).transpose(1, 2)
        return self.fc2(self.act(h))


def test_channel_axis_follows_flatten_and_transpose() -> None:
    torch.manual_seed(0)
    m = _MixFFN().eval()
    x = torch.randn(2, 16, 8)
    (site,) = easier.find_sites(m, x)
    assert (site.producer, site.channel_axis) == ("conv2d", -1)  # channels, not tokens
    z = _hooked_calls(m, {"x": x}, nn.GELU)[0].reshape(-1, 12)
    stats = easier.measure_entropy(m, [x]).neurons("act")
    assert torch.equal(stats.on, (z > 0).sum(0)) and torch.equal(stats.off, (z < 0).sum(0))


@pytest.mark.slow
def test_segformer_sites_have_channels_last() -> None:
    cfg = T.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                            hidden_sizes=[8, 16], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                            strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=16)
    model = T.SegformerForImageClassification(cfg).eval()
    sites = easier.find_sites(model, {"pixel_values": torch.randn(2, 3, 32, 32)})
    assert [(s.channel_axis, s.shape[-1]) for s in sites] == [(-1, 16), (-1, 32)]


def test_hardswish_is_a_site_kind() -> None:
    """LeViT and MobileNetV3 use hardswish: by class, by probe, and as the aten op."""
    from easier.graph.sites import module_kind

    class HS(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * F.relu6(x + 3) / 6

    assert module_kind(nn.Hardswish()) == module_kind(HS()) == "Hardswish"
    assert module_kind(nn.SiLU()) == "SiLU"
    m = nn.Sequential(nn.Linear(4, 8), nn.Hardswish(), nn.Linear(8, 8), HS(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    sites = easier.find_sites(m, x)
    assert [(s.name, s.kind) for s in sites] == [("1", "Hardswish"), ("3", "Hardswish")]
    z = m[:3](x)  # the pre-activation of the second site, computed by hand
    stats = easier.measure_entropy(m, [x]).neurons("3")
    assert torch.equal(stats.on, (z > 0).sum(0)) and torch.equal(stats.off, (z < 0).sum(0))
    lin = easier.linearize(m, ["1", "3"]).eval()
    folded = easier.fold(lin, x, plan="all")
    assert [c.modules for c in folded.fold_plan.merged] == [["0", "2", "4"]]


@pytest.mark.slow
def test_levit_hardswish_sites_match_hook_counts() -> None:
    cfg = T.LevitConfig(image_size=64, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3],
                        depths=[1, 1, 1], key_dim=[8, 8, 8], patch_size=16, mlp_ratio=[2, 2, 2],
                        attention_ratio=[2, 2, 2])
    model = T.LevitForImageClassification(cfg).eval()
    x = {"pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    sites = easier.find_sites(model, x)
    calls = _hooked_calls(model, x, nn.Hardswish)
    assert len(sites) == len(calls) == 13 and {s.kind for s in sites} == {"Hardswish"}
    # maps (axis 1), or tokens whose features are last (attention heads merged into them too)
    assert [s.channel_axis for s in sites] == [1] * 3 + [-1] * 10
    assert [s.shape for s in sites] == [tuple(z.shape) for z in calls]


class _LMData(torch.utils.data.Dataset):
    """Hugging Face causal-LM batches: labels are the input ids (the model shifts them)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor | None = None):
        self.ids, self.labels = ids, ids if labels is None else labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_next_token_labels_score_like_the_models_own_loss() -> None:
    from easier.train.finetune import evaluate
    from easier.train.objective import cross_entropy, hits

    torch.manual_seed(0)
    model = _llama().eval()
    labels = IDS.clone()
    labels[0, :3] = -100  # ignored positions (e.g. a prompt)
    x = {"input_ids": IDS}
    with torch.no_grad():
        out = model(**x, labels=labels)  # transformers' own shifted, masked loss
    assert float(cross_entropy(out.logits, labels, x)) == pytest.approx(float(out.loss), rel=1e-5)
    want_hits = int((out.logits[:, :-1].argmax(-1) == IDS[:, 1:])[labels[:, 1:] != -100].sum())
    assert hits(out.logits, labels, x) == (want_hits, 2 * 7 - 2)
    loss, acc = evaluate(model, _LMData(IDS, labels), batch_size=2)
    assert loss == pytest.approx(float(out.loss), rel=1e-5)
    assert acc == pytest.approx(100.0 * want_hits / 12)


def test_aligned_token_labels_score_like_token_classification() -> None:
    from easier.train.objective import cross_entropy

    torch.manual_seed(0)
    cfg = T.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=100,
                             num_labels=3)
    model = T.DistilBertForTokenClassification(cfg).eval()
    y = torch.randint(0, 3, IDS.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=IDS, labels=y)
    assert float(cross_entropy(out.logits, y, {"input_ids": IDS})) == pytest.approx(
        float(out.loss), rel=1e-5)
    with pytest.raises(easier.ConfigError, match="per-token labels"):
        cross_entropy(out.logits, y[:, :5], {"input_ids": IDS})


class _TFPadded(nn.Module):
    """Hugging Face's TF-style padding: F.pad before every conv, all zeros before a 1x1."""

    def __init__(self):
        super().__init__()
        self.dw, self.pw = nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 1)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.dw(F.pad(x, [1, 1, 1, 1])))
        return self.pw(F.pad(h, [0, 0, 0, 0]))


def test_zero_pad_does_not_stop_a_chain() -> None:
    torch.manual_seed(0)
    m = _TFPadded().double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    lin = easier.linearize(m, ["act"], example_input=x).eval()
    folded = easier.fold(lin, x, plan="all", rtol=1e-10, atol=0)
    assert [c.modules for c in folded.fold_plan.merged] == [["dw", "pw"]]
    with torch.no_grad():
        want = m.pw(m.dw(F.pad(x, [1, 1, 1, 1])))  # the linearized function, by hand
        assert torch.allclose(folded(x), want, rtol=1e-10, atol=1e-12)
