"""The range of a LoRA's scale, shared by the API (``pipe.load_lora``, :class:`LoraStack`,
:func:`fuse_lora`), the CLI's ``--lora FILE:SCALE`` and a replayed PNG's ``lora`` field."""

from __future__ import annotations

import math

from .formats import LoraError

# |scale| beyond this is refused: LoRAs are used at 0.2 … 1.5 (sliders at ±5); beyond ±10 the update
# dwarfs the weights it is added to and a run ends in NaN or noise, never in a picture
MAX_SCALE = 10.0


def check_scale(scale, what: str = "LoRA scale") -> float:
    """``scale`` as a float, refused (one line) unless a finite number within ±MAX_SCALE."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = None
    if isinstance(scale, bool) or value is None:
        raise LoraError(f"{what} {scale!r}: not a number; give e.g. 0.8 (a finite number in "
                        f"-{MAX_SCALE:g} … {MAX_SCALE:g}, default 1)")
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise LoraError(f"{what} {scale!r}: must be a finite number in -{MAX_SCALE:g} … {MAX_SCALE:g} "
                        "(typical LoRAs are used at 0.5 … 1; default 1)")
    return value
