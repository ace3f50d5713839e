"""The measured memory model (demofusion/memory/): our real modules at SDXL shapes on fake CUDA.

Figures checked against the ones measured when the model was written: SDXL UNet fp16 weights
4.78 GiB; one view with CFG (batch 2, 128² latents) 0.30 GiB of activations with flash attention
and 4.78 GiB at batch 32; the math attention path 2.6 GiB for one 4096-token call. Fake tensors do
no arithmetic, so the full-size modules cost seconds, not minutes.
"""

from __future__ import annotations

import pytest
import torch

from demofusion import memory as M
from demofusion.pipeline.settings import validate
from demofusion.text import CLIPTextConfig, CLIPTextModel
from demofusion.unet import UNet, UNetConfig

GiB, MiB = 2**30, 2**20


def _params(module_factory) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in module_factory().parameters())


def test_unet_weights_are_parameters_times_two_bytes():
    n = _params(lambda: UNet(UNetConfig.preset("sdxl-base")))
    _, baseline = M.measure(lambda: None, resident=(M.fake_unet("sdxl-base", torch.float16),))
    assert baseline == n * 2  # exact: one fp16 storage per parameter, nothing else
    assert M.unet_call_peak().weights_bytes == n * 2
    assert round(n * 2 / GiB, 2) == 4.78


def test_attention_routing_matches_cuda_kernels():
    q = M.fake_input(2, 10, 4096, 64)  # one SDXL level-1 self-attention, batch 2, fp16
    _, flash = M.measure(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q), q)
    _, math = M.measure(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q), q, flash=False)
    inputs = 2 * 10 * 4096 * 64 * 2
    assert flash - inputs < 16 * MiB  # output 10 MiB + log-sum-exp; no L×L matrix
    assert math - inputs > 2.5 * GiB  # the math path materialises 2×10×4096² scores (0.625 GiB each)


def test_unet_activations_one_view_with_cfg():
    flash = M.unet_call_peak(batch=2).activation_bytes
    math = M.unet_call_peak(batch=2, flash=False).activation_bytes
    # measured 0.299 GiB; ±0.05 GiB leaves room for small changes in the modules, far from the
    # 2.7 GiB of the math path
    assert 0.25 * GiB < flash < 0.35 * GiB
    assert math > 2 * GiB and math > 5 * flash  # the routing is what makes the estimate


def test_unet_activations_grow_linearly_with_batch():
    a2, a32 = M.unet_call_peak(batch=2).activation_bytes, M.unet_call_peak(batch=32).activation_bytes
    # every live activation is per-sample except the time/text conditioning (MiB at most), so
    # 16× the batch is 16× the bytes within a few %; measured 4.78 GiB at batch 32
    assert 15.2 < a32 / a2 < 16.8
    assert 4.5 * GiB < a32 < 5.0 * GiB


def test_tracker_frees_and_repeats():
    vae = M.fake_vae("sdxl", torch.float16)
    z = M.fake_input(1, 4, 64, 64)
    out, tr = M.track(vae.decode, z)
    base = M.weight_bytes(vae) + z.untyped_storage().nbytes()
    assert tr.now == base + out.untyped_storage().nbytes()  # only the image is still alive
    del out
    assert tr.now == base  # everything the call allocated was released
    _, p1 = M.measure(vae.decode, z)
    _, p2 = M.measure(vae.decode, z)
    assert p1 == p2 == tr.peak


def test_data_dependent_checks_read_as_healthy():
    x = M.fake_input(4, 4)
    assert M.measure(lambda x: bool(torch.isfinite(x).all()), x)[0] is True


def test_vae_decode_tile_is_activations():
    p = M.vae_decode_tile_peak((128, 128), torch.float16, batch=2)
    assert round(p.weights_bytes / GiB, 3) == 0.156  # 83.65 M parameters × 2 bytes
    # 1024-px tiles: each 128-channel feature map at full size is 0.5 GiB for two tiles in fp16
    assert 2.5 * GiB < p.activation_bytes < 3.5 * GiB
    assert p.activation_bytes > 10 * p.weights_bytes
    one = M.vae_decode_tile_peak((128, 128), torch.float16, batch=1).activation_bytes
    assert abs(p.activation_bytes / one - 2) < 0.05
    assert M.vae_decode_tile_peak((128, 128), torch.float32, batch=2).weights_bytes == 2 * p.weights_bytes


