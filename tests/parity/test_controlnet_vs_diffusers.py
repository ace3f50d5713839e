"""The SDXL ControlNet module and the UNet's residual inputs against diffusers: same keys and
shapes for the released canny config and its -mid/-small variants; fp32 outputs equal on the same
random weights, with the zero-initialised projections given non-zero weights and the conditioning
embedding drawn large enough (std 2/√fan_in) that a wrongly placed control image would show
(checked: a 1-px shift moves the residuals far beyond the tolerance)."""

from __future__ import annotations

import json

import pytest
import torch

from demofusion.controlnet import ControlNet, ControlNetConfig, load_controlnet
from demofusion.unet import UNet, UNetConfig
from demofusion.weights import WeightsError
from tests.helpers import assert_close_rel, max_rel_err, save_tensors, seeded_init_
from tests.helpers.unet import MID_CONFIG, SDXL_BASE_CONFIG, diffusers_unet, tiny_config, unet_inputs

diffusers = pytest.importorskip("diffusers")

# config.json of diffusers/controlnet-canny-sdxl-1.0 (as released, the fields that matter)
CANNY = {k: v for k, v in SDXL_BASE_CONFIG.items() if k not in ("up_block_types", "out_channels", "sample_size",
                                                               "center_input_sample", "class_embeddings_concat",
                                                               "conv_in_kernel", "conv_out_kernel",
                                                               "cross_attention_norm", "dual_cross_attention",
                                                               "mid_block_only_cross_attention",
                                                               "resnet_out_scale_factor", "resnet_skip_time_act",
                                                               "time_cond_proj_dim", "time_embedding_act_fn",
                                                               "time_embedding_dim", "time_embedding_type",
                                                               "timestep_post_act")}
CANNY.update(_class_name="ControlNetModel", conditioning_channels=3, controlnet_conditioning_channel_order="rgb",
             conditioning_embedding_out_channels=[16, 32, 96, 256], global_pool_conditions=False)
VARIANTS = {"full": [1, 2, 10], "mid": [0, 0, 1], "small": [0, 0, 0]}


def as_controlnet(unet_config: dict) -> dict:
    drop = set(SDXL_BASE_CONFIG) - set(CANNY)
    return {**{k: v for k, v in unet_config.items() if k not in drop},
            **{k: CANNY[k] for k in CANNY if k not in SDXL_BASE_CONFIG}}


def diffusers_controlnet(config: dict, seed: int = 0):
    from diffusers import ControlNetModel

    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    model = seeded_init_(model.to_empty(device="cpu"), seed).eval()
    emb = model.controlnet_cond_embedding  # large enough that the control image matters
    seeded_init_(emb, seed + 1, scale=2.0)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_keys_and_shapes_equal_diffusers_for_the_released_configs(variant):
    from diffusers import ControlNetModel

    cfg = {**CANNY, "transformer_layers_per_block": VARIANTS[variant]}
    with torch.device("meta"):
        ref = ControlNetModel.from_config(cfg)
        ours = ControlNet(ControlNetConfig.from_diffusers(cfg))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert ControlNetConfig.from_diffusers(ours.controlnet_config.to_diffusers()) == ours.controlnet_config


