"""Key maps into our (= diffusers') VAE names, and the config read off a state dict's shapes.

Single-file (LDM / SGM ``first_stage_model.*``) names differ from diffusers' as follows:

=====================================  ==============================================
LDM                                    ours
=====================================  ==============================================
``encoder.down.{i}.block.{j}.``        ``encoder.down_blocks.{i}.resnets.{j}.``
``encoder.down.{i}.downsample.conv``   ``encoder.down_blocks.{i}.downsamplers.0.conv``
``decoder.up.{k}.block.{j}.``          ``decoder.up_blocks.{n-1-k}.resnets.{j}.`` (reversed)
``decoder.up.{k}.upsample.conv``       ``decoder.up_blocks.{n-1-k}.upsamplers.0.conv``
``*.mid.block_{1,2}.``                 ``*.mid_block.resnets.{0,1}.``
``*.mid.attn_1.{norm,q,k,v,proj_out}`` ``*.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``
``nin_shortcut`` / ``norm_out``        ``conv_shortcut`` / ``conv_norm_out``
=====================================  ==============================================

and the attention projections are 1×1 conv weights ``[C, C, 1, 1]`` (ours: linear ``[C, C]``).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from .config import VAEConfig

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers' pre-0.14 attention names, still found in some vae/ files
_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def is_ldm_layout(keys) -> bool:
    """Whether VAE keys (prefix already stripped) use the LDM names."""
    return any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.")) for k in keys)


def _ldm_key(key: str, levels: int) -> str:
    key = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.",
                 lambda m: f"{m[1]}.mid_block.attentions.0.{_ATTN.get(m[2], m[2])}.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                 lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", key)
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def from_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM-named VAE tensors (``first_stage_model.`` stripped) → our names.

    Training-only tensors (``loss.*``: discriminator / LPIPS) are dropped.
    """
    levels = len({int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    out = {}
    for k, v in sd.items():
        if k.startswith("loss."):
            continue
        new = _ldm_key(k, levels)
        if ".attentions.0." in new and v.ndim == 4:
            v = v.reshape(v.shape[0], v.shape[1])  # 1×1 conv [C,C,1,1] → linear [C,C]
        out[new] = v
    return out


def from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers-named tensors → ours (identity, except the deprecated attention names)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*\.attentions\.0\.)(query|key|value|proj_attn)\.(.*)$", k)
        out[f"{m[1]}{_OLD_DIFFUSERS_ATTN[m[2]]}.{m[3]}" if m else k] = v
    return out


def infer_config(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """The architecture read off our-named tensors' shapes (norm groups: the preset's, else 32)."""
    try:
        levels = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
        channels = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels)
        layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down_blocks.0.resnets.")})
        shapes = dict(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_channels=sd["decoder.conv_out.weight"].shape[0],
            latent_channels=sd["decoder.conv_in.weight"].shape[1],
            block_out_channels=channels,
            layers_per_block=layers,
            mid_block_add_attention=any(".mid_block.attentions." in k for k in sd),
            use_quant_conv="quant_conv.weight" in sd,
            use_post_quant_conv="post_quant_conv.weight" in sd,
        )
    except KeyError as e:
        raise ValueError(f"cannot read a VAE architecture from these tensors: {e} missing") from None
    for name in ("sdxl", "tiny"):
        preset = VAEConfig.preset(name)
        if all(getattr(preset, k) == v for k, v in shapes.items()):
            return preset
    base = VAEConfig()
    try:
        return replace(base, **shapes)
    except ValueError as e:
        raise ValueError(f"{e} (the group count cannot be read from the weights: pass config=VAEConfig(...))") from None
