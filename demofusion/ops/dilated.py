"""Dilated sampling as a reshape: the s² interleaved sub-latents z[:, :, i::s, j::s] and back."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, s: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad x top/left so H and W are multiples of s; returns (padded, (pad_h, pad_w))."""
    ph, pw = (-x.shape[-2]) % s, (-x.shape[-1]) % s
    return (F.pad(x, (pw, 0, ph, 0)) if ph or pw else x), (ph, pw)


def dilate(x: torch.Tensor, s: int) -> torch.Tensor:
    """[B,C,H,W] (H, W multiples of s) → [s²·B, C, H/s, W/s]; sub-latent k = (i, j) = divmod(k, s)
    is x[:, :, i::s, j::s] (view-major, like :func:`demofusion.ops.gather_views`)."""
    b, c, h, w = x.shape
    if h % s or w % s:
        raise ValueError(f"dilate: size {h}×{w} is not a multiple of s={s}; pad_to_multiple first")
    y = x.reshape(b, c, h // s, s, w // s, s).permute(3, 5, 0, 1, 2, 4)  # [i, j, B, C, h/s, w/s]
    return y.reshape(s * s * b, c, h // s, w // s)


def undilate(y: torch.Tensor, s: int) -> torch.Tensor:
    """Exact inverse of :func:`dilate`: [s²·B, C, h, w] → [B, C, s·h, s·w]."""
    n, c, h, w = y.shape
    b = n // (s * s)
    x = y.reshape(s, s, b, c, h, w).permute(2, 3, 4, 0, 5, 1)  # [B, C, h, i, w, j]
    return x.reshape(b, c, h * s, w * s)
