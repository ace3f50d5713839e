"""UNet test factories: the real SDXL configs, tiny/mid configs, diffusers reference models,
files in the diffusers and single-file (SGM) layouts, and inputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import save_tensors, seeded_init_

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (as released).
SDXL_BASE_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# unet/config.json of stabilityai/sdxl-turbo: the same network, sample_size 64.
SDXL_TURBO_CONFIG = {
    **SDXL_BASE_CONFIG,
    "_diffusers_version": "0.24.0.dev0",
    "attention_type": "default",
    "dropout": 0.0,
    "reverse_transformer_layers_per_block": None,
    "sample_size": 64,
}


def tiny_config() -> dict:
    from demofusion.unet import UNetConfig

    return UNetConfig.preset("tiny").to_diffusers()


# Every structural feature of SDXL, small: 3 levels (first without attention), 2 layers per
# block, depth 2 in the deepest level, 64-dim heads, 32 norm groups, text_time embedding.
MID_CONFIG = {
    **SDXL_BASE_CONFIG,
    "block_out_channels": [64, 128, 192],
    "attention_head_dim": [1, 2, 3],
    "transformer_layers_per_block": [1, 1, 2],
    "cross_attention_dim": 96,
    "addition_time_embed_dim": 16,
    "projection_class_embeddings_input_dim": 32 + 6 * 16,
    "sample_size": 32,
}


def diffusers_unet(config: dict, seed: int = 0, dtype=torch.float32):
    """diffusers' UNet2DConditionModel with seeded random weights (every layer non-zero)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # skip diffusers' own init: every parameter is overwritten below
        model = UNet2DConditionModel.from_config(config)
    assert not list(model.buffers()), "reference UNet has buffers that seeded_init_ would not fill"
    model = seeded_init_(model.to_empty(device="cpu"), seed)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def write_diffusers(root, model, variant: str | None = None, dtype=None) -> Path:
    """``root/unet/config.json`` + ``diffusion_pytorch_model[.variant].safetensors``."""
    folder = Path(root) / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(model.config)), encoding="utf-8")
    sd = model.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    save_tensors(folder / name, sd)
    return Path(root)


def to_sgm(state_dict: dict, config: dict) -> dict:
    """diffusers-named UNet tensors under the original single-file names (our map, inverted)."""
    from demofusion.unet.convert import PREFIX, RESNET_RENAMES, sgm_key_map

    levels = len(config["block_out_channels"])
    attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    table = {ours: (sgm, res) for sgm, (ours, res) in sgm_key_map(levels, config["layers_per_block"], attn).items()}
    back = {v: k for k, v in RESNET_RENAMES.items()}
    out = {}
    for key, t in state_dict.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in table:
                sgm, res = table[prefix]
                rest = parts[n:]
                if res and rest[0] in back:
                    rest = [back[rest[0]]] + rest[1:]
                out[PREFIX + sgm + "." + ".".join(rest)] = t
                break
        else:
            raise KeyError(f"no SGM name for {key}")
    return out


def unet_inputs(config: dict, batch: int = 2, h: int = 24, w: int = 16, seed: int = 1, dtype=torch.float32):
    """(sample, per-sample timesteps, encoder_hidden_states, text_embeds, time_ids)."""
    g = torch.Generator().manual_seed(seed)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    sample = torch.randn(batch, config["in_channels"], h, w, generator=g)
    t = torch.tensor([999.0, 1.0, 500.0, 250.0][:batch])
    ctx = torch.randn(batch, 77, config["cross_attention_dim"], generator=g)
    pooled = torch.randn(batch, pooled, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 64.0, 1024.0, 768.0]] * batch)
    time_ids[1:, 3] = 0.0
    return tuple(x.to(dtype) for x in (sample, t, ctx, pooled, time_ids))


def diffusers_forward(model, inputs):
    sample, t, ctx, pooled, time_ids = inputs
    with torch.no_grad():
        return model(sample, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
