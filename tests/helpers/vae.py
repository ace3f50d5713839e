"""VAE test factories: diffusers' AutoencoderKL in the tiny / real SDXL configs, seeded weights,
and the on-disk layouts the released files use (diffusers folder, single-file LDM names)."""

from __future__ import annotations

import re

import torch

from tests.helpers import seeded_init_

# The config.json SDXL base 1.0 ships in vae/ (spelled out), and the tiny preset in diffusers terms.
SDXL_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TINY_VAE_CONFIG = {**SDXL_VAE_CONFIG, "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1,
                   "norm_num_groups": 8, "sample_size": 256}
CONFIGS = {"sdxl": SDXL_VAE_CONFIG, "tiny": TINY_VAE_CONFIG}


def diffusers_kwargs(name: str) -> dict:
    return {k: v for k, v in CONFIGS[name].items() if not k.startswith("_")}


def diffusers_vae(name: str = "tiny", seed: int = 0, scale: float = 1.0):
    """diffusers' AutoencoderKL in config ``name`` with seeded random weights (eval, fp32)."""
    from diffusers import AutoencoderKL

    return seeded_init_(AutoencoderKL(**diffusers_kwargs(name)), seed, scale).eval().requires_grad_(False)


# ---- diffusers names -> original LDM single-file names (written here, independently) ---------
def to_ldm(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers-named VAE tensors → the LDM names of ``first_stage_model.*`` (prefix not added);
    attention projections become 1×1 conv weights [C, C, 1, 1] as in the released files."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        n = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        n = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", n)
        n = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", n)
        n = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", n)
        n = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", n)
        n = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", n)
        m = re.match(r"(.*)mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", n)
        if m:
            n = f"{m[1]}mid.attn_1.{attn[m[2]]}.{m[3]}"
            if v.ndim == 2:
                v = v[:, :, None, None]
        out[n] = v
    return out


def ldm_checkpoint(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A single-file-style checkpoint: the VAE under ``first_stage_model.`` beside a stray UNet key."""
    ck = {f"first_stage_model.{k}": v for k, v in to_ldm(sd, levels).items()}
    ck["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    return ck


def diffusers_from_ldm(ck: dict[str, torch.Tensor], name: str = "tiny"):
    """What diffusers' own single-file converter builds from an LDM checkpoint (strict load)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = convert_ldm_vae_checkpoint(ck, CONFIGS[name])
    ref = AutoencoderKL(**diffusers_kwargs(name))
    ref.load_state_dict(sd, strict=True)
    return ref.eval().requires_grad_(False), sd
