"""Seeded random weights for offline presets and tests: here, below the component packages
(text, unet, vae, controlnet), so that they can build their own random presets without importing
:mod:`demofusion.presets`, which imports them."""

from __future__ import annotations

import math

import torch


def random_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights: matrices/convs ~ N(0, 1/fan_in), norm gains 1 + 0.1·N, biases 0.1·N.
    Parameters on the meta device (shapes only) are left as they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.is_meta:
                continue
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                r = r / math.sqrt(p[0].numel())
            else:
                r = 1 + 0.1 * r if name.endswith("weight") else 0.1 * r
            p.copy_(r.to(p.dtype))
    return module
