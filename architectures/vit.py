"""A small Vision Transformer for 8x8 to 64x64 inputs (Dosovitskiy et al. 2021), native, no timm.

``vit_tiny_p{patch_size}`` (dim 64, depth 6, 4 heads, about 0.31M parameters) and
``vit_small_p{patch_size}`` (dim 128, depth 6, 4 heads, about 1.2M), e.g. ``vit_tiny_p4``;
both are names of the form ``..._p{patch_size}``, any positive patch size.

Layout: non-overlapping ``patch_size`` x ``patch_size`` patches embedded by one strided
convolution, learned position embeddings, ``depth`` pre-norm blocks
(``x + attn(LN(x))``, ``x + mlp(LN(x))``, GELU MLP of ``mlp_ratio * dim``), a final LayerNorm,
then a linear head. No BatchNorm, so the SAM passes need no running-statistics handling.

Pooling: global average pooling over the patch tokens by default (``pool="gap"``), a class token
with ``pool="cls"``. GAP because it trains at least as well as a class token on small data
(Beyer et al. 2022, "Better plain ViT baselines"; Zhai et al. 2022) and keeps every token a
grid cell, so resizing the position table below is a plain 2-D resize with no class slot to
special-case. The class token, when chosen, gets no position embedding (its own learned value
marks it).

Position embeddings: one learned table of ``ceil(image_size / patch_size)`` squared entries,
created in ``__init__`` for ``image_size`` (default 32: an 8x8 grid at patch 4). An input whose
patch grid differs (the harness never passes ``image_size``: 8x8 digits give a 2x2 grid) uses the
table resized to that grid with antialiased bicubic interpolation inside ``forward``, so gradients
reach every entry and the table is trained at the size it is used. The table is never built
lazily: the optimizer, the parameter count, data-parallel wrapping and checkpoints are all made
from ``model.parameters()`` before the first forward, and a parameter born later would be missed
by every one of them. Pass ``image_size`` to make the table the input's own grid (no resize).
Inputs whose sides are not a multiple of ``patch_size`` are zero-padded on the right and bottom.

Attention is written out (``softmax(q k^T / sqrt(d)) v``) rather than calling the fused
``scaled_dot_product_attention``: the fused GPU kernels have no double backward, which the
sharpness measures (Hessian-vector products) need; at these token counts the cost is the same.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_pattern

POOLS = ("gap", "cls")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@register_pattern("vit_small_p{patch_size}", dim=128, depth=6, heads=4)
@register_pattern("vit_tiny_p{patch_size}", dim=64, depth=6, heads=4)
class VisionTransformer(nn.Module):
    """Pre-norm ViT with learned, resizable position embeddings (see the module docstring)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pool: str = "gap",
    ):
        super().__init__()
        for field, value in (
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if dim % heads:
            raise ValueError(f"dim must be a multiple of heads, got dim={dim}, heads={heads}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.patch_size = patch_size
        self.pool = pool
        self.grid = math.ceil(image_size / patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, self.grid, self.grid))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """The ``(1, dim, height, width)`` table for a ``height`` x ``width`` patch grid."""
        if (height, width) == (self.grid, self.grid):
            return self.pos_embed
        return F.interpolate(self.pos_embed, size=(height, width), mode="bicubic", align_corners=False, antialias=True)

    def forward(self, x):
        pad_h, pad_w = -x.shape[-2] % self.patch_size, -x.shape[-1] % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x)  # (B, dim, h, w)
        x = x + self.position_embedding(*x.shape[-2:]).to(x.dtype)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.norm(self.blocks(self.drop(x)))
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(x)
