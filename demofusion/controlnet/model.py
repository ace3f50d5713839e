"""The SDXL ControlNet (diffusers' ``ControlNetModel`` parameter names): the UNet's encoder — its
embeddings, down and mid blocks, our own modules — plus the conditioning-image embedding and the
zero-initialised 1×1 projections of every skip and of the mid block's output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..unet import UNetConfig
from ..unet.attention import CrossContext
from ..unet.model import UNetEncoder

# config.json fields an SDXL ControlNet must have as given (anything else is another model)
_REQUIRED = {"controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False,
             "class_embed_type": None, "encoder_hid_dim": None, "addition_embed_type": "text_time"}


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "ControlNetConfig":
        """Read a diffusers ``ControlNetModel`` config dict (its ``config.json``)."""
        for k, want in _REQUIRED.items():
            if cfg.get(k, want) != want:
                raise ValueError(f"unsupported ControlNet config: {k}={cfg.get(k)!r} (SDXL ControlNets use {want!r})")
        down = list(cfg["down_block_types"])
        unet = UNetConfig.from_diffusers({**cfg, "up_block_types": [d.replace("Down", "Up") for d in reversed(down)],
                                          "mid_block_type": cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"})
        return cls(unet, int(cfg.get("conditioning_channels", 3)),
                   tuple(cfg.get("conditioning_embedding_out_channels") or cls.conditioning_embedding_out_channels))

    def to_diffusers(self) -> dict:
        """The equivalent diffusers ``ControlNetModel`` config (for tests and saving)."""
        d = self.unet.to_diffusers()
        for k in ("up_block_types", "out_channels", "sample_size"):
            d.pop(k)
        d.update(_class_name="ControlNetModel", conditioning_channels=self.conditioning_channels,
                 conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels))
        return d


class ControlNetConditioningEmbedding(nn.Module):
    """Control image [B,C,8h,8w] → [B,320,h,w]: a 3×3 conv, then per stage a 3×3 conv and a stride-2
    3×3 conv (SiLU after each), then a zero-initialised 3×3 conv to the UNet's first width."""

    def __init__(self, channels: int, widths: tuple, out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def _zero(m: nn.Module) -> nn.Module:
    nn.init.zeros_(m.weight)
    nn.init.zeros_(m.bias)
    return m


class ControlNet(UNetEncoder):
    """``forward(sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond,
    conditioning_scale=1.0, guess_mode=False)`` → (down residuals: one per UNet skip, mid residual).

    ``controlnet_cond``: the control image [B,3,8h,8w] in [0, 1]. ``guess_mode``: the residuals are
    scaled from 0.1 (first skip) to 1 (mid block) on a log scale, as diffusers does."""

    def __init__(self, config: ControlNetConfig | None = None):
        config = config or ControlNetConfig()
        super().__init__(config.unet)
        self.controlnet_config = config
        ch = config.unet.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            config.conditioning_channels, config.conditioning_embedding_out_channels, ch[0])
        widths = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(config.unet.layers_per_block
                                                                        + (i < len(ch) - 1))]
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in widths)
        self.controlnet_mid_block = _zero(nn.Conv2d(ch[-1], ch[-1], 1))

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond,
                conditioning_scale: float = 1.0, guess_mode: bool = False, zero_context: slice | None = None):
        b = sample.shape[0]
        temb = self.embed(timestep, text_embeds, time_ids, b, sample.dtype)
        context = encoder_hidden_states.to(sample.dtype)
        if zero_context is not None:  # rows with a zero context: see UNet.forward
            context = CrossContext(context, zero_context)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.to(sample.dtype))
        x, skips = self.encode(x, temb, context)
        down = [proj(s) for proj, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        if guess_mode:  # scales 10^-1 … 10^0 over the skips and the mid block
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            return [d * s for d, s in zip(down, scales)], mid * scales[-1]
        return [d * conditioning_scale for d in down], mid * conditioning_scale