def _inputs(config: dict, seed=1):
    sample, t, ctx, pooled, time_ids = unet_inputs(config, batch=2, h=24, w=16, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    cond = torch.rand(2, 3, 8 * 24, 8 * 16, generator=g)
    return sample, t, ctx, pooled, time_ids, cond


def _ours_like(ref) -> ControlNet:
    ours = ControlNet(ControlNetConfig.from_diffusers(dict(ref.config)))
    ours.load_state_dict(ref.state_dict())
    return ours.eval()


SMALL = {**MID_CONFIG, "transformer_layers_per_block": [0, 0, 0]}  # a "-small" ControlNet: no transformer blocks


@pytest.mark.parametrize("unet_config", [tiny_config(), MID_CONFIG, SMALL], ids=["tiny", "mid", "small"])
@pytest.mark.parametrize("scale, guess", [(1.0, False), (0.5, False), (0.7, True)])
def test_outputs_equal_diffusers(unet_config, scale, guess):
    ref = diffusers_controlnet(as_controlnet(unet_config))
    assert all(p.abs().sum() > 0 for n, p in ref.named_parameters() if "controlnet_" in n and n.endswith("weight"))
    ours = _ours_like(ref)
    sample, t, ctx, pooled, time_ids, cond = _inputs(unet_config)
    with torch.no_grad():
        want = ref(sample, t, ctx, cond, conditioning_scale=scale, guess_mode=guess,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)
        down, mid = ours(sample, t, ctx, pooled, time_ids, cond, conditioning_scale=scale, guess_mode=guess)
        shifted, _ = ours(sample, t, ctx, pooled, time_ids, cond.roll(1, -1), conditioning_scale=scale,
                          guess_mode=guess)
    assert len(down) == len(want[0])
    for i, (a, b) in enumerate(zip(down, want[0])):
        assert_close_rel(a, b, 1e-4, f"down residual {i}")
    assert_close_rel(mid, want[1], 1e-4, "mid residual")
    assert max_rel_err(shifted[0], down[0]) > 1e-2  # the control image's placement matters (test is not vacuous)


@pytest.mark.parametrize("unet_config", [tiny_config(), MID_CONFIG], ids=["tiny", "mid"])
def test_unet_with_residuals_equals_diffusers(unet_config):
    ref_unet = diffusers_unet(unet_config, seed=3)
    ours = UNet(UNetConfig.from_diffusers(unet_config))
    ours.load_state_dict(ref_unet.state_dict())
    cn = _ours_like(diffusers_controlnet(as_controlnet(unet_config), seed=4))
    sample, t, ctx, pooled, time_ids, cond = _inputs(unet_config)
    with torch.no_grad():
        down, mid = cn(sample, t, ctx, pooled, time_ids, cond)
        want = ref_unet(sample, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                        down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid).sample
        got = ours(sample, t, ctx, pooled, time_ids, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid)
        plain = ours(sample, t, ctx, pooled, time_ids)
    assert_close_rel(got, want, 1e-4, "UNet with residuals")
    assert max_rel_err(plain, got) > 1e-2  # the residuals really change the prediction
    with pytest.raises(ValueError, match="residuals"):
        ours(sample, t, ctx, pooled, time_ids, down_block_additional_residuals=down[:-1])


def test_load_folder_and_single_file(tmp_path):
    ref = diffusers_controlnet(as_controlnet(MID_CONFIG))
    folder = tmp_path / "controlnet"
    save_tensors(folder / "diffusion_pytorch_model.safetensors", ref.state_dict())
    (folder / "config.json").write_text(json.dumps(dict(ref.config)))
    sample, t, ctx, pooled, time_ids, cond = _inputs(MID_CONFIG)
    want = _ours_like(ref)(sample, t, ctx, pooled, time_ids, cond)[1]
    with torch.no_grad():
        assert torch.equal(load_controlnet(folder)(sample, t, ctx, pooled, time_ids, cond)[1], want.detach())
        # the file alone: the config from the tensors; what shapes cannot tell (the head dim) comes
        # from the SDXL preset, so MID's own head counts are given back
        inferred = load_controlnet(folder / "diffusion_pytorch_model.safetensors").controlnet_config
        assert inferred.unet.transformer_layers_per_block[1:] == (1, 2)
        cfg = ControlNetConfig(inferred.unet.replace(attention_heads=(1, 2, 3)), inferred.conditioning_channels,
                               inferred.conditioning_embedding_out_channels)
        got = load_controlnet(folder / "diffusion_pytorch_model.safetensors", config=cfg)
        assert torch.equal(got(sample, t, ctx, pooled, time_ids, cond)[1], want.detach())
    bad = dict(ref.state_dict())
    bad.pop("controlnet_mid_block.weight")
    save_tensors(tmp_path / "bad" / "diffusion_pytorch_model.safetensors", bad)
    (tmp_path / "bad" / "config.json").write_text(json.dumps(dict(ref.config)))
    with pytest.raises(WeightsError, match="controlnet_mid_block.weight") as e:
        load_controlnet(tmp_path / "bad")
    assert "missing" in str(e.value).splitlines()[0] or "controlnet_mid_block" in str(e.value).splitlines()[0]
