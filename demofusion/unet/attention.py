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
        self.self_attention = context_dim is None  # attn1: q, k, v all from x (fuse_qkv applies)

    def forward(self, x: torch.Tensor, context: torch.Tensor | CrossContext | None = None) -> torch.Tensor:
        if isinstance(context, CrossContext):
            return self._skip_zero_rows(x, context)
        b, n, _ = x.shape
        if context is None and self.fused:
            q, k, v = self.to_qkv(x).split(self._qkv_rows, dim=-1)
        else:
            ctx = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))

    # ---- fused q/k/v (opt-in) -------------------------------------------------------------
    @property
    def fused(self) -> bool:
        """``to_q``, ``to_k``, ``to_v`` are one Linear, ``to_qkv`` (:meth:`fuse_qkv`)."""
        return "to_qkv" in self._modules

    def fuse_qkv(self) -> bool:
        """Self-attention: replace ``to_q``, ``to_k``, ``to_v`` by one Linear ``to_qkv`` whose weight
        is theirs stacked by rows, so x is read once and one GEMM computes q, k and v (equal to
        three GEMMs up to their rounding). Only plain ``nn.Linear`` projections with loaded weights
        of one dtype and device fuse (fp8 ones keep a scale each: they stay apart). ``state_dict``
        keeps the three keys; a LoRA fuses into the rows (:meth:`projection_weight`). Returns
        whether the projections are fused now."""
        if self.fused or not self.self_attention:
            return self.fused
        projs = [self._modules[n] for n in _QKV]
        ws = [p.weight for p in projs]
        if any(type(p) is not nn.Linear or p.bias is not None or w.is_meta for p, w in zip(projs, ws)) or \
                len({(w.dtype, w.device, w.shape[1]) for w in ws}) > 1:
            return False
        fused = nn.Linear(ws[0].shape[1], sum(w.shape[0] for w in ws), bias=False, device="meta")
        fused.weight = nn.Parameter(torch.cat([w.detach() for w in ws]), requires_grad=ws[0].requires_grad)
        self._qkv_rows = [w.shape[0] for w in ws]
        self._swap_modules({"to_q": {"to_qkv": fused}, "to_k": {}, "to_v": {}})
        if not getattr(self, "_qkv_hooks", False):  # once: the hooks do nothing while unfused
            self.register_state_dict_post_hook(_unfused_state_dict)
            self.register_load_state_dict_pre_hook(_fused_load_state_dict)
            self._qkv_hooks = True
        return True

    def unfuse_qkv(self) -> bool:
        """Undo :meth:`fuse_qkv`: ``to_q``, ``to_k``, ``to_v`` again, their weights copies of the
        fused rows (bit for bit those fused, LoRAs fused since included). Returns whether it
        was fused."""
        if not self.fused:
            return False
        w = self.to_qkv.weight
        projs = {}
        for name, rows in zip(_QKV, w.detach().split(self._qkv_rows)):
            projs[name] = nn.Linear(rows.shape[1], rows.shape[0], bias=False, device="meta")
            projs[name].weight = nn.Parameter(rows.clone(), requires_grad=w.requires_grad)
        self._swap_modules({"to_qkv": projs})
        return True

    def projection_weight(self, name: str) -> torch.Tensor | None:
        """While fused: the rows of ``to_qkv.weight`` that are projection ``name``'s weight
        ("to_q", "to_k" or "to_v"), a view (writing it writes the fused weight); else None."""
        if not self.fused or name not in _QKV:
            return None
        return self.to_qkv.weight.detach().split(self._qkv_rows)[_QKV.index(name)]

    def _swap_modules(self, swaps: dict) -> None:
        """Children renamed in place, in order (state_dict and named_modules order follow it):
        each child named in ``swaps`` gives way to the modules it maps to."""
        kept = [(k, m) for name, child in self._modules.items()
                for k, m in (swaps[name].items() if name in swaps else [(name, child)])]
        self._modules.clear()
        self._modules.update(kept)

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


_QKV = ("to_q", "to_k", "to_v")


def _unfused_state_dict(module: Attention, state_dict, prefix: str, local_metadata) -> None:
    """A fused attention's state_dict entries as the unfused one's: ``to_qkv.weight`` becomes
    ``to_q.weight``, ``to_k.weight``, ``to_v.weight`` (views of its rows), in their place."""
    fused = prefix + "to_qkv.weight"
    if fused not in state_dict:
        return
    ours = [(k, state_dict.pop(k)) for k in list(state_dict) if k.startswith(prefix)]  # the tail: ours
    for k, v in ours:
        if k != fused:
            state_dict[k] = v
            continue
        for name, rows in zip(_QKV, v.split(module._qkv_rows)):
            state_dict[f"{prefix}{name}.weight"] = rows


def _fused_load_state_dict(module: Attention, state_dict, prefix: str, *args) -> None:
    """Loading into a fused attention: the three projection weights stacked into ``to_qkv.weight``."""
    keys = [f"{prefix}{name}.weight" for name in _QKV]
    if module.fused and all(k in state_dict for k in keys):
        state_dict[prefix + "to_qkv.weight"] = torch.cat([state_dict.pop(k) for k in keys])


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
