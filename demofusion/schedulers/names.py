"""Sampler names users know (ours, A1111's, ComfyUI's) and switching samplers on a model's schedule.

A sampler built from another sampler takes every option from the *model's* scheduler config, kept
whole by every scheduler as ``.model_config`` (unknown keys included), and where that config is
silent from the SDXL family's published values (``FAMILY_CONFIG``) — never from a class default (DDIM's
class default ``clip_sample=True`` would clamp SDXL latents to [−1, 1]).
"""

from __future__ import annotations

import re

from ..errors import InputError
from .base import Scheduler
from .config import SDXL_BASE_CONFIG, read_config
from .schedule import SPACINGS

# name → (class, the options that make it that sampler, its A1111 name)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                    "DPM++ 2M SDE"),
    "dpm++3m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
                    "DPM++ 3M SDE"),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2}, "UniPC"),
    "lcm": ("LCMScheduler", {}, "LCM"),
    "tcd": ("TCDScheduler", {}, "TCD"),
}
SAMPLER_NAMES = tuple(SAMPLERS)
SIGMAS = ("karras", "exponential")  # beside None: the model's own σ
SIGMA_SCHEDULE_CLASSES = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
                          "UniPCMultistepScheduler")
_SIGMA_KEYS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}
# other spellings, compared without case, spaces, "_" or "-" ("dpmpp" read as "dpm++")
_ALIASES = {"eulerancestral": "euler-a", "dpm++2msde": "dpm++2m-sde", "dpm++3msde": "dpm++3m-sde",
            "unipcbh2": "unipc"}
# the SDXL family's published scheduler options (SDXL base's scheduler_config.json), for keys a
# partial config leaves out
FAMILY_CONFIG = {k: v for k, v in SDXL_BASE_CONFIG.items() if not k.startswith("_")}


def _compact(text: str) -> str:
    return re.sub(r"[\s_\-]+", "", text.lower()).replace("dpmpp", "dpm++")


def parse_sampler(name: str, sigmas: str | None = None) -> tuple[str, str | None]:
    """(our sampler name, σ schedule or None) of ``name`` in any accepted spelling: "dpm++2m",
    "DPM++ 2M Karras", "dpmpp_2m" (+ ``sigmas="karras"``), "Euler a", "UniPC", …"""
    if not isinstance(name, str):
        raise InputError(f"scheduler {name!r}: give a sampler name, e.g. {', '.join(SAMPLER_NAMES)}")
    key, implied = _compact(name), None
    for kind in SIGMAS:
        if key.endswith(kind) and key != kind:
            key, implied = key[: -len(kind)], kind
    lookup = {_compact(n): n for n in SAMPLERS} | {_compact(a): n for n in SAMPLERS for a in (SAMPLERS[n][2],)}
    lookup |= _ALIASES
    if key not in lookup:
        raise InputError(f"scheduler {name!r}: unknown; use one of {', '.join(SAMPLER_NAMES)} "
                         f"(or an A1111/ComfyUI name such as 'DPM++ 2M Karras')")
    if sigmas in ("normal", "default", "model"):
        sigmas = None
    if sigmas is not None and sigmas not in SIGMAS:
        raise InputError(f"sigmas {sigmas!r}: unknown; use one of {', '.join(SIGMAS)} (or none for the model's)")
    if implied and sigmas and implied != sigmas:
        raise InputError(f"scheduler {name!r} says {implied} sigmas but sigmas={sigmas!r}; give one of them")
    return lookup[key], sigmas or implied


def sampler_options(name: str, config, timestep_spacing: str | None = None, sigmas: str | None = None):
    """(class name, the config to build it from): the model's config whole, the family's values where
    it is silent, the sampler's own options, the σ schedule and spacing asked for."""
    key, kind = parse_sampler(name, sigmas)
    cls_name, options, _ = SAMPLERS[key]
    if timestep_spacing is not None and timestep_spacing not in SPACINGS:
        raise InputError(f"timestep_spacing {timestep_spacing!r}: unknown; use one of {', '.join(SPACINGS)}")
    model = dict(config.model_config) if isinstance(config, Scheduler) else read_config(config)
    cfg = {**FAMILY_CONFIG, **{k: v for k, v in model.items() if not k.startswith("_")}, **options}
    if cls_name in SIGMA_SCHEDULE_CLASSES:
        if kind is not None:
            cfg.update({key_: kind == k for k, key_ in _SIGMA_KEYS.items()})
    else:
        if kind is not None:
            raise InputError(f"scheduler {key!r} takes no σ schedule (sigmas={kind!r}); "
                             f"use it without, or one of {', '.join(sorted(_names_with_sigmas()))}")
        for key_ in _SIGMA_KEYS.values():  # the model's σ choice means nothing to this sampler
            cfg.pop(key_, None)
    if timestep_spacing is not None:
        cfg["timestep_spacing"] = timestep_spacing
    return cls_name, cfg, model


def _names_with_sigmas():
    return [n for n, (c, _, _) in SAMPLERS.items() if c in SIGMA_SCHEDULE_CLASSES]


def sampler_key(scheduler) -> str:
    """Our name of a scheduler instance ("dpm++2m", …); the class name when no name fits."""
    cls_name = type(scheduler).__name__
    for key, (c, options, _) in SAMPLERS.items():
        if c == cls_name and all(scheduler.config.get(k) == v for k, v in options.items()):
            return key
    return cls_name


def sigma_schedule(scheduler) -> str | None:
    """"karras", "exponential" or None (the model's σ) of a scheduler instance."""
    for kind, key in _SIGMA_KEYS.items():
        if scheduler.config.get(key):
            return kind
    return None


def a1111_name(scheduler) -> str:
    """The sampler as A1111 writes it in a PNG's ``parameters`` ("DPM++ 2M Karras", "Euler a")."""
    key = sampler_key(scheduler)
    base = SAMPLERS[key][2] if key in SAMPLERS else key
    kind = sigma_schedule(scheduler)
    return f"{base} {kind.capitalize()}" if kind else base


def is_sampler_name(name) -> bool:
    """Whether ``name`` is a sampler name in any accepted spelling (else e.g. a config path)."""
    if not isinstance(name, str):
        return False
    try:
        parse_sampler(name)
    except InputError:
        return False
    return True
