"""The ControlNet maps' parts both front ends share: Canny edges (OpenCV) of a picture, the files a
run's maps come from and their hashes (recorded with the run, part of its id), and the loaded
ControlNets' fingerprints."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..images import load_image
from .errors import CLIError
from .loading import model_fingerprint


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


def net_hashes(pipe, params: dict) -> list | None:
    """The loaded ControlNets' fingerprints (as the model's: file head and size, or the preset's state)."""
    paths = params.get("controlnet") or []
    return [model_fingerprint(n, p, "controlnet") for n, p in zip(pipe.controlnets, paths)] if paths else None
