"""Reading diffusers' ``scheduler_config.json`` and the configs SDXL base / Turbo ship."""

from __future__ import annotations

import json
import os
from pathlib import Path

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL_BASE_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# scheduler/scheduler_config.json of stabilityai/sdxl-turbo
SDXL_TURBO_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

# Options some diffusers scheduler knows, that change the result, and that we do not implement:
# accepted only with the value listed (their off/default value), rejected by name otherwise.
UNSUPPORTED_UNLESS = {
    "clip_sample": False,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_type": "discrete",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "final_sigmas_type": "zero",
}


def read_config(cfg) -> dict:
    """A config dict from a dict, a ``scheduler_config.json`` file, or a folder holding one
    (the scheduler folder itself or a diffusers model folder with ``scheduler/``)."""
    if isinstance(cfg, dict):
        return dict(cfg)
    if not isinstance(cfg, (str, os.PathLike)):
        raise TypeError(f"scheduler config must be a dict or a path, got {type(cfg).__name__}")
    path = Path(cfg)
    if path.is_dir():
        for cand in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
            if cand.is_file():
                path = cand
                break
        else:
            raise FileNotFoundError(
                f"no scheduler_config.json in {path} or {path / 'scheduler'}; pass the file or a dict")
    if not path.is_file():
        raise FileNotFoundError(f"scheduler config {path} does not exist")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def split_config(cfg: dict, defaults: dict, class_name: str) -> tuple[dict, dict]:
    """(resolved options, ignored keys): defaults overridden by ``cfg``'s known keys.

    Private keys (``_class_name``, ``_diffusers_version`` …) and keys this class does not use are
    ignored, except those in UNSUPPORTED_UNLESS, which must hold their harmless value.
    """
    resolved, ignored = dict(defaults), {}
    for key, value in cfg.items():
        if key in defaults:
            resolved[key] = value
        elif key in UNSUPPORTED_UNLESS and value != UNSUPPORTED_UNLESS[key]:
            raise ValueError(
                f"{class_name}: {key}={value!r} is not supported (only {UNSUPPORTED_UNLESS[key]!r}); "
                f"remove it from the config or set it to {UNSUPPORTED_UNLESS[key]!r}")
        elif not key.startswith("_"):
            ignored[key] = value
    return resolved, ignored


def check_choice(class_name: str, key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{class_name}: {key}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")
