"""What `evaluate` reads: image sets (a folder, a list of files, one run folder's phases) as the
libraries read them, and what our PNGs recorded about each image (prompt, time, peak memory).

Pictures are read exactly as torch-fidelity's ``ImagesPathDataset`` reads a folder — Pillow,
``convert("RGB")``, uint8 in [0, 255], files in sorted order — so a folder given to us and the same
folder given to the library are the same samples in the same order."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, first_line
from ..outputs import META_KEY

EXTENSIONS = (".png", ".jpg", ".jpeg")  # torch-fidelity's default samples_find_ext
PHASE_FILE = re.compile(r"phase_(\d+)\.png$")


@dataclass
class ImageSet:
    """A named list of image files and what their metadata says (``meta[i]``: a dict, maybe empty)."""

    name: str
    files: list[Path]
    meta: list[dict] = field(default_factory=list)


def read_rgb(path) -> torch.Tensor:
    """One picture → uint8 [3, H, W] in [0, 255] (the range and dtype the FID Inception expects)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a picture Pillow can read ({first_line(e)})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def png_meta(path) -> dict:
    """Our PNG metadata chunk (``demofusion``), or {} for any other picture."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get(META_KEY)
    except OSError:
        return {}
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def is_run_folder(folder: Path) -> bool:
    """One run: phase_K.png files (a `generate` folder with its run.json, or one `ablate` cell)."""
    return folder.is_dir() and any(PHASE_FILE.match(p.name) for p in folder.iterdir())


def run_phases(folder: Path) -> list[ImageSet]:
    """A run folder → one set per phase (phase_1.png, phase_2.png …), each one image."""
    phases = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := PHASE_FILE.match(p.name)))
    return [ImageSet(f"phase_{k}", [p], [png_meta(p)]) for k, p in phases]


def image_set(source, option: str = "IMAGES") -> ImageSet:
    """A folder, one picture, or a list of pictures → ImageSet (files checked, nothing decoded yet)."""
    if isinstance(source, (list, tuple)):
        files = [Path(s) for s in source]
        missing = [str(f) for f in files if not f.is_file()]
        if missing or not files:
            raise InputError(f"{option}: {'no pictures given' if not files else 'no such file ' + missing[0]}")
        return ImageSet(option, files, [png_meta(f) for f in files])
    path = Path(source).expanduser()
    if path.is_file():
        return ImageSet(path.stem, [path], [png_meta(path)])
    if not path.is_dir():
        raise InputError(f"{option} {path}: no such file or folder")
    files = image_files(path)
    if not files:
        raise InputError(f"{option} {path}: no .png/.jpg pictures in it")
    return ImageSet(path.name, files, [png_meta(f) for f in files])


def read_prompts_file(path) -> list[str]:
    """--prompts FILE: one prompt a line, in image order (blank lines and # comments skipped, as
    `generate --prompts` reads it, so the same file names the same images)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"--prompts {path}: cannot read it ({first_line(e)})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def prompts_for(images: ImageSet, prompts) -> list[str] | None:
    """The prompt of every image: given (a list, or a file), else our PNG metadata; None if any is unknown."""
    if prompts is not None:
        given = read_prompts_file(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
        if len(given) != len(images.files):
            raise InputError(f"--prompts: {len(given)} prompts for {len(images.files)} pictures; give one per "
                             "picture, in the pictures' (sorted) order")
        return given
    found = [m.get("prompt") for m in images.meta]
    return found if found and all(isinstance(p, str) for p in found) else None


def run_costs(images: ImageSet) -> dict | None:
    """Time and peak memory per image, where our runs recorded them (seconds / peak_memory keys)."""
    secs = [m.get("seconds") for m in images.meta]
    peaks = [m.get("peak_memory") for m in images.meta]
    out = {}
    if secs and all(isinstance(s, (int, float)) for s in secs):
        out["seconds_per_image"] = float(np.mean(secs))
    if peaks and all(isinstance(p, (int, float)) for p in peaks):
        out["peak_memory_max"] = float(max(peaks))
    return out or None
