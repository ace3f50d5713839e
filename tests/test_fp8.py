"""Opt-in fp8 UNet weights (demofusion/fp8.py): error, bytes, dtype/device behaviour, pipeline.

Measured bounds (torch 2.14 CPU, MID_CONFIG = every SDXL feature, small; random_init_ seed 0,
inputs of unet_inputs, fp32 compute; 4 seeds gave the ranges in brackets):

* per layer ‖ΔW‖/‖W‖ with the per-tensor scale: ≤ 0.0270 [0.0269–0.0270] at any weight magnitude
  (e4m3's 3 mantissa bits; bound 0.03). Plain cast: mean 0.027, max 0.036 at random_init_'s
  magnitudes, but mean 0.043, max 0.133 at SDXL-like ones, where small weights fall in e4m3's
  subnormals (|w| < 2^-6).
* UNet output ‖Δ‖/‖ref‖ at random_init_'s magnitudes (N(0, 1/fan_in) with MID's fan-ins, std
  0.024–0.125): scaled 0.121 [0.108–0.121], plain 0.122 [0.107–0.122]; bound 0.16 for both. The
  random network amplifies the 2.7 % weight error (the bf16 model, bf16 compute: 0.050).
* at SDXL-like weight magnitudes (matrices × 1/4: std 0.006–0.031; SDXL's fan-ins give
  random_init_ 0.009–0.056): scaled 0.049 [0.033–0.049] vs plain 0.133 [0.080–0.133]; bounds 0.07
  and scaled ≤ 0.6 × plain (measured ratios 0.37–0.41).
* fp8 storage, bf16 compute (.to(torch.bfloat16)) vs the fp32 model: 0.127 (bound 0.16); the
  bf16 model itself: 0.050.
* weight bytes vs the fp16 model: 0.502× (MID), 0.5003× (SDXL base: 4.78 → 2.39 GiB).
* DemoFusionPipeline "tiny", 512², 1 step, latents: ‖Δ‖/‖ref‖ 0.014 (phase 1) and 0.023 (phase 2)
  with the scale (plain cast: 0.016 / 0.032); bound 0.05.
"""

import copy
import functools

import pytest
import torch
from torch import nn

from demofusion.fp8 import FP8Conv2d, FP8Linear, is_fp8, to_fp8_, weight_bytes
from demofusion.presets import random_init_
from demofusion.unet import UNet, UNetConfig
from tests.helpers.unet import MID_CONFIG, unet_inputs

E4M3 = torch.float8_e4m3fn


INPUTS = unet_inputs(MID_CONFIG, batch=2, h=24, w=16, seed=0)


@functools.lru_cache(maxsize=None)
def _reference(mult: float) -> UNet:
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_diffusers(MID_CONFIG))
    unet = random_init_(unet.to_empty(device="cpu"), 0).eval().requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim >= 2:
                p.mul_(mult)
    return unet


@functools.lru_cache(maxsize=None)
def reference_output(mult: float) -> torch.Tensor:
    with torch.no_grad():
        return _reference(mult)(*INPUTS)


def mid_unet(mult: float = 1.0, dtype=torch.float32) -> UNet:
    """A fresh copy of the fp32 MID UNet (random_init_ seed 0, matrices × ``mult``) in ``dtype``."""
    return copy.deepcopy(_reference(mult)).to(dtype)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quantised(unet):
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, (FP8Linear, FP8Conv2d))]


def test_off_by_default():
    from demofusion.presets import random_components

    assert not is_fp8(mid_unet())
    assert not is_fp8(random_components("tiny")[0])


def test_conversion_keeps_names_dtype_device_and_the_rest():
    unet = mid_unet()
    linear_conv = {n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    keys = set(unet.state_dict())
    others = {k: v.clone() for k, v in unet.state_dict().items() if not k.endswith(".weight") or v.ndim < 2}
    assert to_fp8_(unet) is unet and is_fp8(unet)
    done = dict(quantised(unet))
    assert set(done) == linear_conv - {"conv_in", "conv_out"}  # every Linear/Conv2d but the ends
    for m in done.values():
        assert m.weight.dtype == E4M3 and not m.weight.requires_grad
        assert m.weight_scale.dtype == torch.float32 and m.weight_scale.ndim == 0
        assert isinstance(m, (nn.Linear, nn.Conv2d))
    assert unet.conv_in.weight.dtype == torch.float32  # so UNet.dtype still names the compute dtype
    assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")
    sd = unet.state_dict()
    assert set(sd) == keys | {f"{n}.weight_scale" for n in done}
    for k, v in others.items():  # biases, norms, conv_in/out untouched
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v), k
    with torch.no_grad():
        assert unet(*INPUTS).dtype == torch.float32
    to_fp8_(unet)  # idempotent: fp8 modules are left alone
    assert dict(quantised(unet)) == done
    with pytest.raises(ValueError):
        to_fp8_(mid_unet(), dtype=torch.float16)
    with pytest.raises(ValueError):
        to_fp8_(mid_unet(), scale="channel")


