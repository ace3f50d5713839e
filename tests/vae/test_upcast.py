"""The VAE's float16-overflow upcast follows diffusers' recipe, and a tiled decode redoes only the
call that overflowed.

The reference is diffusers' AutoencoderKL after the SDXL pipelines' ``upcast_vae`` (SDPA
attention): the VAE to float32, then ``post_quant_conv``, ``decoder.conv_in`` and
``decoder.mid_block`` back to float16, the latents cast to ``post_quant_conv``'s dtype. diffusers
0.42 deprecated that recipe and dropped the cast between the decoder's mid block and up blocks
(its ``Decoder`` no longer runs mixed dtypes), so the reference pass is run here layer by layer on
diffusers' own modules in the order its ``Decoder.forward`` had: conv_in, mid_block, the cast to
the up blocks' dtype, up_blocks, conv_norm_out, conv_act, conv_out. Checked: ours equals it bit for
bit, with the same dtype in every parameter; a mid block that overflows too sends the rest to
float32 (the full-float32 decode, bit for bit); the number and dtypes of decoder calls of a tiled
decode when one tile overflows.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from demofusion.vae import decode_tiled, load_vae
from tests.helpers.vae import diffusers_vae

torch.set_grad_enabled(False)


def _overflowing(tmp_path, layer: str):
    """The tiny diffusers VAE (fp16 file) with ``layer``'s weight scaled to a max |w| of 6e4
    (finite in float16; its float16 outputs overflow)."""
    ref = diffusers_vae("tiny", seed=6)
    w = ref.get_submodule(layer).weight
    w.mul_(6e4 / w.abs().max())
    ref.half().save_pretrained(tmp_path / "vae", variant="fp16")
    return ref.half(), tmp_path / "vae"


def _latents(h=6, w=10, seed=0):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed)).half()


def _reference_upcast_decode(ref16, z):
    """diffusers' upcast recipe on its AutoencoderKL, its pre-0.42 decoder pass (module doc)."""
    r = copy.deepcopy(ref16).to(torch.float32)
    for m in (r.post_quant_conv, r.decoder.conv_in, r.decoder.mid_block):
        m.to(torch.float16)
    z = z.to(next(iter(r.post_quant_conv.parameters())).dtype)
    d = r.decoder
    x = d.mid_block(d.conv_in(r.post_quant_conv(z)), None)
    x = x.to(next(iter(d.up_blocks.parameters())).dtype)
    for up in d.up_blocks:
        x = up(x, None)
    return d.conv_out(d.conv_act(d.conv_norm_out(x))), r


def _decoder_calls(vae) -> list:
    """Per decoder call: (mid block's dtype, up blocks' input dtype)."""
    calls = []
    vae.decoder.up_blocks[0].register_forward_pre_hook(
        lambda m, args: calls.append((vae.decoder.mid_block.resnets[0].conv1.weight.dtype, args[0].dtype)))
    return calls


def test_upcast_decode_equals_diffusers_recipe(tmp_path):
    ref16, path = _overflowing(tmp_path, "decoder.up_blocks.0.resnets.0.conv1")
    z = _latents()
    assert not torch.isfinite(ref16.decode(z).sample).all()  # the fp16 reference really overflows
    want, upcast = _reference_upcast_decode(ref16, z)
    assert torch.isfinite(want).all()
    vae = load_vae(path)
    calls = _decoder_calls(vae)
    with pytest.warns(RuntimeWarning, match="overflowed in float16") as record:
        got = vae.decode(z)
    assert len(record) == 1 and got.dtype == torch.float32 and vae.dtype == torch.float32
    assert torch.equal(got, want)
    assert {k: v.dtype for k, v in vae.state_dict().items()} == {k: v.dtype for k, v in upcast.state_dict().items()}
    assert vae.decoder.mid_block.attentions[0].to_q.weight.dtype == torch.float16
    assert calls == [(torch.float16, torch.float16), (torch.float16, torch.float32)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # upcast for good: no second warning, one decoder call
        assert torch.equal(vae.decode(z), want) and len(calls) == 3
        x = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(2)).half() * 2 - 1
        assert vae.encode(x).mean.dtype == torch.float32  # the encoder is float32 whole


def test_a_mid_block_overflow_sends_the_head_to_float32_too(tmp_path):
    ref16, path = _overflowing(tmp_path, "decoder.conv_in")
    z = _latents()
    want, _ = _reference_upcast_decode(ref16, z)
    assert not torch.isfinite(want).all()  # diffusers' recipe is not enough here
    vae = load_vae(path)
    calls = _decoder_calls(vae)
    with pytest.warns(RuntimeWarning, match="overflowed in float16") as record:
        got = vae.decode(z)
    assert len(record) == 2 and "mid_block) was moved to float32 too" in str(record[1].message)
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert torch.equal(got, copy.deepcopy(ref16).float().decode(z.float()).sample)
    assert [c[0] for c in calls] == [torch.float16, torch.float16, torch.float32]


def test_tiled_decode_redoes_only_the_call_that_overflowed(tmp_path):
    """Six tiles, one per call. Every fp16 tile overflows: the first is decoded in fp16, then redone
    upcast; the other five are decoded upcast at once (7 decoder calls)."""
    _, path = _overflowing(tmp_path, "decoder.up_blocks.0.resnets.0.conv1")
    vae = load_vae(path)
    calls = _decoder_calls(vae)
    z = _latents(14, 20, seed=3)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        out = decode_tiled(vae, z, tile_size=8, overlap=2, batch_size=1)
    assert torch.isfinite(out).all()
    up = [c[1] for c in calls]
    assert len(up) == 7 and up == [torch.float16] + [torch.float32] * 6
    assert all(c[0] == torch.float16 for c in calls)  # the mid block stays float16 throughout


def test_tiled_decode_after_a_later_tile_overflows(tmp_path):
    """Tile 2 of 6 is made to overflow in float16 (its up blocks' fp16 output is set to inf; the
    tiny VAE's fp16 weights are finite otherwise): tiles 1 and 2 in fp16, tile 2 once more upcast,
    tiles 3–6 upcast: 7 decoder calls; the result is finite and tile 1 kept its fp16 decode."""
    ref = diffusers_vae("tiny", seed=6)
    ref.half().save_pretrained(tmp_path / "vae", variant="fp16")
    vae = load_vae(tmp_path / "vae")
    calls = _decoder_calls(vae)
    vae.decoder.up_blocks[0].register_forward_hook(
        lambda m, args, out: out.clone().fill_(float("inf")) if len(calls) == 2 and out.dtype == torch.float16
        else None)
    z = _latents(14, 20, seed=3)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        out = decode_tiled(vae, z, tile_size=8, overlap=2, batch_size=1)
    assert torch.isfinite(out).all()
    assert [c[1] for c in calls] == [torch.float16] * 2 + [torch.float32] * 5
    fp16 = load_vae(tmp_path / "vae")
    first = fp16.decode(z[:, :, :8, :8]).float()  # tile 1 (8×8 latents at the corner), fp16 decode
    assert torch.equal(out[:, :, :48, :48], first[:, :, :48, :48])  # where no other tile blends in
