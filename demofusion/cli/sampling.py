"""The presets on the command line: a --preset's values for the flags not given, and the paper's
run a preset's work is compared with (the sampler's one spelling: frontend/sampling.py)."""

from __future__ import annotations

from ..run_presets import PAPER, preset_values
from .common import run_settings


def with_preset(given: dict) -> dict:
    """The flags given, and what their --preset sets for the flags not given (an explicit
    --scheduler drops the preset's --sigmas too)."""
    if not given.get("preset"):
        return given
    explicit = {"sampler" if k == "scheduler" else k for k in given}
    values = preset_values(given["preset"], explicit)
    return {("scheduler" if k == "sampler" else k): v for k, v in values.items()} | given


def paper_settings(params: dict, base: int, **extra):
    """The settings of ``params`` as the paper runs them (run_presets.PAPER), the model's sampler."""
    return run_settings({**params, **PAPER, "scheduler": None, "sigmas": None, "timestep_spacing": None}, base, **extra)
