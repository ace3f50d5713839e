"""``load_controlnet``: a diffusers ControlNet folder (``config.json`` +
``diffusion_pytorch_model[.fp16].safetensors``) or one ``.safetensors`` file in diffusers key layout."""

from __future__ import annotations

import os

from ..unet.loading import infer_config
from ..weights import WeightsError, build_and_load, component_config, read_tensors, resolve_component
from .model import ControlNet, ControlNetConfig


def infer_controlnet_config(tensors, kind: str = "sdxl-base") -> ControlNetConfig:
    """A config from the tensors' shapes; what they cannot tell (head dim, norm groups, the
    micro-conditioning size) from the SDXL ``kind`` preset, as for the UNet."""
    try:
        emb = [tensors["controlnet_cond_embedding.conv_in.weight"].shape]
        emb += [tensors[f"controlnet_cond_embedding.blocks.{i}.weight"].shape
                for i in range(1, 64, 2) if f"controlnet_cond_embedding.blocks.{i}.weight" in tensors]
    except KeyError as e:
        raise WeightsError(f"not a ControlNet: the tensors have no {e} (controlnet_cond_embedding.*)") from None
    return ControlNetConfig(infer_config(tensors, kind), emb[0][1], tuple([emb[0][0]] + [s[0] for s in emb[1:]]))


def pick_config(tensors, cfg_json: dict | None, cfg_file, config=None, kind: str = "sdxl-base"):
    """(ControlNetConfig, the config.json it came from or None) as :func:`load_controlnet` picks it
    (also ``demofusion inspect``): ``config``, else a ControlNet's ``cfg_json``, else the tensors'
    shapes (plus ``kind``)."""
    if cfg_json is not None and "down_block_types" not in cfg_json:
        cfg_json = None  # not a ControlNet's config.json
    return component_config(ControlNetConfig, config, cfg_json, cfg_file, "ControlNet",
                            lambda: infer_controlnet_config(tensors, kind))


def load_controlnet(path: str | os.PathLike, dtype=None, device="cpu", config=None, variant: str | None = None,
                    kind: str = "sdxl-base") -> ControlNet:
    """Load an SDXL ControlNet. The config comes from ``config`` (a ControlNetConfig or diffusers
    dict), else ``config.json`` beside the weights, else the tensors' shapes (plus ``kind``); every
    key and shape is checked as for the UNet. ``dtype`` defaults to the file's."""
    file, cfg_json = resolve_component(path, "controlnet", ["diffusion_pytorch_model"], variant=variant)
    tensors = read_tensors(file)
    cfg, cfg_file = pick_config(tensors, cfg_json, file.parent / "config.json", config, kind)
    return build_and_load(lambda: ControlNet(cfg), tensors, "ControlNet", dtype=dtype, device=device, file=file,
                          config_file=cfg_file)
