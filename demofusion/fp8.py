"""Opt-in fp8 weight storage: Linear/Conv2d weights kept as ``float8_e4m3fn``, upcast per layer.

    from demofusion.fp8 import to_fp8_
    to_fp8_(pipe.unet)            # in place; off unless called

Every ``nn.Linear`` / ``nn.Conv2d`` weight becomes fp8 (1 byte per value) plus, by default, one
fp32 per-tensor scale ``amax / 448`` so the whole e4m3 range is used (``scale=None``: a plain cast,
as ComfyUI's fp8 UNet option). In forward the weight is upcast to the activation dtype and
rescaled, ``F.linear(x, w_fp8.to(x.dtype) * scale, bias)``, so compute stays in fp16/bf16/fp32 and
only the weight storage shrinks (plus one transient layer weight in the activation dtype).
Biases, norms and embeddings keep their dtype.

The modules change class in place (``FP8Linear`` / ``FP8Conv2d``, subclasses of the originals with
the same attributes, parameter names and forward signature), so the model code is untouched and
references to the modules stay valid. ``conv_in`` and ``conv_out`` are skipped by default: they are
the first and last layers (the most sensitive, 23 k parameters in SDXL), and ``UNet.dtype`` /
``UNet.device`` read ``conv_in.weight``, which so keeps naming the activation dtype.

``.to(device)`` moves everything; ``.to(dtype)`` / ``.half()`` re-type the rest of the model but
keep fp8 weights fp8 and scales fp32. Convert *after* loading weights: ``load_state_dict`` into an
fp8 module casts without rescaling. A converted model's ``state_dict`` holds fp8 ``weight`` tensors
and ``weight_scale`` entries, which diffusers cannot read: save before converting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tensors import weight_bytes  # noqa: F401  (part of this module's API: docs/big-images.md)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DEFAULT_SKIP = ("conv_in", "conv_out")


class _FP8Weight:
    """Mixin: fp8 ``weight`` parameter + optional fp32 0-dim ``weight_scale`` buffer."""

    weight: nn.Parameter
    weight_scale: torch.Tensor | None

    def _quantise_(self, dtype: torch.dtype, scale: str | None) -> None:
        with torch.no_grad():
            w = self.weight.detach().float()
            top = torch.finfo(dtype).max
            s = None
            if scale == "tensor":
                amax = w.abs().amax()
                s = torch.where(amax > 0, amax / top, torch.ones_like(amax))  # all-zero weight: 1
                w = w / s
            q = w.clamp(-top, top).to(dtype)  # not in place: .float() of fp32 is the weight itself
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", s, persistent=True)

    def dequantised_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype`` (what forward computes with): one new tensor, scaled in place by
        the 0-dim fp32 scale (no promotion; the multiply runs in the kernel's fp32 opmath). One
        allocation and two kernels (cast, scale): float8 takes no part in type promotion, so no
        eager op reads fp8 and scales in one pass; ``torch.compile`` fuses the two into one."""
        w = self.weight.to(dtype, copy=True)
        return w if self.weight_scale is None else w.mul_(self.weight_scale)

    def _apply(self, fn, recurse=True):
        w, s = self.weight.data, self.weight_scale
        super()._apply(fn, recurse)
        # .to(dtype)/.half() would re-type the fp8 storage: cast back (fp8 → any float → fp8 is exact)
        if self.weight.dtype != w.dtype and self.weight.dtype.is_floating_point:
            self.weight.data = self.weight.data.to(w.dtype)
        if s is not None and self.weight_scale.dtype != s.dtype:  # keep the scale exact (fp32)
            self.weight_scale = s.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        how = "per-tensor scale" if self.weight_scale is not None else "plain cast"
        return f"{super().extra_repr()}, weight={self.weight.dtype} ({how})"


class FP8Linear(_FP8Weight, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantised_weight(x.dtype), self.bias)


class FP8Conv2d(_FP8Weight, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.dequantised_weight(x.dtype), self.bias)


_CLASSES = {nn.Linear: FP8Linear, nn.Conv2d: FP8Conv2d}


def to_fp8_(module: nn.Module, dtype: torch.dtype = torch.float8_e4m3fn, scale: str | None = "tensor",
            skip=DEFAULT_SKIP) -> nn.Module:
    """Store the weight of every ``nn.Linear`` / ``nn.Conv2d`` in ``module`` as ``dtype``, in place.

    ``scale="tensor"``: a per-tensor fp32 scale ``amax / finfo(dtype).max`` (448 for e4m3);
    ``scale=None``: plain cast (values beyond the fp8 range are clamped to it).
    ``skip``: module names (as in ``named_modules``) left as they are; default ``conv_in`` and
    ``conv_out`` (see the module doc). Modules already in fp8 are left alone. Returns ``module``.
    Works on any device: quantisation runs where the weights are.
    """
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype must be one of {FP8_DTYPES}, not {dtype}")
    if scale not in ("tensor", None):
        raise ValueError(f"scale must be 'tensor' or None, not {scale!r}")
    fused = [n for n, m in module.named_modules() if getattr(m, "fused", False) is True]
    if fused:  # one fp8 scale for q, k and v together would not be the unfused model's fp8
        raise ValueError(f"{len(fused)} attentions have fused q/k/v projections (e.g. {fused[0]}): "
                         "call unfuse_qkv() before to_fp8_ (fp8 projections are never fused)")
    skip = set(skip or ())
    for name, m in list(module.named_modules()):
        cls = _CLASSES.get(type(m))  # exact types only: subclasses may have their own forward
        if cls is None or name in skip or m.weight.is_meta:
            continue
        m.__class__ = cls
        m._quantise_(dtype, scale)
    return module


def is_fp8(module: nn.Module) -> bool:
    """True when any parameter or buffer of ``module`` is stored in an fp8 dtype."""
    return any(t.dtype in FP8_DTYPES for t in (*module.parameters(), *module.buffers()))
