"""Seeded random weights for offline presets and tests (tests/helpers' ``seeded_init_`` is this one):
here, below the component packages (text, unet, vae, controlnet), so that they can build their own
random presets without importing :mod:`demofusion.presets`, which imports them."""

from __future__ import annotations

import math

import torch


def random_init_(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Seeded weights, every parameter (no zero-initialised layer left): matrices/convs
    ~ N(0, 1/fan_in)·scale, 1-D ``*weight`` (norm gains) ~ 1 + 0.1·N, other 1-D (biases) ~ 0.1·N;
    one draw per parameter in name order, so a seed and a module structure give the same bits.
    Parameters on the meta device (shapes only) are left as they are (and draw nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.is_meta:
                continue
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                r = r / math.sqrt(p[0].numel()) * scale
            else:
                r = 1 + 0.1 * r if name.endswith("weight") else 0.1 * r
            p.copy_(r.to(p.dtype))
    return module
