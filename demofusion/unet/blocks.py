"""Down, mid and up blocks: ResNet blocks, optional transformers, resampling."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Transformer2DModel
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


def _transformers(n, ch, heads, depth, cfg):
    return nn.ModuleList(
        Transformer2DModel(ch, heads, depth, cfg.cross_attention_dim, cfg.norm_num_groups) for _ in range(n)
    )


def _level_transformers(cfg, level: int, n: int, ch: int):
    """The transformer after each of ``n`` resnets at ``level``; None at a level without attention."""
    if not cfg.cross_attention[level]:
        return None
    return _transformers(n, ch, cfg.attention_heads[level], cfg.transformer_layers_per_block[level], cfg)


class DownBlock(nn.Module):
    """``layers`` × (resnet [→ transformer]) then a stride-2 conv; every stage output is a skip."""

    def __init__(self, cfg, level: int, in_ch: int, out_ch: int, add_downsample: bool):
        super().__init__()
        n, groups, eps, temb = cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, groups, eps) for i in range(n)
        )
        self.attentions = _level_transformers(cfg, level, n, out_ch)
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if add_downsample else None

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet → transformer → resnet at the lowest resolution."""

    def __init__(self, cfg):
        super().__init__()
        ch, groups, eps, temb = cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb, groups, eps) for _ in range(2))
        self.attentions = _transformers(
            1, ch, cfg.attention_heads[-1], cfg.transformer_layers_per_block[-1], cfg)

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """``layers + 1`` × (concat skip → resnet [→ transformer]) then nearest 2× + conv."""

    def __init__(self, cfg, level: int, prev_ch: int, out_ch: int, skip_in_ch: int, add_upsample: bool):
        super().__init__()
        n, groups, eps, temb = cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nn.ModuleList()
        for i in range(n):
            skip_ch = skip_in_ch if i == n - 1 else out_ch
            res_in = prev_ch if i == 0 else out_ch
            self.resnets.append(ResnetBlock2D(res_in + skip_ch, out_ch, temb, groups, eps))
        self.attentions = _level_transformers(cfg, level, n, out_ch)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(self, x, temb, context, skips, up_size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, up_size)
        return x
