"""The command line's ControlNet flags (docs/cli.md, ControlNets): ControlNets to load, their control
maps (ready files, or Canny edges: frontend/control.py), scales, guidance windows, guess mode.

The maps go to the ControlNets in order: the Canny map (``--control canny``) first, then every
``--control-image`` file. All of it is recorded with the run (run.json, PNG metadata) and replayed
by ``--from-image``; the maps' hashes make the run id, so a resume refuses changed maps.
"""

from __future__ import annotations

from pathlib import Path

from ..frontend.control import canny
from ..frontend.errors import CLIError
from ..images import load_image


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
