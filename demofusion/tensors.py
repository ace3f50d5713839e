"""What the package asks of tensors themselves, below every model: whether one is fake (the memory
tests' ``FakeTensorMode``: shapes and dtypes, no values), how many bytes a module's weights hold,
and which weight tells a model's dtype and device.

The fake-tensor names come from ``torch._subclasses``, a private module: this is the one place that
imports them, so a torch that moves or lacks them changes one file (without them nothing is fake,
and host reads need no escape from a fake mode).
"""

from __future__ import annotations

import torch

try:
    from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
except ImportError:  # pragma: no cover - older torch
    from contextlib import nullcontext as unset_fake_temporarily

    def is_fake(t) -> bool:
        return False

__all__ = ["is_fake", "unset_fake_temporarily", "tensors_of", "weight_bytes", "DtypeDevice"]


def tensors_of(objs) -> list[torch.Tensor]:
    """The tensors in ``objs``: tensors, modules' parameters and buffers, lists/tuples of them."""
    out = []
    for o in objs:
        if isinstance(o, torch.nn.Module):
            out += [*o.parameters(), *o.buffers()]
        elif isinstance(o, (list, tuple)):
            out += tensors_of(o)
        elif isinstance(o, torch.Tensor):
            out.append(o)
    return out


def weight_bytes(*objs) -> int:
    """Bytes of the values of the parameters and buffers of the modules in ``objs`` (and of any
    tensors, lists or tuples there): ``numel × element_size`` each, a tensor met twice counted once.
    fp8 layers count their 1-byte weights and their scales; fake and meta tensors count as real ones."""
    seen = {id(t): t for t in tensors_of(objs)}
    return sum(t.numel() * t.element_size() for t in seen.values())


class DtypeDevice:
    """``.dtype`` and ``.device`` of a model (a mixin before ``nn.Module``): those of the one weight
    its ``_reference_weight()`` returns, which follows the model's ``.to()`` but not fp8 storage
    (fp8 layers keep 1-byte weights while the model computes in fp16/bf16/fp32)."""

    def _reference_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self._reference_weight().dtype

    @property
    def device(self) -> torch.device:
        return self._reference_weight().device
