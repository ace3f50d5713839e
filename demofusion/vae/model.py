"""SDXL's KL autoencoder: encoder, decoder, mid-block self-attention (parameter names = diffusers')."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..tensors import DtypeDevice, is_fake  # a FakeTensor (no values), e.g. under FakeTensorMode
from .config import VAEConfig

OVERFLOW_POLICIES = ("upcast", "raise")


class FP16OverflowError(FloatingPointError):
    """The VAE produced NaN/inf in float16 (the released SDXL VAE does; see docs/components.md, VAE)."""


def _norm(channels: int, cfg: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_num_groups, channels, eps=cfg.norm_eps)


class ResnetBlock2D(nn.Module):
    """y = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = _norm(cin, cfg)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, cfg)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head spatial self-attention: y = x + W_o·softmax(QKᵀ/√C)·V over the h·w positions."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.group_norm = _norm(channels, cfg)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, h·w, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        a = self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)
        return x + a


class MidBlock(nn.Module):
    """resnet → attention → resnet at the lowest resolution."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, cfg) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, cfg)] if cfg.mid_block_add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3×3 conv (halves h and w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= 64 or 4 * x.numel() >= 2**31:
            x = x.contiguous()  # the channels-last nearest kernel fails on huge/large-batch inputs
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _ResnetStack(nn.Module):
    """``n`` resnets, then the resampler if any, run in that order. The resampler's list is
    registered as ``name`` (``downsamplers`` / ``upsamplers``: diffusers' parameter names)."""

    def __init__(self, cin: int, cout: int, n: int, cfg: VAEConfig, name: str, resampler: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, cfg) for i in range(n)])
        setattr(self, name, nn.ModuleList([resampler] if resampler is not None else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layers in self.children():  # resnets, then the resampler
            for layer in layers:
                x = layer(x)
        return x


class DownBlock(_ResnetStack):
    def __init__(self, cin: int, cout: int, n: int, down: bool, cfg: VAEConfig):
        super().__init__(cin, cout, n, cfg, "downsamplers", Downsample(cout) if down else None)


class UpBlock(_ResnetStack):
    def __init__(self, cin: int, cout: int, n: int, up: bool, cfg: VAEConfig):
        super().__init__(cin, cout, n, cfg, "upsamplers", Upsample(cout) if up else None)


class Encoder(nn.Module):
    """image [B,3,H,W] → moments [B, 2·latent_channels, H/8, W/8] (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block, i < len(ch) - 1, cfg) for i, c in enumerate(ch)
        )
        self.mid_block = MidBlock(ch[-1], cfg)
        self.conv_norm_out = _norm(ch[-1], cfg)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """latent [B,4,h,w] (after post_quant_conv) → image [B,3,8h,8w]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], cfg)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, i < len(ch) - 1, cfg) for i, c in enumerate(ch)
        )
        self.conv_norm_out = _norm(ch[-1], cfg)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        x = x.to(self.up_blocks[0].resnets[0].conv1.weight.dtype)  # after an upcast the head stays fp16
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, std²) per latent element (unscaled latents)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)  # σ = exp(½·log σ²)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std·ε, ε ~ N(0, 1) drawn on the generator's device (as diffusers does)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(DtypeDevice, nn.Module):
    """SDXL's VAE. ``encode(x in [-1,1]) -> DiagonalGaussian``; ``decode(z) -> image in [-1,1]``.

    Latents are *unscaled*: multiply by ``scaling_factor`` to get what the UNet sees.
    ``on_fp16_overflow``: what a float16 encode/decode producing NaN/inf does — ``"upcast"``
    (default: warn, move the VAE to float32 for good — so it happens once — and redo the call)
    or ``"raise"`` (:class:`FP16OverflowError`). The upcast is diffusers' recipe for SDXL
    (``upcast_vae`` with SDPA attention): ``post_quant_conv``, ``decoder.conv_in`` and
    ``decoder.mid_block`` stay float16 (the latents enter in float16, the mid block's output goes
    on in float32); if a decode overflows there too, they follow (a second warning and redo).
    Outputs are in ``dtype``: that of the last layer, float32 after an upcast.
    """

    def __init__(self, config: VAEConfig | None = None, on_fp16_overflow: str = "upcast"):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        n = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(n, n, 1) if config.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(config.latent_channels, config.latent_channels, 1) if config.use_post_quant_conv else None
        )
        self.on_fp16_overflow = on_fp16_overflow

    @property
    def on_fp16_overflow(self) -> str:
        return self._on_fp16_overflow

    @on_fp16_overflow.setter
    def on_fp16_overflow(self, policy: str) -> None:
        if policy not in OVERFLOW_POLICIES:
            raise ValueError(f"on_fp16_overflow must be one of {OVERFLOW_POLICIES}, not {policy!r}")
        self._on_fp16_overflow = policy

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def scale_factor(self) -> int:
        """Pixels per latent (8)."""
        return self.config.scale_factor

    def _reference_weight(self) -> torch.Tensor:  # .dtype / .device: the output's (see _upcast)
        return self.decoder.conv_out.weight

    def _decoder_head(self) -> list[nn.Module]:
        """The layers an upcast keeps in float16 (diffusers' ``upcast_vae`` with SDPA attention)."""
        return [m for m in (self.post_quant_conv, self.decoder.conv_in, self.decoder.mid_block) if m is not None]

    # --- raw passes (no overflow handling) ---------------------------------------------------
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        m = self.encoder(x.to(self.encoder.conv_in.weight.dtype))
        return self.quant_conv(m) if self.quant_conv is not None else m

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self._decoder_head()[0].weight.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _guarded(self, fn, x: torch.Tensor, what: str) -> torch.Tensor:
        """Run ``fn(x)``; on a float16 NaN/inf apply the overflow policy (one host read per call
        while a layer of the pass is float16; none for fake tensors, which hold no values:
        FakeTensorMode, the GPU-readiness test)."""
        out = fn(x)
        half = out.dtype == torch.float16 or what == "decode" and self.decoder.conv_in.weight.dtype == torch.float16
        if not half or is_fake(out) or torch.isfinite(out).all():
            return out
        if self.on_fp16_overflow == "raise":
            raise FP16OverflowError(
                f"VAE {what} overflowed in float16 (NaN/inf in the output). The released SDXL VAE "
                "does this; load it in float32 (dtype=torch.float32), use the fp16-fixed VAE "
                "(madebyollin/sdxl-vae-fp16-fix), or pass on_fp16_overflow='upcast'."
            )
        warnings.warn(f"VAE {what} overflowed in float16 (NaN/inf); {self._upcast()} and the call redone "
                      "(outputs are now float32). Load the VAE in float32 or use the fp16-fixed SDXL VAE to "
                      "avoid the wasted pass; on_fp16_overflow='raise' makes this an error.",
                      RuntimeWarning, stacklevel=3)
        return self._guarded(fn, x, what)  # once more at most: a second overflow upcasts the head too

    def _upcast(self) -> str:
        """One step up after an overflow, for good: a float16 VAE to float32 but for the decoder's
        head (:meth:`_decoder_head`, kept in float16 as diffusers' recipe does); an upcast one's
        head too. Says what it did."""
        if self.dtype == torch.float16:
            head = self._decoder_head()
            self.float()
            for m in head:
                m.to(torch.float16)
            return "the VAE was moved to float32 for good (post_quant_conv, decoder.conv_in and mid_block stay float16)"
        self.float()
        return "the decoder's float16 head (post_quant_conv, conv_in, mid_block) was moved to float32 too"

    # --- public ------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior of image ``x`` ([B,3,H,W] in [-1,1], H and W multiples of 8)."""
        _check_input(x, self.config.in_channels, self.scale_factor, "encode", "image")
        return DiagonalGaussian(self._guarded(self._encode, x, "encode"))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image in [-1,1] (not clamped) from unscaled latents ``z`` [B,4,h,w] → [B,3,8h,8w]."""
        _check_input(z, self.config.latent_channels, 1, "decode", "latent")
        return self._guarded(self._decode, z, "decode")

    def forward(self, x: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample else post.mean)


def _check_input(x: torch.Tensor, channels: int, multiple: int, what: str, kind: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"VAE {what}: expected a {kind} batch [B,{channels},H,W], got shape {tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(
            f"VAE {what}: height and width must be multiples of {multiple}, got {tuple(x.shape[2:])}; "
            "pad or resize the image first."
        )
