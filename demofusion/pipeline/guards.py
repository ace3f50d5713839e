"""Nothing non-finite leaves a run: latents are watched step by step, decoded images once."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError
from ..tensors import is_fake  # a FakeTensor (no values), e.g. under FakeTensorMode

_NEVER = 2**31 - 1


def likely_cause(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "likely an fp16 overflow in the UNet: try dtype bfloat16 or float32 (--dtype bfloat16)"
    # settings are checked to their documented ranges (σ, LoRA scales …), so what remains is rarer:
    # name both, the settings first (a run with the defaults tells them apart)
    return ("an extreme setting or damaged weights: try the default settings, and check the weights' values "
            "with `demofusion inspect`")


class FiniteWatch:
    """Remembers the first step of a phase whose latents hold NaN/Inf.

    On the CPU it raises at once; on an accelerator it keeps the step index on the device (no
    host read per step) and :meth:`check` reads it once, at the end of the phase. Fake tensors
    (``FakeTensorMode``: the GPU-readiness test) hold no values, so there is nothing to read.
    """

    def __init__(self, cause: str):
        self.cause = cause
        self.first: torch.Tensor | None = None

    def see(self, z: torch.Tensor, phase: int, step: int) -> None:
        bad = torch.where(torch.isfinite(z).all(), _NEVER, step)
        self.first = bad if self.first is None else torch.minimum(self.first, bad)
        if z.device.type == "cpu":
            self.check(phase)

    def check(self, phase: int) -> None:
        if self.first is None:
            return
        first, self.first = self.first, None
        if is_fake(first):  # no values to check (the read itself is the intended once-per-phase sync)
            return
        step = int(first)
        if step != _NEVER:
            raise NonFiniteError(f"phase {phase}, step {step + 1}: the latents became NaN/Inf ({self.cause}); "
                                 "nothing was saved for this phase")


def check_image(image: torch.Tensor, phase: int, cause: str) -> torch.Tensor:
    """The decoded image, or a one-line error if any value is NaN/Inf (a black image is no result).
    One host read per decoded phase; skipped for fake tensors (no values)."""
    if not is_fake(image) and not bool(torch.isfinite(image).all()):
        raise NonFiniteError(f"phase {phase}: the VAE decoded NaN/Inf values ({cause}); nothing was saved for this phase")
    return image
