"""Separable Gaussian blur (zero padding, 'same' size) and mean/std matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(size: int, std: float | torch.Tensor, dtype=torch.float32, device=None) -> torch.Tensor:
    """g_k ∝ exp(−(k − (size−1)/2)² / 2σ²), k = 0..size−1, normalised to Σ g = 1.

    ``std``: a number or a 0-d float32 tensor (e.g. from the cosine schedule; a CPU one is used
    as it is, never read on the host) — the kernel is the same to the bit either way."""
    x = torch.arange(size, dtype=dtype, device=device)
    if isinstance(std, torch.Tensor):  # 2σ² in ≥ float32, as a Python number would be used
        std = std.to(torch.promote_types(dtype, torch.float32))
    two_var = 2 * std**2
    # a σ so small that 2σ² underflows to 0 would give 0/0 = NaN at the centre: its limit is the
    # identity kernel (1 at the centre, 0 elsewhere), which the smallest normal 2σ² gives exactly;
    # every σ whose 2σ² is representable keeps its bits
    if isinstance(two_var, torch.Tensor):
        two_var = two_var.clamp_min(torch.finfo(two_var.dtype).tiny)
    else:
        two_var = max(two_var, torch.finfo(dtype).tiny)
    g = torch.exp(-((x - (size - 1) / 2) ** 2) / two_var)
    return g / g.sum()


def gaussian_blur(x: torch.Tensor, size: int, std: float | torch.Tensor) -> torch.Tensor:
    """Blur [B,C,H,W] with the size×size Gaussian g gᵀ as two 1-D passes, zero padding size//2."""
    if size <= 1:
        return x
    c = x.shape[1]
    g = gaussian_kernel1d(size, std, dtype=x.dtype, device=x.device)
    x = F.conv2d(x, g.view(1, 1, size, 1).expand(c, 1, size, 1), padding=(size // 2, 0), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, size).expand(c, 1, 1, size), padding=(0, size // 2), groups=c)


def match_mean_std(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   valid: tuple[slice, slice] | None = None) -> torch.Tensor:
    """(x − mean(x)) / std(x) · std + mean, statistics of x taken over ``valid`` (default all)."""
    ref = x if valid is None else x[..., valid[0], valid[1]]
    return (x - ref.mean()) / ref.std() * std + mean
