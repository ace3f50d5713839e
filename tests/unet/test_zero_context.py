"""Zero-context skip: rows whose cross-attention context is SDXL's zero
negative embedding get ``to_out``'s bias written instead of attention computed — bitwise equal
to the full computation (k = v = 0 exactly, so the attention is 0 and the output is the bias)."""

import pytest
import torch

from demofusion.presets import random_init_, tiny_controlnet
from demofusion.unet import UNet
from demofusion.unet.attention import Attention, CrossContext


@pytest.fixture(scope="module")
def tiny32():
    return random_init_(UNet("tiny"), 0).eval().requires_grad_(False)


def _inputs(unet, b, zero_rows, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    x = torch.randn(b, c.in_channels, 16, 16, generator=g).to(dtype)
    ctx = torch.randn(b, 77, c.cross_attention_dim, generator=g).to(dtype)
    ctx[zero_rows] = 0  # SDXL's zero negative prompt
    return x, ctx, torch.randn(b, pooled, generator=g).to(dtype), torch.tensor([[256., 256, 0, 0, 256, 256]] * b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_context_skip_is_bitwise_the_full_unet(tiny32, dtype):
    """Interleaved (uncond, cond) pairs, an all-unconditional call, a leading uncond row."""
    unet = tiny32 if dtype == torch.float32 else UNet("tiny").requires_grad_(False).to(dtype)
    unet.load_state_dict(tiny32.state_dict())
    for b, rows in ((4, slice(0, None, 2)), (2, slice(None)), (3, slice(0, 1))):
        x, ctx, pooled, ids = _inputs(unet, b, rows, dtype)
        with torch.no_grad():
            full = unet(x, 500, ctx, pooled, ids)
            skip = unet(x, 500, ctx, pooled, ids, zero_context=rows)
        assert skip.dtype == dtype and torch.equal(full, skip), (b, rows)


def test_zero_context_skip_with_controlnet_residuals(tiny32):
    unet = tiny32
    net = tiny_controlnet(unet.config)
    x, ctx, pooled, ids = _inputs(unet, 4, slice(0, None, 2), torch.float32)
    image = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = []
        for rows in (None, slice(0, None, 2)):
            down, mid = net(x, 500, ctx, pooled, ids, image, zero_context=rows)
            outs.append(unet(x, 500, ctx, pooled, ids, down, mid, zero_context=rows))
    assert torch.equal(*outs)


def test_attention_writes_the_bias_without_computing_it():
    """The skipped rows are the bias exactly; the other rows are attended on their own."""
    torch.manual_seed(0)
    attn = Attention(8, 2, 4, context_dim=6)
    x, ctx = torch.randn(4, 5, 8), torch.randn(4, 3, 6)
    out = attn(x, CrossContext(ctx, slice(1, None, 2)))
    assert torch.equal(out[1::2], attn.to_out[0].bias.expand(2, 5, 8))
    assert torch.equal(out[0::2], attn(x[0::2], ctx[0::2]))
    with pytest.raises(ValueError, match="evenly spaced"):
        attn(x, CrossContext(ctx, slice(1, 2)))  # rows 0, 2, 3 left


def test_channels_last_unet_equals_contiguous_to_rounding(tiny32):
    """pipe.compile() puts the UNet in channels_last on CUDA: the same function to float rounding."""
    x, ctx, pooled, ids = _inputs(tiny32, 2, slice(0, 1), torch.float32)
    last = UNet("tiny").requires_grad_(False)
    last.load_state_dict(tiny32.state_dict())
    last.to(memory_format=torch.channels_last)
    assert last.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = tiny32(x, 500, ctx, pooled, ids)
        got = last(x.contiguous(memory_format=torch.channels_last), 500, ctx, pooled, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_pipeline_skips_the_zero_negative_bitwise():
    """Wired into the pipeline: without a negative prompt (SDXL's forced zeros) the CFG pairs pass
    ``slice(0, None, 2)`` and an unconditional call (phase 1's lone half on 2 ranks' split)
    ``slice(None)``, to the UNet and the ControlNet; the latents equal a run whose UNet and
    ControlNet compute every row, bit for bit (fp32). A negative prompt is not skipped."""
    from demofusion import DemoFusionPipeline
    from tests.helpers.pipeline import small_pipeline

    base = small_pipeline("sdxl")
    pipe = DemoFusionPipeline(base.unet, base.vae, base.text, base.scheduler,
                              controlnet=tiny_controlnet(base.unet.config, 3))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    kw = dict(prompt="a castle", height=256, width=128, num_inference_steps=1, seed=3, view_ranks=2,
              output_type="latent", control_image=image)  # 2 phases: 1 view (2 halves), 3 views (pairs)
    seen = []

    def spy(module, skip: bool):
        real = module.forward

        def forward(*a, zero_context=None, **k):
            seen.append(zero_context)
            return real(*a, zero_context=zero_context if skip else None, **k)
        return forward

    def run(skip: bool, **extra):
        seen.clear()
        pipe.unet.forward, pipe.controlnets[0].forward = spy(base.unet, skip), spy(pipe.controlnets[0], skip)
        try:
            return pipe(**kw, **extra).latents
        finally:
            del pipe.unet.forward, pipe.controlnets[0].forward
    skipped = run(True)
    kinds = lambda: set(map(str, seen))  # slices are not hashable before Python 3.12
    assert kinds() == {str(slice(None)), "None", str(slice(0, None, 2))}  # uncond half, cond half, pairs
    full = run(False)
    assert all(torch.equal(a, b) for a, b in zip(skipped, full))
    run(True, negative_prompt="blurry")
    assert kinds() == {"None"}
