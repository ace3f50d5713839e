"""The SDXL UNet2DCondition network (parameter names as in the diffusers weight files)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..tensors import DtypeDevice
from .attention import Attention, CrossContext
from .blocks import DownBlock, MidBlock, UpBlock
from .config import UNetConfig
from .embeddings import TimestepEmbedding, sinusoidal_embedding


class UNetEncoder(DtypeDevice, nn.Module):
    """What the UNet and the ControlNet share: ``conv_in``, the time and text-time embeddings, the
    down blocks and the mid block (same parameter names in both)."""

    def __init__(self, config: UNetConfig | str = "sdxl-base"):
        super().__init__()
        cfg = UNetConfig.preset(config) if isinstance(config, str) else config
        self.config = cfg
        ch, temb = cfg.block_out_channels, cfg.time_embed_dim
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, i, ch[max(i - 1, 0)], ch[i], add_downsample=i < n - 1) for i in range(n)
        )
        self.mid_block = MidBlock(cfg)

    def encode(self, x, temb, context):
        """Down blocks then mid block from ``x`` (after conv_in) → (mid output, skips: conv_in's
        output then every down stage's, in diffusers' ``down_block_res_samples`` order)."""
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context)
            skips += s
        return self.mid_block(x, temb, context), skips

    def fuse_qkv(self) -> int:
        """Fuse every self-attention's q/k/v projections into one Linear (``Attention.fuse_qkv``:
        one GEMM instead of three, outputs equal up to GEMM rounding, ``state_dict`` keys and
        values unchanged); fp8-stored projections stay apart. Returns how many are fused."""
        return sum(m.fuse_qkv() for m in list(self.modules()) if isinstance(m, Attention))

    def unfuse_qkv(self) -> int:
        """Undo :meth:`fuse_qkv`: the projections again, their weights bit for bit. Returns how
        many were fused."""
        return sum(m.unfuse_qkv() for m in list(self.modules()) if isinstance(m, Attention))

    def _reference_weight(self) -> torch.Tensor:  # .dtype / .device (conv_in stays out of fp8)
        return self.conv_in.weight

    def embed(self, timestep, text_embeds, time_ids, batch: int, dtype) -> torch.Tensor:
        """emb = time_embedding(fourier(t)) + add_embedding([text_embeds, fourier(time_ids)])."""
        cfg = self.config
        t = torch.as_tensor(timestep, device=text_embeds.device)  # not self.device: weights may stream
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)
        t_feat = sinusoidal_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_feat.to(dtype))
        ids = sinusoidal_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                   cfg.flip_sin_to_cos, cfg.freq_shift).reshape(batch, -1)
        add = torch.cat([text_embeds.to(dtype), ids.to(dtype)], dim=-1)
        return emb + self.add_embedding(add)



class UNet(UNetEncoder):
    """SDXL UNet: ``forward(sample, timestep, encoder_hidden_states, text_embeds, time_ids)``.

    sample [B,C,h,w]; timestep scalar or [B]; encoder_hidden_states [B,L,cross_attention_dim];
    text_embeds [B,P] (pooled text); time_ids [B,6] (orig h,w, crop top,left, target h,w).
    Returns the noise prediction [B,out_channels,h,w]. ControlNet residuals, when given, are added
    to the skips and to the mid block's output, as diffusers adds them.

    ``zero_context``: the batch rows (a slice, known on the host) whose ``encoder_hidden_states``
    are exactly zero — SDXL's zero negative prompt: ``slice(0, None, 2)`` for interleaved
    (uncond, cond) pairs, ``slice(None)`` for an unconditional call. Their cross-attention is
    ``to_out``'s bias, written instead of computed (the same values, bit for bit). Trusted, never
    checked on the device; the rows left must be evenly spaced.
    """

    def __init__(self, config: UNetConfig | str = "sdxl-base"):
        super().__init__(config)
        cfg = self.config
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.up_blocks = nn.ModuleList()
        for j in range(n):
            level = n - 1 - j  # up block j mirrors down level n-1-j
            prev_ch = ch[min(level + 1, n - 1)]
            skip_in = ch[max(level - 1, 0)]
            self.up_blocks.append(UpBlock(cfg, level, prev_ch, ch[level], skip_in, add_upsample=level > 0))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                zero_context: slice | None = None):
        b = sample.shape[0]
        temb = self.embed(timestep, text_embeds, time_ids, b, sample.dtype)
        context = encoder_hidden_states.to(sample.dtype)
        if zero_context is not None:
            context = CrossContext(context, zero_context)

        x, skips = self.encode(self.conv_in(sample), temb, context)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"{len(down_block_additional_residuals)} down-block residuals given, the UNet has "
                                 f"{len(skips)} skips; use a ControlNet built for this UNet")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            up_size = skips[-1].shape[-2:] if skips else None
            x = block(x, temb, context, block_skips, up_size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
