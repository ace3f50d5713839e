"""A test-time guard for GPU determinism and blocking copies, usable on fake CUDA (no GPU needed).

:class:`CudaGuard` is a ``TorchDispatchMode``; it sees every aten op a run makes, fake or real:

* **nondeterministic ops** — on a CUDA tensor, ops that *accumulate* through atomics in no fixed
  order (``index_add``, ``scatter_add``, ``scatter_reduce`` sum/mean, ``index_put``/``put_`` with
  ``accumulate=True``, floating ``cumsum``, ``histc``, weighted ``bincount``: PyTorch's
  reproducibility notes and ``torch.use_deterministic_algorithms``). With ``strict`` (default)
  the op raises :class:`NondeterministicOp` at once; the op name is kept in ``nondeterministic``.
  Writes to distinct places (``index_copy_``, ``index_put_`` without accumulate) are allowed:
  they are deterministic when the indices are distinct, which fake tensors cannot check — the
  code using them must make its indices distinct by construction (and test that on the CPU).
* **host→device copies** — ``_to_copy`` / ``copy_`` from a CPU tensor (any size, 0-d included)
  to CUDA (``.to``, ``.cuda()``, ``torch.tensor(…, device="cuda")``, ``cuda[...] = cpu`` all land
  there), and the copies an op makes inside itself: CUDA indexing with CPU index tensors
  (``index``, ``index_put_`` …, 0-d included), or any other op given a CPU tensor of ≥ 1
  dimension beside a CUDA one (a 0-d CPU tensor is passed by value: no copy). Kept in ``h2d``
  as ``(op, shape, pinned, non_blocking)`` (implicit copies: never non-blocking). ``blocking``
  lists those that stall the host: from pageable memory, or not ``non_blocking``. Fake tensors do not keep
  the pinned flag, so the guard remembers the outputs of ops that asked for pinned memory
  (``pin_memory=True``, ``aten._pin_memory``); a real CPU tensor answers ``is_pinned()``.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten


class NondeterministicOp(RuntimeError):
    """A CUDA op whose result depends on the order of atomic additions."""


# overload packets whose CUDA kernels accumulate in no fixed order whatever their arguments
_ALWAYS = {aten.index_add, aten.index_add_, aten.scatter_add, aten.scatter_add_, aten.histc,
           aten.index_reduce, aten.index_reduce_}


# ops that copy CPU index tensors to the device inside themselves (a 0-d index included)
_INDEXING = {aten.index, aten._unsafe_index, aten.index_put, aten.index_put_, aten._index_put_impl_,
             aten._unsafe_index_put}


def _accumulates(func, args, kwargs) -> bool:
    """Whether this call is an order-dependent accumulation (the argument-dependent cases)."""
    packet = func.overloadpacket
    if packet in _ALWAYS:
        return True
    if packet in (aten.index_put, aten.index_put_, aten._index_put_impl_, aten._unsafe_index_put):
        return bool(kwargs.get("accumulate", args[3] if len(args) > 3 else False))
    if packet in (aten.put, aten.put_):
        return bool(kwargs.get("accumulate", args[3] if len(args) > 3 else False))
    if packet in (aten.scatter_reduce, aten.scatter_reduce_):
        return (kwargs.get("reduce", args[4] if len(args) > 4 else None)) in ("sum", "mean")
    if packet in (aten.cumsum, aten.cumsum_):
        return args[0].is_floating_point() or args[0].is_complex()
    if packet is aten.bincount:
        return kwargs.get("weights", args[1] if len(args) > 1 else None) is not None
    return False


class CudaGuard(TorchDispatchMode):
    """Fails on CUDA-nondeterministic ops; records host→device copies (see the module doc)."""

    def __init__(self, strict: bool = True):
        super().__init__()
        self.strict = strict
        self.nondeterministic: list[str] = []
        self.h2d: list[tuple[str, tuple, bool, bool]] = []
        self._pinned = WeakTensorKeyDictionary()  # tensor → True, by identity

    @property
    def blocking(self) -> list[tuple[str, tuple, bool, bool]]:
        """The host→device copies that stall the host: pageable source or a blocking copy."""
        return [c for c in self.h2d if not (c[2] and c[3])]

    def _is_pinned(self, t: torch.Tensor) -> bool:
        if t in self._pinned:
            return True
        try:
            return bool(t.is_pinned())
        except RuntimeError:  # no CUDA on this machine: nothing real can be pinned
            return False

    def _note_copy(self, func, args, kwargs) -> None:
        packet = func.overloadpacket
        if packet is aten._to_copy:
            src, dst = args[0], kwargs.get("device")
            non_blocking = bool(kwargs.get("non_blocking", False))
        elif packet is aten.copy_:
            dst, src = args[0].device, args[1]
            non_blocking = bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
        else:
            return self._note_implicit(func, args, kwargs)
        if isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst is not None \
                and torch.device(dst).type == "cuda":
            self.h2d.append((str(func), tuple(src.shape), self._is_pinned(src), non_blocking))

    def _note_implicit(self, func, args, kwargs) -> None:
        """CPU tensors an op on CUDA tensors copies over itself (CPU indices, …)."""
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if not any(t.device.type == "cuda" for t in tensors):
            return
        indexing = func.overloadpacket in _INDEXING
        for t in tensors:
            if t.device.type == "cpu" and (t.dim() > 0 or indexing):
                self.h2d.append((str(func), tuple(t.shape), self._is_pinned(t), False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.device.type == "cuda" for t in tensors) and _accumulates(func, args, kwargs):
            self.nondeterministic.append(str(func))
            if self.strict:
                raise NondeterministicOp(f"{func} on CUDA accumulates in no fixed order")
        self._note_copy(func, args, kwargs)
        out = func(*args, **kwargs)
        if kwargs.get("pin_memory") or func.overloadpacket is aten._pin_memory:
            self._pinned.update({o: True for o in tree_leaves(out) if isinstance(o, torch.Tensor)})
        return out
