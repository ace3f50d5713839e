"""The sampler's names as both front ends record them: one spelling per sampler (ours), and the
A1111 name a run's metadata carries."""

from __future__ import annotations

from ..errors import InputError
from ..schedulers import a1111_name, parse_sampler
from .errors import CLIError


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


def sampler_name(scheduler) -> str:
    """The scheduler as A1111 names samplers ("DPM++ 2M Karras", "Euler a")."""
    return a1111_name(scheduler)
