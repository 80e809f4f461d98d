"""Swin-T with every shape fixed at construction, so torch.fx traces it: 12 GELU sites.

Parameter and buffer names follow torchvision's `swin_t`, so at 224x224 and width 1 its
state_dict loads strictly. What torchvision decides per call from tensor shapes (padding, shift,
attention mask) is computed here once from `image_size` and stored as ints and buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from easier.models._common import check_probability, require, scaled
from easier.models._registry import register_model

DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (3, 6, 12, 24)
MASKED = -100.0  # what torchvision adds to forbidden attention logits


@dataclass(frozen=True)
class StageGeometry:
    """Token grid of one stage: `resolution`^2 tokens, `window`^2 windows, padded to `padded`."""

    resolution: int
    window: int
    shift: int  # shift of the odd blocks; 0 when one window covers the stage
    padded: int


def stage_geometry(
    image_size: int, patch_size: int, window_size: int, n_stages: int = 4
) -> list[StageGeometry]:
    """Return each stage's grid: windows clipped to the grid, shifted only if the grid is larger.

    Patch merging rounds odd grids up (zero padding, as torchvision); a grid that the window does
    not divide is zero-padded inside attention and the padded tokens are masked out as keys.
    """
    res = image_size // patch_size
    out = []
    for _ in range(n_stages):
        window = min(window_size, res)
        shift = window // 2 if res > window_size else 0
        out.append(StageGeometry(res, window, shift, res + (-res) % window))
        res = (res + 1) // 2
    return out


def attention_mask(geo: StageGeometry) -> Tensor | None:
    """Return the (windows, N, N) additive mask of a block, or None when nothing is masked.

    A query may not attend to a key that the cyclic shift brought from the far side of the map
    (torchvision's region labels), nor to a key that is only padding.
    """
    ws, s, size = geo.window, geo.shift, geo.padded
    if s == 0 and size == geo.resolution:
        return None
    region = torch.zeros(size, size)
    if s > 0:
        cuts = ((0, -ws), (-ws, -s), (-s, None))
        label = 0
        for h0, h1 in cuts:
            for w0, w1 in cuts:
                region[h0:h1, w0:w1] = label
                label += 1
    is_pad = torch.zeros(size, size, dtype=torch.bool)
    is_pad[geo.resolution :, :] = True
    is_pad[:, geo.resolution :] = True
    is_pad = torch.roll(is_pad, shifts=(-s, -s), dims=(0, 1))  # the data is rolled the same way

    def windows(t: Tensor) -> Tensor:
        n = size // ws
        return t.view(n, ws, n, ws).permute(0, 2, 1, 3).reshape(n * n, ws * ws)

    region_w, pad_w = windows(region), windows(is_pad)
    forbidden = (region_w.unsqueeze(2) != region_w.unsqueeze(1)) | pad_w.unsqueeze(1)
    return torch.zeros(forbidden.shape).masked_fill(forbidden, MASKED)


def relative_position_index(window: int) -> Tensor:
    """Return the flat (N*N,) index into the (2w-1)^2 bias table, as torchvision builds it."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = torch.flatten(coords, 1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1).flatten()


class ShiftedWindowAttention(nn.Module):
    """(Shifted) window multi-head self-attention with a relative position bias, on (B,H,W,C)."""

    def __init__(self, dim: int, num_heads: int, geo: StageGeometry, shifted: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dim = dim
        self.resolution = geo.resolution
        self.window_size = geo.window
        self.shift_size = geo.shift if shifted else 0
        self.padded = geo.padded
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        w = geo.window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(w))
        mask = attention_mask(StageGeometry(geo.resolution, w, self.shift_size, geo.padded))
        # Derived from the geometry, so kept out of the state_dict (as torchvision, which has none).
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        ws, s, size, c = self.window_size, self.shift_size, self.padded, self.dim
        n, tokens, heads = size // ws, self.window_size**2, self.num_heads
        pad = size - self.resolution
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = x.reshape(-1, n, ws, n, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, tokens, c)
        qkv = self.qkv(x).reshape(-1, tokens, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.head_dim**-0.5).matmul(k.transpose(-2, -1))
        bias = self.relative_position_bias_table[self.relative_position_index]
        attn = attn + bias.view(tokens, tokens, heads).permute(2, 0, 1).unsqueeze(0)
        if self.attn_mask is not None:
            attn = attn.view(-1, n * n, heads, tokens, tokens) + self.attn_mask.unsqueeze(1)
            attn = attn.view(-1, heads, tokens, tokens)
        x = attn.softmax(dim=-1).matmul(v).transpose(1, 2).reshape(-1, tokens, c)
        x = self.proj(x)
        x = x.reshape(-1, n, n, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, size, size, c)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        if pad:
            x = x[:, : self.resolution, : self.resolution, :]
        return x


class StochasticDepth(nn.Module):
    """Drop a whole residual branch per sample with probability p (torchvision's 'row' mode).

    The random mask comes from an nn.Dropout applied to ones, so a torch.fx-traced copy still
    obeys .train()/.eval() (a Python `if self.training` would be frozen at trace time).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.dropout = nn.Dropout(p) if p > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        if self.dropout is None:
            return x
        return x * self.dropout(x.new_ones((x.shape[0], 1, 1, 1)))


class SwinTransformerBlock(nn.Module):
    """x + SD(W-MSA(LN(x))), then x + SD(MLP(LN(x))) with MLP = Linear(C,4C)-GELU-Linear(4C,C)."""

    def __init__(
        self, dim: int, num_heads: int, geo: StageGeometry, shifted: bool, sd_prob: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, num_heads, geo, shifted)
        self.stochastic_depth = StochasticDepth(sd_prob)
        self.norm2 = nn.LayerNorm(dim)
        # torchvision's MLP layout (Linear, GELU, Dropout, Linear, Dropout) keeps its indices.
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(4 * dim, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 group of tokens, LayerNorm, then Linear(4C, 2C) (odd grids padded)."""

    def __init__(self, dim: int, resolution: int) -> None:
        super().__init__()
        self.pad = resolution % 2
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad:
            x = F.pad(x, (0, 0, 0, 1, 0, 1))
        x0 = x[..., 0::2, 0::2, :]
        x1 = x[..., 1::2, 0::2, :]
        x2 = x[..., 0::2, 1::2, :]
        x3 = x[..., 1::2, 1::2, :]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3], -1)))


