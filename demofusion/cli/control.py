"""The command line's ControlNet flags (docs/cli.md, ControlNets): ControlNets to load, their control
maps (ready files, or Canny edges computed with OpenCV), scales, guidance windows, guess mode.

The maps go to the ControlNets in order: the Canny map (``--control canny``) first, then every
``--control-image`` file. All of it is recorded with the run (run.json, PNG metadata) and replayed
by ``--from-image``; the maps' hashes make the run id, so a resume refuses changed maps.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..images import load_image
from ..frontend.errors import CLIError
from .common import model_fingerprint

def canny(path, low: int, high: int):
    """Canny edges of the picture at ``path`` (OpenCV's ``cv2.Canny`` on its grey values) as a
    white-on-black RGB PIL image of the same size."""
    import numpy as np
    from PIL import Image

    try:
        import cv2
    except ImportError:
        raise CLIError("--control canny needs OpenCV: pip install 'demofusion[control]' "
                       "(opencv-python-headless)") from None
    for name, v in (("--canny-low", low), ("--canny-high", high)):
        if not isinstance(v, int) or not 0 <= v <= 1000:
            raise CLIError(f"{name} {v}: a threshold in 0..1000 (defaults 100 and 200)")
    if low > high:
        raise CLIError(f"--canny-low {low} is above --canny-high {high}; swap them")
    grey = np.asarray(load_image(path, "--control-source").convert("L"))
    edges = cv2.Canny(grey, low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def control_maps(params: dict) -> list:
    """The control maps (PIL images) in ControlNet order, loaded and checked."""
    maps = []
    if params.get("control") == "canny":
        source = params.get("control_source") or params.get("image")
        if not source:
            raise CLIError("--control canny needs a picture to find edges in: give --control-source FILE (or --image)")
        maps.append(canny(source, params["canny_low"], params["canny_high"]))
    elif params.get("control_source"):
        raise CLIError("--control-source is read by --control canny; add --control canny or drop it")
    maps += [load_image(f, "--control-image") for f in params.get("control_image") or []]
    return maps


def control_hashes(params: dict) -> list | None:
    """sha256 (16 hex) of every file a run's maps come from (None without ControlNets)."""
    if not params.get("controlnet"):
        return None
    return [hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16] if f and Path(f).is_file() else None
            for f in control_files(params)]


def control_files(params: dict) -> list:
    """The files a run's control maps come from, in ControlNet order."""
    return ([params.get("control_source") or params.get("image")] if params.get("control") else []) + \
        list(params.get("control_image") or [])


def control_kwargs(params: dict, maps: list) -> dict:
    """The pipeline's control arguments (none without ControlNets; given maps without one: an error)."""
    nets = params.get("controlnet") or []
    for n in nets:
        if n != "tiny" and not Path(n).expanduser().exists():
            raise CLIError(f"--controlnet {n}: no such file or folder; download one with `demofusion download "
                           "controlnet-canny-sdxl --dir weights/` (or use 'tiny' with the tiny model)")
    if nets and len(maps) != len(nets):
        raise CLIError(f"{len(maps)} control map(s) for {len(nets)} ControlNet(s): give one --control-image "
                       "(or --control canny, for the first) per --controlnet")
    if not nets:
        given = [f for f, k in (("--control-image", "control_image"), ("--control", "control"),
                                ("--control-scale", "control_scale"), ("--guess-mode", "guess_mode"),
                                ("--control-start", "control_start"), ("--control-end", "control_end"))
                 if params.get(k)]
        if given:
            raise CLIError(f"{given[0]} needs a ControlNet: add --controlnet PATH (e.g. `demofusion download "
                           "controlnet-canny-sdxl`)")
        return {}
    one = lambda v, d: d if v is None else v[0] if len(v) == 1 else v
    return {"control_image": maps[0] if len(nets) == 1 and len(maps) == 1 else maps,
            "controlnet_conditioning_scale": one(params.get("control_scale"), 1.0),
            "control_guidance_start": one(params.get("control_start"), 0.0),
            "control_guidance_end": one(params.get("control_end"), 1.0),
            "guess_mode": bool(params.get("guess_mode"))}


def net_hashes(pipe, params: dict) -> list | None:
    """The loaded ControlNets' fingerprints (as the model's: file head and size, or the preset's state)."""
    paths = params.get("controlnet") or []
    return [model_fingerprint(n, p, "controlnet") for n, p in zip(pipe.controlnets, paths)] if paths else None
