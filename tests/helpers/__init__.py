"""Shared test helpers: seeded random weights, official on-disk layouts, comparisons.

Component-specific factories live beside this file (``helpers/unet.py``, ``helpers/vae.py``,
``helpers/text.py`` …); each builds the *reference* module (diffusers / transformers /
open_clip) in a tiny or real-shaped config, fills it with seeded random weights and writes
it in the layout the released files use, so our loaders are always tested on files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# seeded random weights: the package's own initialiser (presets use it too), under the tests' name
from demofusion.weights.seeded import random_init_ as seeded_init_  # noqa: F401


def save_tensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write a flat ``{name: tensor}`` dict as safetensors (contiguous, no shared storage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path), metadata)
    return path


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours − ref| / max|ref| (the parity measure used across the tests)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4, what: str = "") -> float:
    err = max_rel_err(ours, ref)
    assert err <= tol, f"{what} max|Δ|/max|ref| = {err:.3e} > {tol:.1e}"
    return err
