"""The crop protocol of FID_c / KID_c / IS_c: N seeded random crops of the base size per picture.

A 4096² picture shrunk to Inception's 299 px hides every local defect; DemoFusion (after
ScaleCrafter) therefore also scores random crops at the base resolution. The crops of picture i
come from their own generator, seeded with (seed, i): the same seed gives the same crops, and
adding pictures to a set leaves the earlier pictures' crops unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError


def crop_boxes(height: int, width: int, size: int, count: int, seed: int, index: int) -> list[tuple[int, int]]:
    """(top, left) of ``count`` crops of ``size``² inside an ``height``×``width`` picture."""
    rng = np.random.default_rng([seed, index])
    tops = rng.integers(0, height - size + 1, size=count)
    lefts = rng.integers(0, width - size + 1, size=count)
    return [(int(t), int(l)) for t, l in zip(tops, lefts)]


def crops_of(image: torch.Tensor, size: int, count: int, seed: int, index: int, name: str = "",
             whole_if_small: bool = False) -> list[torch.Tensor]:
    """The crops of one uint8 [3, H, W] picture. A picture smaller than ``size`` is an error for the
    generated set; for the reference set (``whole_if_small``) it is taken whole, once."""
    h, w = image.shape[-2:]
    if h < size or w < size:
        if whole_if_small:
            return [image]
        raise InputError(f"{name or 'picture'} is {w}×{h}, smaller than --crop-size {size}; pass a --crop-size "
                         f"of at most {min(h, w)} (the model's base size is the paper's choice)")
    return [image[:, t:t + size, l:l + size] for t, l in crop_boxes(h, w, size, count, seed, index)]


def prepare_crop_folder(folder) -> Path:
    """--save-crops DIR: a new or empty folder (nobody's files are overwritten)."""
    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"--save-crops {folder}: {'not a folder' if not folder.is_dir() else 'not empty'}; "
                         "choose a new folder")
    return folder


def save_crop(crop: torch.Tensor, folder: Path, index: int, j: int) -> None:
    """One crop as a lossless PNG named so that sorted order is the order we scored them in."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(crop.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}_{j:02d}.png")
