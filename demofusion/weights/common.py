"""What every part of :mod:`demofusion.weights` shares: the error type, the layout
constants, dtype names, the pickle refusal, and small helpers for one-line messages."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from demofusion.errors import InputError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")

# Key prefixes of the original (SGM / "single-file") SDXL checkpoints.
SINGLE_FILE_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}


# How loaders and `demofusion inspect` name each component in their messages.
COMPONENT_NAMES = {
    "unet": "UNet",
    "vae": "VAE",
    "text_encoder": "text encoder 1",
    "text_encoder_2": "text encoder 2",
}


class WeightsError(InputError):
    """A weight file is missing, unreadable, of the wrong layout, or does not fit the model.

    An :class:`~demofusion.errors.InputError` (so a ``ValueError``); the first line of the
    message names the file and the fix.
    """


def parse_dtype(dtype) -> torch.dtype:
    """Accept a torch dtype or a name such as ``"fp16"``, ``"bfloat16"``, ``"float32"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    }
    try:
        return names[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def _refuse_pickle(path: Path) -> None:
    raise WeightsError(
        f"{path} is a pickle checkpoint ({path.suffix}); pickles can run arbitrary code and are "
        "refused by default. Use the .safetensors release of these weights "
        "(`demofusion download …` fetches only safetensors), or pass allow_pickle=True if you "
        "trust this file."
    )


def _json_type(v) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_single_file(keys: Iterable[str], component: str) -> bool:
    """Whether ``keys`` are in the original single-file layout for ``component``."""
    prefix = SINGLE_FILE_PREFIXES[component]
    return any(k.startswith(prefix) for k in keys)
