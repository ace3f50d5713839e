"""Timestep and micro-conditioning ("text_time") embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                         freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Fourier features of ``t`` [N] -> [N, dim] (float32).

    f_k = exp(-ln(max_period) · k / (dim/2 − shift)),  emb = [cos(t·f), sin(t·f)] (flipped order).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos
                    else [torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on Fourier features: linear_2(silu(linear_1(x)))."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
