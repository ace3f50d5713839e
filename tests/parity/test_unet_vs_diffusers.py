"""UNet parity with diffusers' UNet2DConditionModel (random weights written in official layouts)."""

import pytest
import torch

from demofusion.unet import UNet, UNetConfig, load_unet
from tests.helpers import assert_close_rel
from tests.helpers.unet import (
    MID_CONFIG, SDXL_BASE_CONFIG, SDXL_TURBO_CONFIG, diffusers_forward, diffusers_unet, tiny_config,
    unet_inputs, write_diffusers,
)


@pytest.mark.parametrize("ref_cfg,preset", [(SDXL_BASE_CONFIG, "sdxl-base"), (SDXL_TURBO_CONFIG, "sdxl-turbo")])
def test_sdxl_keys_and_shapes_match_diffusers(ref_cfg, preset):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(ref_cfg)
        ours_preset = UNet(preset)
        ours_read = UNet(UNetConfig.from_diffusers(ref_cfg))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for ours in (ours_preset, ours_read):
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert ours_preset.config == ours_read.config
    assert ours_read.config.sample_size == ref_cfg["sample_size"]


@pytest.mark.parametrize("name,hw", [("tiny", (24, 16)), ("tiny", (13, 10)), ("mid", (20, 12))])
def test_parity_fp32(tmp_path, name, hw):
    cfg = tiny_config() if name == "tiny" else MID_CONFIG
    ref = diffusers_unet(cfg, seed=0)
    write_diffusers(tmp_path, ref)
    ours = load_unet(tmp_path)
    assert ours.config == UNetConfig.from_diffusers(cfg)
    inputs = unet_inputs(cfg, batch=3, h=hw[0], w=hw[1])
    want = diffusers_forward(ref, inputs)
    with torch.no_grad():
        got = ours(*inputs)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert_close_rel(got, want, 1e-4, f"{name} {hw}")


@pytest.mark.parametrize("preset", ["tiny", "sdxl-base", "sdxl-turbo"])
def test_config_round_trips_through_diffusers_dict(preset):
    cfg = UNetConfig.preset(preset)
    assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