def test_vae_encode_tile():
    p = M.vae_encode_tile_peak((1024, 1024), torch.float16)
    assert 1.5 * GiB < p.activation_bytes < 3.5 * GiB


def test_text_encoder_weights():
    n = sum(_params(lambda n=n: CLIPTextModel(CLIPTextConfig.preset(n))) for n in ("clip-l", "bigg"))
    p = M.text_encode_peak(torch.float16)
    assert p.weights_bytes == 2 * n
    assert abs(p.weights_bytes / ((123e6 + 695e6) * 2) - 1) < 0.01
    assert p.activation_bytes < 64 * MiB  # 77 tokens: hidden states of every layer, a few MiB


def test_unet_calls_follow_the_pipeline_batching():
    s = validate(1024, prompt="x", height=2048, width=2048, view_batch_size=16)
    assert M.unet_calls(s, 0) == [("whole", 1, (128, 128))]
    assert M.unet_calls(s, 1) == [("local+global", 13, (128, 128))]  # 3×3 windows + 2² sub-latents
    r = validate(1024, prompt="x", height=2048, width=2048, view_batch_size=16, reference_compat=True)
    assert M.unet_calls(r, 1) == [("local", 9, (128, 128)), ("global", 4, (128, 128))]
    s4 = validate(1024, prompt="x", height=2048, width=2048, view_batch_size=4)
    assert M.unet_calls(s4, 1) == [("local+global", 4, (128, 128))]
    # balanced chunks: 4096² phase 4's 49 windows + 16 sub-latents at 16 a call are 5 × 13, not 16 … 16, 1
    big = dict(prompt="x", height=4096, width=4096, view_batch_size=16, force=True)
    assert M.unet_calls(validate(1024, **big), 3) == [("local+global", 13, (128, 128))]
    assert M.unet_calls(validate(1024, **big, reference_compat=True), 3) == [("local", 16, (128, 128)),
                                                                             ("global", 16, (128, 128))]
    # split for 4 ranks: 4 views a rank in phase 2; phase 1's lone view as two CFG halves (one row a call)
    s_r = validate(1024, prompt="x", height=2048, width=2048, view_batch_size=16, view_ranks=4)
    assert M.unet_calls(s_r, 1) == [("local+global", 4, (128, 128))] and not M.lone_halves(s_r, 1)
    assert M.unet_calls(s_r, 0) == [("whole", 1, (128, 128))] and M.lone_halves(s_r, 0)


def test_stage_table_ours_and_reference():
    ours = M.stage_table(2048, 2048, view_batch_size=1)
    ref = M.stage_table(2048, 2048, view_batch_size=1, reference=True)
    names = [(st.phase, st.name) for st in ours]
    assert names == [(0, "text"), (1, "unet"), (1, "decode"), (2, "unet"), (2, "decode")]
    w_unet, w_vae = M.unet_call_peak().weights_bytes, M.vae_decode_tile_peak().weights_bytes
    w_text = M.text_encode_peak().weights_bytes
    assert ours[0].weights == w_unet + w_vae + w_text and ours[1].weights == w_unet + w_vae
    assert ref[1].weights == w_unet + w_vae + w_text  # the reference keeps its text encoders
    assert ref[-1].weights == w_unet + 2 * w_vae + w_text  # and decodes with its VAE upcast to fp32
    assert ours[1].activations == M.unet_call_peak(batch=2).activation_bytes
    assert "tiles: 2 × 107×107" in ours[-1].detail  # 2048 px: 3×3 tiles of 856 px, 2 per call
    assert "16×-redundant tiles: 1 × 128×128" in ref[-1].detail
    assert M.peak(ours) is ours[-1] and M.peak(ref) is ref[-1]  # at one view per call, decode dominates
    assert ref[-1].total > ours[-1].total + 1 * GiB
    for st in ours + ref:
        assert st.total == st.weights + st.activations + st.latents + M.reserve(st.activations)


@pytest.mark.parametrize("bad", [dict(height=1000), dict(view_batch_size=0)])
def test_stage_table_checks_its_arguments(bad):
    from demofusion.errors import InputError

    with pytest.raises(InputError):
        M.stage_table(**{"height": 2048, "width": 2048, **bad})
