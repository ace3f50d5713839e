"""Transformer blocks: multi-head attention via SDPA, GEGLU feed-forward, Transformer2DModel."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class CrossContext(NamedTuple):
    """A cross-attention context and the batch rows whose states are known to be all zero.

    ``zero_rows`` is a slice over the batch, known on the host (the caller built those zeros, e.g.
    SDXL's zero negative prompt), never checked on the device (a check would be a sync). The UNet
    wraps its context in one when called with ``zero_context=``; the blocks pass it on unopened.
    """

    states: torch.Tensor
    zero_rows: slice


def _rows_slice(rows: list[int]) -> slice:
    """``rows`` (ascending, an arithmetic progression) as a slice; ValueError otherwise."""
    if len(rows) <= 1:
        return slice(rows[0], rows[0] + 1) if rows else slice(0, 0)
    step = rows[1] - rows[0]
    if any(b - a != step for a, b in zip(rows, rows[1:])):
        raise ValueError(f"zero_context leaves rows {rows}, not evenly spaced: give a slice whose complement is one")
    return slice(rows[0], rows[-1] + 1, step)


class Attention(nn.Module):
    """softmax(Q Kᵀ / √d) V over ``heads`` heads; keys/values from ``context`` (or x itself)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | CrossContext | None = None) -> torch.Tensor:
        if isinstance(context, CrossContext):
            return self._skip_zero_rows(x, context)
        ctx = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))

    def _skip_zero_rows(self, x: torch.Tensor, context: CrossContext) -> torch.Tensor:
        """Rows with a zero context: k = v = 0 (to_k, to_v have no bias), so softmax(q·0) weighs
        zeros and the output is exactly ``to_out``'s bias — written, not computed. The other rows
        are attended as usual."""
        b, n, _ = x.shape
        zero = range(b)[context.zero_rows]
        keep = _rows_slice([r for r in range(b) if r not in zero])
        bias = self.to_out[0].bias.to(x.dtype)
        out = x.new_empty(b, n, bias.shape[0])
        out[context.zero_rows] = bias
        if keep.start != keep.stop:
            out[keep] = self(x[keep], context.states[keep])
        return out


class GEGLU(nn.Module):
    """[h, g] = proj(x);  h · gelu(g)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """net = [GEGLU(dim → 4·dim), dropout (a no-op placeholder), Linear(4·dim → dim)]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """x += attn1(norm1 x);  x += attn2(norm2 x, context);  x += ff(norm3 x)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, linear proj_in over pixels as tokens, ``depth`` blocks, proj_out, residual."""

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        head_dim = ch // heads
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = self.proj_out(t)
        return x + t.reshape(b, h, w, c).permute(0, 3, 1, 2)