@pytest.mark.parametrize("mult", [1.0, 0.25])
def test_per_layer_weight_error(mult):
    w = {n: m.weight for n, m in _reference(mult).named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    scaled, plain = to_fp8_(mid_unet(mult)), to_fp8_(mid_unet(mult), scale=None)
    err_s = [rel(m.dequantised_weight(torch.float32), w[n]) for n, m in quantised(scaled)]
    err_p = [rel(m.dequantised_weight(torch.float32), w[n]) for n, m in quantised(plain)]
    assert max(err_s) < 0.03  # measured 0.0270 at both magnitudes
    if mult < 1:  # small weights: the plain cast lands in e4m3's subnormals
        assert max(err_p) > 0.1 and sum(err_p) > 1.4 * sum(err_s)


def test_unet_output_error():
    with torch.no_grad():
        for mult, bound in ((1.0, 0.16), (0.25, 0.07)):
            want = reference_output(mult)
            scaled = rel(to_fp8_(mid_unet(mult))(*INPUTS), want)
            plain = rel(to_fp8_(mid_unet(mult), scale=None)(*INPUTS), want)
            assert scaled < bound, (mult, scaled)  # measured 0.121 / 0.049
            if mult == 1.0:
                assert plain < bound, plain  # measured 0.122: weights mostly in e4m3's normal range
            else:
                assert scaled < 0.6 * plain, (scaled, plain)  # measured 0.049 vs 0.133


def test_weight_bytes_halve_against_fp16():
    fp16 = mid_unet(dtype=torch.float16)
    before = weight_bytes(fp16)
    assert before == 2 * sum(p.numel() for p in fp16.parameters())
    layers = [m for n, m in fp16.named_modules()
              if type(m) in (nn.Linear, nn.Conv2d) and n not in ("conv_in", "conv_out")]
    w16 = sum(m.weight.numel() * 2 for m in layers)
    to_fp8_(fp16)
    assert sum(m.weight.numel() * m.weight.element_size() for m in layers) == w16 // 2
    assert weight_bytes(fp16) == before - w16 // 2 + 4 * len(layers)  # + one fp32 scale per layer
    assert weight_bytes(fp16) < 0.51 * before  # measured 0.502 (MID), 0.5003 (SDXL base)


def test_dtype_casts_keep_fp8_storage():
    unet = to_fp8_(mid_unet())
    layer = unet.mid_block.attentions[0].transformer_blocks[0].ff.net[2]
    q, s = layer.weight.clone(), layer.weight_scale.clone()
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.to("cpu", torch.float32)):
        cast(unet)
        assert layer.weight.dtype == E4M3 and torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
        assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, s)
    unet.to(torch.bfloat16)  # bf16 compute: close to the bf16 model's output
    assert unet.dtype == torch.bfloat16 and unet.conv_in.bias.dtype == torch.bfloat16
    with torch.no_grad():
        got = unet(*(x.to(torch.bfloat16) for x in INPUTS))
    err = rel(got, reference_output(1.0))
    assert got.dtype == torch.bfloat16 and err < 0.16, err  # measured 0.127 (bf16 model: 0.050)


def test_fake_cuda_forward():
    """CUDA without a GPU: fake tensors (shapes, dtypes, devices; no values) through the real code."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        unet = UNet(UNetConfig.from_diffusers(MID_CONFIG)).eval().requires_grad_(False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in unet.modules():  # module.to() cannot swap fake parameters: assign them
            m._parameters.update({n: nn.Parameter(torch.empty(p.shape, dtype=torch.float16, device="cuda"),
                                                  requires_grad=False) for n, p in m._parameters.items()
                                  if p is not None})
        to_fp8_(unet)
        for _, m in quantised(unet):
            assert m.weight.dtype == E4M3 and m.weight.device.type == "cuda" == m.weight_scale.device.type
        assert unet.dtype == torch.float16 and unet.device.type == "cuda"
        out = unet(*(x.to("cuda", torch.float16) for x in INPUTS))
        assert out.shape == (2, 4, 24, 16) and out.dtype == torch.float16 and out.device.type == "cuda"


def test_pipeline_runs_with_fp8_unet():
    from demofusion.pipeline import DemoFusionPipeline

    def run(pipe):
        out = pipe("a photo of a cat", height=512, width=512, num_inference_steps=1, output_type="latent")
        return out.latents

    pipe = DemoFusionPipeline.from_pretrained("tiny")
    assert not is_fp8(pipe.unet)
    want = run(pipe)
    to_fp8_(pipe.unet)
    assert is_fp8(pipe.unet) and pipe.unet.dtype == torch.float32
    got = run(pipe)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.isfinite(g).all()
        assert rel(g, w) < 0.05, rel(g, w)  # measured 0.014 (phase 1), 0.023 (phase 2)
