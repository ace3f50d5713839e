"""``load_unet``: diffusers folders / files and single-file (SGM) checkpoints."""

from __future__ import annotations

import os
import re

import torch

from demofusion.weights import (
    COMPONENT_NAMES, PICKLE_SUFFIXES, SINGLE_FILE_PREFIXES, WeightsError, build_and_load, component_config,
    read_keys, read_tensors, resolve_component,
)

from .config import UNetConfig
from .convert import convert_sgm_unet
from .model import UNet


def infer_config(state_dict, kind: str = "sdxl-base") -> UNetConfig:
    """A config from the tensors' shapes (diffusers key names).

    What shapes cannot tell comes from the ``kind`` preset: head dim (64 for SDXL), norm
    groups, the micro-conditioning feature size (256) and the sample size (base vs Turbo).
    """
    base = UNetConfig.preset(kind)
    try:
        conv_in = state_dict["conv_in.weight"].shape
        levels = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"down_blocks\.(\d+)\.", k)))
        ch = tuple(state_dict[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
        layers = 1 + max(int(m.group(1)) for k in state_dict
                         if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
        attn = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in state_dict) for i in range(levels))
        depth = tuple(
            1 + max((int(m.group(1)) for k in state_dict
                     if (m := re.match(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.", k))),
                    default=0)
            for i in range(levels)
        )
        ctx = next(v.shape[1] for k, v in state_dict.items() if k.endswith("attn2.to_k.weight"))
        proj = state_dict["add_embedding.linear_1.weight"].shape[1]
        out_ch = state_dict["conv_out.weight"].shape[0] if "conv_out.weight" in state_dict else conv_in[1]
    except (KeyError, StopIteration, ValueError) as e:
        raise WeightsError(
            f"cannot infer the UNet config from the tensors (missing {e}); pass config= "
            "or put the model's config.json beside the weights."
        ) from None
    head_dim = base.block_out_channels[0] // base.attention_heads[0]
    return base.replace(
        in_channels=conv_in[1], out_channels=out_ch, block_out_channels=ch, cross_attention=attn,
        # a level without attention has no depth (1 is a placeholder); with attention and no transformer
        # blocks it has depth 0 (the -small SDXL ControlNets)
        layers_per_block=layers, transformer_layers_per_block=tuple(d if a else 1 for d, a in zip(depth, attn)),
        attention_heads=tuple(max(c // head_dim, 1) for c in ch), cross_attention_dim=ctx,
        projection_class_embeddings_input_dim=proj,
    )


def pick_config(tensors, cfg_json: dict | None, cfg_file, config=None, kind: str | None = None):
    """(UNetConfig, the config.json it came from or None) as :func:`load_unet` picks it (also
    ``demofusion inspect``): ``config``, else a UNet's ``cfg_json`` (with ``kind``'s sample size),
    else the tensors' shapes."""
    if cfg_json is not None and "down_block_types" not in cfg_json:
        cfg_json = None
    cfg, cfg_file = component_config(UNetConfig, config, cfg_json, cfg_file, COMPONENT_NAMES["unet"],
                                     lambda: infer_config(tensors, kind or "sdxl-base"))
    if cfg_file is not None and kind is not None:
        cfg = cfg.replace(sample_size=UNetConfig.preset(kind).sample_size)
    return cfg, cfg_file


def load_unet(path: str | os.PathLike, dtype=None, device="cpu", config=None, kind: str | None = None,
              variant: str | None = None, allow_pickle: bool = False) -> UNet:
    """Load the SDXL UNet from a diffusers folder, its ``unet/`` subfolder, or a weights file.

    Files: ``diffusion_pytorch_model[.fp16].safetensors`` (diffusers names) or an original
    single-file checkpoint (``model.diffusion_model.*``; only the UNet's tensors are read).
    The config comes from ``config`` if given, else ``config.json`` beside the weights, else
    from the tensors' shapes plus ``kind``. SDXL base and Turbo have identical tensors, so a
    single file cannot say which it is: pass ``kind="sdxl-turbo"`` for Turbo (sample_size 64);
    the default is ``"sdxl-base"`` (sample_size 128). ``dtype`` defaults to the file's.
    Pickle checkpoints are refused unless ``allow_pickle=True``.
    """
    file, cfg_json = resolve_component(
        path, "unet", ["diffusion_pytorch_model", "model"], variant=variant, allow_pickle=allow_pickle)
    prefix = SINGLE_FILE_PREFIXES["unet"]
    if file.suffix in PICKLE_SUFFIXES:
        tensors = read_tensors(file, allow_pickle=allow_pickle)
        single = any(k.startswith(prefix) for k in tensors)
        if single:
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    else:
        single = any(k.startswith(prefix) for k in read_keys(file))
        tensors = read_tensors(file, prefix=prefix) if single else read_tensors(file)
    if single:
        try:
            tensors = convert_sgm_unet(tensors)
        except ValueError as e:
            raise WeightsError(f"{file}: {e}") from None
        cfg_json = None  # a config.json beside a single file describes something else
    cfg, cfg_file = pick_config(tensors, cfg_json, file.parent / "config.json", config, kind)
    return build_and_load(lambda: UNet(cfg), tensors, COMPONENT_NAMES["unet"], dtype=dtype, device=device,
                          file=file, config_file=cfg_file)
