"""The ``tiny`` preset: random-weight SDXL-shaped components built offline in a second.

Everything about it is real code (UNet, VAE, text encoders, byte-level CLIP tokenizer, Euler
scheduler); only the weights are seeded noise, so its images are noise too.
"""

from __future__ import annotations

import math

import torch


def random_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights: matrices/convs ~ N(0, 1/fan_in), norm gains 1 + 0.1·N, biases 0.1·N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                r = r / math.sqrt(p[0].numel())
            else:
                r = 1 + 0.1 * r if name.endswith("weight") else 0.1 * r
            p.copy_(r.to(p.dtype))
    return module


def tiny_components(seed: int = 0, device="cpu", dtype=torch.float32):
    """(unet, vae, text, scheduler) of the ``tiny`` preset (UNet sample_size 32 → 256-px base)."""
    from .schedulers import SDXL_BASE_CONFIG, EulerDiscreteScheduler
    from .text import TextEncoders
    from .unet import UNet, UNetConfig
    from .vae import AutoencoderKL, VAEConfig

    unet = random_init_(UNet(UNetConfig.preset("tiny")), seed).eval().requires_grad_(False)
    vae = random_init_(AutoencoderKL(VAEConfig.preset("tiny")), seed + 1).eval().requires_grad_(False)
    text = TextEncoders.preset("tiny", seed=seed + 2)
    sched = EulerDiscreteScheduler.from_config(SDXL_BASE_CONFIG)
    return unet.to(device, dtype), vae.to(device, dtype), text.to(device, dtype), sched
