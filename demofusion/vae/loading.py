"""``load_vae``: the SDXL VAE from a diffusers folder, its vae/ folder, or a .safetensors file."""

from __future__ import annotations

import json
from pathlib import Path

from demofusion.weights import (
    COMPONENT_NAMES, SINGLE_FILE_PREFIXES, WeightsError, build_and_load, component_config, is_single_file, read_keys,
    read_tensors, resolve_component,
)

from .config import VAEConfig
from .convert import from_diffusers, from_ldm, infer_config, is_ldm_layout
from .model import AutoencoderKL

_OTHER_COMPONENTS = ("model.diffusion_model.", "conditioner.", "cond_stage_model.")


def _read_state_dict(file: Path, allow_pickle: bool) -> tuple[dict, bool]:
    """Our-named VAE tensors and whether the file was a single-file checkpoint."""
    prefix = SINGLE_FILE_PREFIXES["vae"]
    if file.suffix == ".safetensors":
        single = is_single_file(read_keys(file), "vae")
        sd = read_tensors(file, prefix=prefix if single else None)
    else:
        sd = read_tensors(file, allow_pickle=allow_pickle)
        single = is_single_file(sd, "vae")
        if single:
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not single and any(k.startswith(_OTHER_COMPONENTS) for k in sd):
        raise WeightsError(
            f"{file} is a single-file checkpoint without a VAE (no keys under {prefix!r}); "
            "load the VAE from its diffusers vae/ folder or a VAE .safetensors file."
        )
    return (from_ldm(sd) if is_ldm_layout(sd) else from_diffusers(sd)), single


def pick_config(sd: dict, cfg_json: dict | None, cfg_file, single: bool, config=None):
    """(VAEConfig, the config.json it came from or None) as :func:`load_vae` picks it (also
    ``demofusion inspect``): ``config``, else a VAE's ``cfg_json`` beside a VAE file, else the
    shapes of ``sd`` (our names)."""
    vae_json = cfg_json is not None and (cfg_json.get("_class_name") == "AutoencoderKL"
                                         or "latent_channels" in cfg_json)
    if single or not vae_json:
        cfg_json = None  # a config.json beside a whole-model file describes something else
    return component_config(VAEConfig, config, cfg_json, cfg_file, COMPONENT_NAMES["vae"], lambda: infer_config(sd))


def load_vae(
    path,
    dtype=None,
    device="cpu",
    config: VAEConfig | str | dict | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    on_fp16_overflow: str = "upcast",
) -> AutoencoderKL:
    """The SDXL VAE, built on the meta device and filled from the weights file.

    ``path``: a diffusers model folder (``vae/diffusion_pytorch_model[.fp16].safetensors``),
    the ``vae/`` folder, a VAE ``.safetensors`` file (diffusers names, e.g. the fp16-fixed
    VAE), or a single-file SDXL checkpoint (``first_stage_model.*``, LDM names).
    The architecture comes from ``config`` (a :class:`VAEConfig`, a preset name, a diffusers
    config dict), else the ``config.json`` beside the weights, else the tensors' shapes (with
    SDXL's scaling factor 0.13025). ``dtype=None`` keeps the file's dtype.
    ``on_fp16_overflow``: ``"upcast"`` or ``"raise"`` (see :class:`AutoencoderKL`).
    """
    file, cfg_json = resolve_component(path, "vae", ["diffusion_pytorch_model"], variant, allow_pickle)
    sd, single = _read_state_dict(file, allow_pickle)
    if not sd:
        raise WeightsError(f"{file} holds no VAE tensors")
    cfg, cfg_file = pick_config(sd, cfg_json, file.parent / "config.json", single, config)
    return build_and_load(
        lambda: AutoencoderKL(cfg, on_fp16_overflow=on_fp16_overflow),
        sd, COMPONENT_NAMES["vae"], dtype=dtype, device=device, file=file, config_file=cfg_file,
    )


def save_vae(vae: AutoencoderKL, folder, variant: str | None = None) -> Path:
    """Write ``vae`` as a diffusers ``vae/`` folder (config.json + safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "AutoencoderKL", "act_fn": "silu",
           "down_block_types": ["DownEncoderBlock2D"] * len(vae.config.block_out_channels),
           "up_block_types": ["UpDecoderBlock2D"] * len(vae.config.block_out_channels),
           **vae.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(folder / name))
    return folder / name
