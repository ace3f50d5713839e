"""A deterministic toy denoiser for scheduler trajectories, and the relative error they are judged by."""

from __future__ import annotations

import torch


def standin_model(seed=0):
    """Fixed random conv net standing in for the UNet; output depends on x and t."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(8, 4, 3, 3, generator=g) / 6
    w2 = torch.randn(4, 8, 3, 3, generator=g) / 8
    tv = torch.randn(1, 8, 1, 1, generator=g)

    def model(x, t):
        h = torch.nn.functional.conv2d(x, w1, padding=1) + tv * (float(t) / 1000)
        return torch.nn.functional.conv2d(torch.tanh(h), w2, padding=1)

    return model


def rel(a, b):
    """max |a − b| / max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()
