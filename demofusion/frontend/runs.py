"""A run's parameters as both front ends record them (run.json, PNG metadata, resume checks): the
keys and their defaults, the flags that name them, the run id, and the size an input picture gives."""

from __future__ import annotations

import hashlib
import json

from ..config import config_defaults, knob_names, run_id_items
from ..errors import reword
from .errors import CLIError

DEFAULTS = {"prompt": "a photo of a lighthouse at dawn, highly detailed", "negative_prompt": None, "height": 3072,
            "width": 3072, "num_inference_steps": 50, "guidance_scale": 7.5, "seed": 0, "phases": None,
            "phase_sizes": None, "model": "tiny", "device": "auto", "dtype": "auto", "max_memory": None,
            "offload": None, "view_ranks": None, "fp8": False, **config_defaults()}
# ControlNets (frontend/control.py, cli/control.py): recorded with a run, part of its id (with the maps' hashes)
CONTROL_DEFAULTS = {"controlnet": None, "control_image": None, "control": None, "control_source": None,
                    "canny_low": 100, "canny_high": 200, "control_scale": None, "control_start": None,
                    "control_end": None, "guess_mode": False}
CONTROL_KEYS = list(CONTROL_DEFAULTS)
CONTROL_FLAGS = {"control_image": "--control-image", "controlnet_conditioning_scale": "--control-scale",
                 "control_guidance_start": "--control-start", "control_guidance_end": "--control-end",
                 "guess_mode": "--guess-mode"}
DEFAULTS.update(CONTROL_DEFAULTS)
# what a run brings to the model: sampler, VAE, LoRAs, prompt handling (recorded, part of the run id)
MODEL_DEFAULTS = {"scheduler": None, "timestep_spacing": None, "vae": None, "lora": None, "truncate_prompts": False,
                  "sigmas": None, "preset": None}
MODEL_KEYS = list(MODEL_DEFAULTS)
DEFAULTS.update(MODEL_DEFAULTS)
# where a run's weights and batches go: recorded, free to change on resume (like --device)
PLACEMENT_KEYS = ["max_memory", "offload", "view_ranks"]
# the arguments of a run that decide its pixels (run.json, PNG metadata, resume checks)
RUN_KEYS = ["prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "seed",
            *knob_names()]  # every DemoFusionConfig field

# the API's argument names → the command line's words (errors.reword); None: no such flag, so no advice to set it
FLAGS = {**{k: f"--{k.replace('_', '-')}" for k in (*RUN_KEYS, *PLACEMENT_KEYS)}, "num_inference_steps": "--steps",
         "guidance_scale": "--guidance", **CONTROL_FLAGS, "force": "--force", "base_size": None}


def as_flag(message: str) -> str:
    """Name arguments as the command line spells them (num_inference_steps → --steps …)."""
    return reword(message, FLAGS)


def defaults() -> dict:
    return dict(DEFAULTS)


def run_id(params: dict, config_cls=None) -> str:
    """What makes a run's pixels, hashed: the phase files of a run carry it (resume checks it).
    The knobs are the fields of ``config_cls`` (default DemoFusionConfig): :func:`run_id_items`."""
    keys = [*(k for k in RUN_KEYS if k not in knob_names()), "model", "model_hash", "dtype", "image_sha256",
            *(["fp8"] if params.get("fp8") else []),
            *([*CONTROL_KEYS, "control_sha256", "controlnet_hash"] if params.get("controlnet") else []),
            *(k for k in (*MODEL_KEYS, "vae_hash", "lora_hash") if params.get(k))]  # (only when set: older ids stay)
    values = {k: params.get(k) for k in keys} | run_id_items(params, config_cls)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def image_size(image, args, params) -> None:
    """With an image and no --height/--width: the image's size × --scale (default 2), multiples of 8."""
    scale = args.scale if args.scale is not None else 2.0
    if not 0 < scale <= 64:
        raise CLIError(f"--scale {scale}: must be in (0, 64]; e.g. --scale 2 doubles the picture's size")
    w, h = image.size
    if args.height is None and args.width is None:
        params["height"], params["width"] = round(h * scale / 8) * 8, round(w * scale / 8) * 8
    elif args.height is None:
        params["height"] = round(params["width"] * h / w / 8) * 8
    elif args.width is None:
        params["width"] = round(params["height"] * w / h / 8) * 8
