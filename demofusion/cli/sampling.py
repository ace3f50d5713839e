"""The sampler and the presets on the command line: one spelling per sampler, a --preset's values
for the flags not given, and the paper's run a preset's work is compared with."""

from __future__ import annotations

from ..errors import InputError
from ..run_presets import PAPER, preset_values
from ..schedulers import parse_sampler
from ..frontend.errors import CLIError
from .common import run_settings


def normalise_sampler(given: dict) -> dict:
    """--scheduler in any spelling ("DPM++ 2M Karras", dpmpp_2m …) → our name, the σ schedule it
    names → --sigmas, so a run records (and a resume compares) one spelling."""
    if not given.get("scheduler"):
        return given
    try:
        key, kind = parse_sampler(given["scheduler"], given.get("sigmas"))
    except InputError as e:
        raise CLIError(f"--{e}") from None
    return {**given, "scheduler": key, **({"sigmas": kind} if kind else {})}


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
