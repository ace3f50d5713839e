"""Finding a component's weights file (:func:`resolve_component`) and reading its tensors
(:func:`read_tensors`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..errors import first_line
from .common import PICKLE_SUFFIXES, WeightsError, _refuse_pickle
from .config import read_config
from .integrity import _checked_header, _directory_problem


def resolve_component(
    path: str | os.PathLike,
    subfolder: str,
    stems: Iterable[str],
    variant: str | None = None,
    allow_pickle: bool = False,
) -> tuple[Path, dict | None]:
    """Find the weights file (and config) of one component.

    ``path`` may be: a diffusers model folder (``path/subfolder/stem[.variant].safetensors``),
    the component folder itself, or a weights file. ``stems`` are the file names without
    suffix that the component uses (``diffusion_pytorch_model`` or ``model``). Without an
    explicit ``variant`` the full-precision file is preferred, then ``.fp16``.
    Returns ``(weights_file, config_or_None)``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(
            f"weights not found: {p} does not exist. Download them with "
            "`demofusion download sdxl-base --dir weights/` (or sdxl-turbo), or pass the path "
            "of a diffusers model folder or a .safetensors checkpoint."
        )
    if p.is_dir() and p.suffix == ".safetensors":
        raise WeightsError(_directory_problem(p))
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES and not allow_pickle:
            _refuse_pickle(p)
        return p, read_config(p.parent)

    folder = p / subfolder if (p / subfolder).is_dir() else p
    stems = list(stems)
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        for stem in stems:
            name = f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors"
            if (folder / name).exists():  # a directory of that name is reported when read
                return folder / name, read_config(folder)
    # Sharded safetensors (index json) are not used by SDXL's released components.
    pickles = sorted(q.name for q in folder.glob("*") if q.suffix in PICKLE_SUFFIXES)
    if pickles:
        if allow_pickle:
            return folder / pickles[0], read_config(folder)
        _refuse_pickle(folder / pickles[0])
    wanted = ", ".join(
        (f"{s}.{v}.safetensors" if v else f"{s}.safetensors") for v in variants for s in stems
    )
    raise WeightsError(
        f"no weights for '{subfolder}' in {p}: looked for {wanted} in {folder}. "
        "Point at a diffusers model folder (with a "
        f"'{subfolder}/' subfolder), the '{subfolder}/' folder itself, or a .safetensors file; "
        "`demofusion download` fetches the official files."
    )


def read_tensors(
    path: str | os.PathLike,
    prefix: str | None = None,
    strip_prefix: bool = True,
    allow_pickle: bool = False,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file; with ``prefix`` only those keys (prefix stripped)."""
    p = Path(path)
    if p.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            _refuse_pickle(p)
        if p.is_dir():
            raise WeightsError(f"{p}: is a directory, not a checkpoint file; re-download it")
        try:
            sd = torch.load(p, map_location=device, weights_only=True)
        except Exception as e:  # any unpickling failure: a damaged or foreign file
            raise WeightsError(
                f"{p}: cannot be read as a pickle checkpoint ({type(e).__name__}: {first_line(e)}); "
                "re-download it") from None
        if isinstance(sd, Mapping):
            sd = sd.get("state_dict", sd)
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise WeightsError(f"{p}: holds no state dict of tensors; re-download it")
        items = sd.items()
    else:
        from safetensors import SafetensorError, safe_open

        _checked_header(p)  # cheap, and catches truncation even where safetensors maps lazily
        try:
            with safe_open(str(p), framework="pt", device=device) as f:
                keys = [k for k in f.keys() if prefix is None or k.startswith(prefix)]
                items = [(k, f.get_tensor(k)) for k in keys]
        except (SafetensorError, OSError) as e:
            raise WeightsError(
                f"{p}: not a safetensors file (unreadable: {first_line(e)}); re-download it") from None
    out = {}
    for k, v in items:
        if prefix is not None:
            if not k.startswith(prefix):
                continue
            if strip_prefix:
                k = k[len(prefix):]
        out[k] = v
    return out