class Permute(nn.Module):
    """Permute dimensions (a module so the patch embedding is one Sequential, as torchvision)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class SwinTransformer(nn.Module):
    """Swin Transformer (v1) on channel-last tokens (B, H, W, C); widths = heads x head_dim."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        head_dim: int = 32,
        patch_size: int = 2,
        window_size: int = 4,
        stochastic_depth_prob: float = 0.2,
        depths: tuple[int, ...] = DEPTHS,
        num_heads: tuple[int, ...] = NUM_HEADS,
    ) -> None:
        super().__init__()
        dims = [h * head_dim for h in num_heads]
        geos = stage_geometry(image_size, patch_size, window_size, len(depths))
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, dims[0], kernel_size=patch_size, stride=patch_size),
                Permute([0, 2, 3, 1]),
                nn.LayerNorm(dims[0]),
            )
        ]
        total, block_id = sum(depths), 0
        for i, (depth, heads, geo) in enumerate(zip(depths, num_heads, geos, strict=True)):
            blocks = []
            for j in range(depth):
                sd = stochastic_depth_prob * block_id / max(1, total - 1)
                blocks.append(SwinTransformerBlock(dims[i], heads, geo, j % 2 == 1, sd))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
            if i < len(depths) - 1:
                layers.append(PatchMerging(dims[i], geo.resolution))
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.features(x))
        x = self.avgpool(x.permute(0, 3, 1, 2))
        return self.head(torch.flatten(x, 1))


def auto_patch_window(image_size: int) -> tuple[int, int]:
    """Return the default (patch, window) for a square image of `image_size` pixels.

    Patch 4 from 224 px up (torchvision), else 2; window 7 when the first token grid divides by
    7 (224 -> 56, 28 -> 14 tokens), else 4 (32 -> 16 tokens), so common sizes need no padding.
    """
    patch = 4 if image_size >= 224 else 2
    return patch, 7 if (image_size // patch) % 7 == 0 else 4


@register_model("swin_t")
def swin_t(
    num_classes: int,
    in_channels: int,
    width: float,
    image_size: int,
    patch_size: int | None = None,
    window_size: int | None = None,
    stochastic_depth_prob: float = 0.2,
) -> SwinTransformer:
    """Swin-T (depths 2,2,6,2; heads 3,6,12,24): 12 GELUs, one per block MLP.

    Stage widths are heads x scaled(32, width), i.e. 96/192/384/768 at width 1, so every width
    splits evenly into heads. patch/window default to `auto_patch_window(image_size)`.
    """
    auto_patch, auto_window = auto_patch_window(image_size)
    patch = auto_patch if patch_size is None else patch_size
    window = auto_window if window_size is None else window_size
    for what, v in (("patch_size", patch), ("window_size", window)):
        require(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1,
            f"swin_t {what} must be a positive integer or None (automatic), got {v!r}.",
        )
    require(
        image_size >= patch,
        f"swin_t needs image_size >= patch_size, got {image_size} < {patch}; "
        "use a smaller patch_size or larger images.",
    )
    return SwinTransformer(
        num_classes,
        in_channels,
        image_size,
        head_dim=scaled(32, width),
        patch_size=patch,
        window_size=window,
        stochastic_depth_prob=check_probability("stochastic_depth_prob", stochastic_depth_prob),
    )
