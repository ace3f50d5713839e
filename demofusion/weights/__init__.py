"""Finding, reading and loading official weight files (safetensors only by default).

One place for what every component loader needs:

* :func:`resolve_component` turns a user's path (a diffusers model folder, its component
  subfolder, or a single ``.safetensors`` file) into the weights file and its ``config.json``;
* :func:`read_tensors` reads a safetensors file, optionally only the keys under one prefix
  (so a 7 GB single-file checkpoint is never read whole to get its VAE);
* :func:`build_and_load` builds a module on the meta device and assigns the tensors into it,
  after checking that every expected key is present with the expected shape — so loading
  never needs twice the model's size in RAM and never silently leaves random weights.

Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) are refused unless the caller
passes ``allow_pickle=True`` (and even then they are read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "WeightsError",
    "PICKLE_SUFFIXES",
    "SINGLE_FILE_PREFIXES",
    "resolve_component",
    "read_tensors",
    "read_keys",
    "read_config",
    "build_and_load",
    "check_state_dict",
    "is_single_file",
    "parse_dtype",
]

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")

# Key prefixes of the original (SGM / "single-file") SDXL checkpoints.
SINGLE_FILE_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}


class WeightsError(ValueError):
    """A weight file is missing, unreadable, of the wrong layout, or does not fit the model."""


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


def read_config(folder: Path) -> dict | None:
    cfg = Path(folder) / "config.json"
    if cfg.is_file():
        with open(cfg, encoding="utf-8") as f:
            return json.load(f)
    return None


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
            if (folder / name).is_file():
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


def read_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file, without reading any tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


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
        sd = torch.load(p, map_location=device, weights_only=True)
        sd = sd.get("state_dict", sd)
        items = sd.items()
    else:
        from safetensors import SafetensorError, safe_open

        try:
            f = safe_open(str(p), framework="pt", device=device)
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"cannot read {p} as safetensors: {e}") from e
        with f:
            keys = [k for k in f.keys() if prefix is None or k.startswith(prefix)]
            items = [(k, f.get_tensor(k)) for k in keys]
    out = {}
    for k, v in items:
        if prefix is not None:
            if not k.startswith(prefix):
                continue
            if strip_prefix:
                k = k[len(prefix):]
        out[k] = v
    return out


def is_single_file(keys: Iterable[str], component: str) -> bool:
    """Whether ``keys`` are in the original single-file layout for ``component``."""
    prefix = SINGLE_FILE_PREFIXES[component]
    return any(k.startswith(prefix) for k in keys)


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple],
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    ignore: Callable[[str], bool] = lambda k: False,
) -> None:
    """Raise a :class:`WeightsError` naming every missing, unexpected and mis-shaped key."""
    got = {k for k in state_dict if not ignore(k)}
    missing = sorted(set(expected) - got)
    unexpected = sorted(got - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & got
        if tuple(state_dict[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or wrong):
        return

    def show(items, n=12):
        items = list(items)
        more = f" … (+{len(items) - n} more)" if len(items) > n else ""
        return "\n    " + "\n    ".join(items[:n]) + more

    msg = [f"the weights do not fit the {what}:"]
    if missing:
        msg.append(f"  {len(missing)} missing key(s):{show(missing)}")
    if unexpected:
        msg.append(f"  {len(unexpected)} unexpected key(s):{show(unexpected)}")
    if wrong:
        msg.append(f"  {len(wrong)} shape mismatch(es):{show(wrong)}")
    msg.append(
        "  Check that the file is the right component and model kind (SDXL base / Turbo) "
        "and that its config.json matches it."
    )
    raise WeightsError("\n".join(msg))


def build_and_load(
    factory: Callable[[], nn.Module],
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    ignore: Callable[[str], bool] = lambda k: False,
) -> nn.Module:
    """Build ``factory()`` on the meta device, check ``state_dict`` against it, assign it.

    Tensors are cast to ``dtype`` (default: keep the file's dtype) and moved to ``device``
    one at a time, so peak memory stays near one copy of the weights. Modules must keep all
    their state in the state dict (no non-persistent buffers), since meta tensors are never
    materialised.
    """
    with torch.device("meta"):
        module = factory()
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, what, ignore)
    dtype = parse_dtype(dtype) if dtype is not None else None
    sd = {}
    for k in expected:
        t = state_dict[k]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        sd[k] = t.to(device)
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left unset after loading: {left[:5]}")
    return module.eval().requires_grad_(False)
