"""Offload "sequential": a model's units stream through the device one at a time, and on CUDA the
next unit's weights are copied in on a side stream while the current unit computes.

:class:`Streamer` is driven by each unit's forward hooks (demofusion/placement.py installs them):
``before(unit)`` brings the unit, ``after(unit)`` sends it home. Which unit comes next is learned:
the unit that followed this one last time (a stage's first call learns the order, the calls after
it repeat it). With a copy stream, while unit u computes, its successor is copied in:

1. the copy stream waits for the compute stream (the copies may reuse memory the compute stream
   has just released: its last reads must be done);
2. each copy is allocated on the compute stream's memory pool and written on the copy stream, then
   marked as used there (``record_stream``): memory freed later, even of a copy the compute stream
   never read (a wrong guess), is not reused before the copy has landed;
3. when the successor is called, the compute stream waits for the copy stream, then computes.

A wrong guess is dropped (its copies sent home) and the unit called is brought as without a copy
stream. At most two units are on the device then: the one computing and the one coming. Without a
copy stream (any device but CUDA) every unit is brought when called, on the one stream, as before.

A copy stream offers ``begin()`` (step 1), ``copy(home, device)`` (step 2, returns the copy) and
``compute_waits()`` (step 3): :class:`CudaCopyStream` on a GPU; :class:`SameStream` where CUDA is
pretended (fake tensors: the order and the memory of two units are real, nothing waits); tests
pass a recording stand-in.
"""

from __future__ import annotations

import contextlib

import torch

from .tensors import is_fake


class CudaCopyStream:
    """A side CUDA stream for the copies (steps 1–3 of the module doc)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def begin(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def copy(self, home: torch.Tensor, device) -> torch.Tensor:
        out = torch.empty_like(home, device=device)  # on the compute stream's pool (current stream)
        with torch.cuda.stream(self.stream):
            out.copy_(home, non_blocking=True)
        if not is_fake(out):  # (memory tests on a GPU machine: fake tensors have no blocks)
            out.record_stream(self.stream)
        return out

    def compute_waits(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


class SameStream:
    """Copies issued where the compute runs (pretend CUDA has no streams): nothing to wait for."""

    def begin(self) -> None:
        pass

    def copy(self, home: torch.Tensor, device) -> torch.Tensor:
        return home.to(device, non_blocking=True, copy=True)

    def compute_waits(self) -> None:
        pass


def copy_stream_for(device: torch.device):
    """The copy stream for streaming onto ``device``: a CUDA side stream on a GPU, a
    :class:`SameStream` for pretend CUDA (no CUDA runtime), None elsewhere (no prefetching)."""
    if device.type != "cuda":
        return None
    return CudaCopyStream(device) if torch.cuda.is_available() else SameStream()


class Streamer:
    """One stage's streaming (module doc). ``bring(units, copy=None)`` and ``send_home(units)`` are
    the placement's; ``copies`` a copy stream or None. ``hits`` / ``misses``: guesses that were
    right / dropped."""

    def __init__(self, bring, send_home, copies=None):
        self._bring, self._send_home, self.copies = bring, send_home, copies
        self._next: dict = {}  # unit → the unit called after it last time
        self._last = self._coming = None  # the unit called last; the one copied in ahead
        self._depth: dict = {}  # unit → its calls under way (a unit may call itself: zero_context's rows)
        self.hits = self.misses = 0

    def before(self, unit) -> None:
        self._depth[unit] = self._depth.get(unit, 0) + 1
        if self._depth[unit] > 1:
            return  # called from its own forward: here already, and staying until that one ends
        if self._last is not None:
            self._next[self._last] = unit
        self._last = unit
        if self._coming is unit:
            self.copies.compute_waits()
            self.hits += 1
        else:
            self.misses += self._coming is not None
            self.drop()
            self._bring([unit])
        self._coming = None
        coming = self._next.get(unit)
        if self.copies is not None and coming is not None and coming is not unit:
            self.copies.begin()
            self._bring([coming], copy=self.copies.copy)
            self._coming = coming

    def after(self, unit) -> None:
        self._depth[unit] -= 1
        if not self._depth[unit]:
            self._send_home([unit])

    def drop(self) -> None:
        """The unit copied in ahead, if any, goes home unused (a wrong guess, or the stage's end)."""
        if self._coming is not None:
            self._send_home([self._coming])
            self._coming = None

    @contextlib.contextmanager
    def hooked(self, units):
        """``units``' forward hooks call :meth:`before` / :meth:`after` while the context lasts."""
        hooks = [h for u in units for h in (  # always_call: a forward that raises still ends its call
            u.register_forward_pre_hook(lambda u, args: self.before(u)),
            u.register_forward_hook(lambda u, args, out: self.after(u), always_call=True))]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
