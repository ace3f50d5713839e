"""Full-size SDXL UNet (2.57 B parameters, random weights) against diffusers, fp32 on CPU.

Slow (~10 GB RAM, minutes on 2 cores): ``flock /tmp/df-bigmem.lock pytest --runslow tests/parity/test_unet_full_size_vs_diffusers.py``.
The two models share one copy of the weights (ours is built on the meta device and loaded with
the same tensors through the loader's ``build_and_load``), so the peak is one model, not two.
"""

import gc
import time

import pytest
import torch

from demofusion.unet import UNet, UNetConfig
from demofusion.weights import build_and_load
from tests.helpers import assert_close_rel
from tests.helpers.unet import SDXL_BASE_CONFIG, diffusers_forward, diffusers_unet, unet_inputs


@pytest.mark.slow
def test_full_sdxl_forward_matches_diffusers():
    t0 = time.perf_counter()
    ref = diffusers_unet(SDXL_BASE_CONFIG, seed=0)
    t_build = time.perf_counter() - t0
    inputs = unet_inputs(SDXL_BASE_CONFIG, batch=2, h=32, w=24)
    t0 = time.perf_counter()
    want = diffusers_forward(ref, inputs)
    t_ref = time.perf_counter() - t0

    sd = ref.state_dict()
    del ref
    gc.collect()
    ours = build_and_load(lambda: UNet(UNetConfig.from_diffusers(SDXL_BASE_CONFIG)), sd, "SDXL UNet")
    del sd
    t0 = time.perf_counter()
    with torch.no_grad():
        got = ours(*inputs)
    t_ours = time.perf_counter() - t0
    print(f"\nfull SDXL UNet: build+init {t_build:.1f}s, diffusers fwd {t_ref:.1f}s, ours fwd {t_ours:.1f}s")
    assert torch.isfinite(want).all()
    err = assert_close_rel(got, want, 1e-4, "full SDXL UNet")
    print(f"max|Δ|/max|ref| = {err:.2e}")
