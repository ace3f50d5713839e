"""Where a run works and in which precision: ``device="auto"`` and the dtype that goes with it."""

from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(device="auto") -> torch.device:
    """``"auto"``: CUDA if present, then Apple's MPS, else the CPU; anything else is checked."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device {device!r}: only cpu, cuda and mps are supported")
    return dev


def default_dtype(device) -> torch.dtype:
    """fp16 on CUDA and MPS (the released SDXL weights are fp16-safe with our VAE upcast), fp32 on the CPU."""
    return torch.float16 if torch.device(device).type in ("cuda", "mps") else torch.float32


def upload(x: torch.Tensor, device) -> torch.Tensor:
    """Host tensor ``x`` on ``device`` without stalling the host: on CUDA through pinned memory and
    a ``non_blocking`` copy (the caching host allocator keeps the pinned block until the copy has
    run, so ``x`` may be dropped at once); elsewhere, or when ``x`` is not on the host, ``x.to``."""
    if torch.device(device).type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x)  # (fake tensors lack .pin_memory())
    return pinned.to(device, non_blocking=True)
