"""A phase's random numbers: drawn on the host from the phase's CPU generator, in the documented
order, and handed to the device without a blocking copy (docs/algorithm.md, "Randomness").

Why the host: a CPU ``torch.Generator`` gives the same numbers on every machine, device and rank,
so the same seed gives the same jitter and noise on a CPU, a GPU or N ranks (a CUDA generator's
numbers would depend on the device). Why ahead and pinned: a copy from pageable host memory
stalls the host until the device has caught up, and a step that copies from the host cannot be
replayed as a CUDA graph; so nothing is drawn or copied from pageable memory inside a step.

Order, per step i of a phase (after its starting noise): the window jitter
``u_i = torch.rand([V, 2], float64)`` when the phase jitters V windows, then, for stochastic
samplers, the noise canvas ``n_i = torch.randn(z.shape)``. Without a noise canvas nothing comes
between two steps' jitters, and one ``torch.rand([S, V, 2])`` *is* the S draws one after the
other, bit for bit (the CPU generator fills a tensor in element order; tests/pipeline/test_determinism.py):
the phase's corners are then made at once and copied once. With a noise canvas each step's draws
are made when the step comes (canvases are large), in pinned memory, copied ``non_blocking``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import upload  # noqa: F401 (re-exported: the pipeline uploads through it)


@dataclass(frozen=True)
class Corners:
    """One step's window corners [V, 2] (long), on the host and on the device: gathering, merging
    and crop coordinates use the device copy (no copy in the step); what needs Python ints (the
    ControlNet pixel crops) reads the host copy (no device read)."""

    host: torch.Tensor
    device: torch.Tensor

    def __getitem__(self, i: int) -> "Corners":  # step i of a phase's [S, V, 2] corners
        return Corners(self.host[i], self.device[i])


class PhaseDraws:
    """The random numbers of one phase from its generator ``g`` (module doc): :meth:`step` gives
    step i's window corners and noise canvas on ``device``; steps are taken in order.

    ``place``: jitter uniforms [..., V, 2] → the local windows' corners [..., V, 2] on the host
    (``place(None)``: unjittered); None when the phase has no local windows. ``jitter``: draw the
    uniforms (else the corners are fixed, made and copied once). ``noise_shape``: a noise canvas
    per step (stochastic samplers), or None. ``first``: the first of the ``steps`` schedule entries
    the phase runs (``upscale_strength`` < 1): only entries ``first …`` draw."""

    def __init__(self, g: torch.Generator | None, steps: int, device, place=None, jitter: bool = False,
                 noise_shape=None, first: int = 0):
        self.g, self.device, self.place, self.noise_shape = g, torch.device(device), place, noise_shape
        self.first, steps = first, steps - first
        self.views = 0 if place is None or not jitter else place(None).shape[0]
        self.fixed = None  # the corners of every step, or of every step stacked [S, V, 2]
        if place is not None and not jitter:
            self.fixed = self._corners(place(None))
        elif self.views and noise_shape is None:  # = the S per-step draws, bit for bit
            self.fixed = self._corners(place(torch.rand((steps, self.views, 2), generator=g, dtype=torch.float64)))
        self.stacked = self.fixed is not None and self.fixed.host.dim() == 3

    def _corners(self, host: torch.Tensor) -> Corners:
        return Corners(host, upload(host, self.device))

    def step(self, i: int) -> tuple[Corners | None, torch.Tensor | None]:
        """(corners, noise) of step i, drawn now if not drawn ahead: the jitter first, then the noise."""
        if self.fixed is not None:
            corners = self.fixed[i - self.first] if self.stacked else self.fixed
        elif self.views:
            corners = self._corners(self.place(torch.rand((self.views, 2), generator=self.g, dtype=torch.float64)))
        else:
            corners = None
        noise = None
        if self.noise_shape is not None:
            pin = self.device.type == "cuda"
            noise = torch.randn(self.noise_shape, generator=self.g, pin_memory=pin).to(self.device, non_blocking=pin)
        return corners, noise
