"""Tiled VAE decode/encode: blending is exact for local decoders, tiled ≈ full and seamless on
a real (tiny, random) VAE, and the reference mode equals a loop transcription of PRIS-CV's
``tiled_decode`` run on diffusers' AutoencoderKL."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from demofusion.vae import (
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
    decode_tiled,
    decode_tiled_reference,
    encode_tiled,
    load_vae,
    tile_starts,
)
from demofusion.vae.tiled import redundancy, tile_layout
from tests.helpers import assert_close_rel, max_rel_err
from tests.helpers.vae import diffusers_vae

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, diffusers') tiny VAEs with the same seeded weights."""
    ref = diffusers_vae("tiny", seed=11)
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    return load_vae(folder), ref


def _latents(h, w, seed=0, batch=1):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


class _LocalVAE:
    """A stand-in whose decode/encode are pointwise (nearest ×8 / 8×8 mean): any correct blend
    of overlapping tiles must reproduce them exactly."""

    scale_factor = 8
    config = VAEConfig.preset("tiny")
    device = torch.device("cpu")

    def decode(self, z):
        return F.interpolate(z[:, :3] * 2 + z[:, 3:], scale_factor=8, mode="nearest")

    def encode(self, x):
        m = F.avg_pool2d(x, 8)
        return DiagonalGaussian(torch.cat([m, m[:, :1], m, m[:, :1] * 0.5 - 1], dim=1))


@pytest.mark.parametrize("h,w,tile,overlap", [(48, 80, 32, 8), (57, 33, 32, 8), (20, 70, 16, 12), (9, 9, 32, 8)])
def test_blend_is_a_partition_of_unity(h, w, tile, overlap):
    vae, z = _LocalVAE(), _latents(h, w, seed=h)
    for bs in (1, 3):
        out = decode_tiled(vae, z, tile, overlap, batch_size=bs)
        assert torch.allclose(out, vae.decode(z), atol=1e-6, rtol=0)
    x = torch.randn(1, 3, 8 * h, 8 * w)
    post, ref = encode_tiled(vae, x, tile, overlap), vae.encode(x)
    assert torch.allclose(post.mean, ref.mean, atol=1e-6) and torch.allclose(post.logvar, ref.logvar, atol=1e-6)


def test_tile_layout_and_redundancy():
    assert tile_starts(256, 128, 32) == [0, 64, 128]
    assert tile_starts(512, 128, 32) == [0, 96, 192, 288, 384]
    assert tile_starts(57, 32, 8) == [0, 12, 25]  # tiles 0 and 2 overlap too (normalised)
    assert tile_starts(100, 128, 32) == [0]
    # tiles shrink to the smallest size that still covers with the same count and overlap
    assert tile_layout(256, 128, 32) == (107, [0, 74, 149])
    assert tile_layout(129, 128, 32) == (81, [0, 48])
    assert tile_layout(512, 128, 32) == (128, [0, 96, 192, 288, 384])
    assert tile_layout(20, 128, 32) == (20, [0])
    # figures stated in the docs (SDXL defaults) and the bound ≈ (128/96)² for every size
    assert redundancy(256, 256, 128, 32) == pytest.approx(1.5723, abs=1e-4)
    assert redundancy(512, 512, 128, 32) == 1.5625
    assert max(redundancy(n, n, 128, 32) for n in range(1, 2049)) < 1.79
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 32, 32)


def _overlap_zones(length, tile, overlap, sf=8):
    """Pixel spans where consecutive tiles of decode_tiled overlap along one axis."""
    t, starts = tile_layout(length, tile, overlap)
    return [(b * sf, (a + t) * sf) for a, b in zip(starts, starts[1:])]


def _mask(h_px, w_px, row_zones, col_zones):
    mask = torch.zeros(h_px, w_px, dtype=torch.bool)
    for lo, hi in row_zones:
        mask[lo:hi] = True
    for lo, hi in col_zones:
        mask[:, lo:hi] = True
    return mask


def _seam_stats(out, full, mask):
    """Mean |error| and mean |error of the finite differences| in the overlap zones vs elsewhere."""
    e = (out - full).abs().mean(dim=(0, 1))
    d = out - full
    gx = (d[..., :, 1:] - d[..., :, :-1]).abs().mean(dim=(0, 1))
    gy = (d[..., 1:, :] - d[..., :-1, :]).abs().mean(dim=(0, 1))
    mx, my = mask[:, 1:] | mask[:, :-1], mask[1:] | mask[:-1]
    return (e[mask].mean() / e[~mask].mean()).item(), (gx[mx].mean() / gx[~mx].mean()).item(), \
        (gy[my].mean() / gy[~my].mean()).item()


def test_tiled_decode_close_to_full_and_seamless(pair):
    ours, _ = pair
    h, w, tile, overlap = 48, 80, 36, 12  # 2 × 3 tiles of 30 × 35
    z = _latents(h, w, seed=3)
    full, out = ours.decode(z), decode_tiled(ours, z, tile, overlap, batch_size=4)
    assert out.shape == full.shape and torch.isfinite(out).all()
    # Tiles see their own GroupNorm/attention statistics, so a random-weight tiny VAE differs
    # from the full decode everywhere (measured: max 0.076·max|full|, RMS 0.067·RMS(full)).
    rms = ((out - full).pow(2).mean().sqrt() / full.pow(2).mean().sqrt()).item()
    assert max_rel_err(out, full) < 0.3 and rms < 0.15, (max_rel_err(out, full), rms)
    # Seams: the error (and its gradient) where tiles meet is no worse than inside tiles.
    zones = _mask(8 * h, 8 * w, _overlap_zones(h, tile, overlap), _overlap_zones(w, tile, overlap))
    ratios = _seam_stats(out, full, zones)
    assert max(ratios) < 1.15, ratios  # measured: 0.96, 0.99, 0.98
    # The same measure does flag seams: abutting tiles with no overlap or blending.
    hard = torch.cat([torch.cat([ours.decode(z[:, :, i:i + 24, j:j + 40]) for j in (0, 40)], dim=3)
                      for i in (0, 24)], dim=2)
    cuts = _mask(8 * h, 8 * w, [(184, 200)], [(312, 328)])  # 1 latent either side of the cuts
    hard_ratios = _seam_stats(hard, full, cuts)
    assert min(hard_ratios[1:]) > 1.5, hard_ratios  # measured: 6.2, 6.1, 6.2


def test_tiled_decode_edge_cases(pair):
    ours, _ = pair
    z = _latents(14, 20, seed=4, batch=2)
    assert torch.equal(decode_tiled(ours, z, tile_size=32), ours.decode(z))  # one tile = plain decode
    odd = decode_tiled(ours, _latents(23, 29, seed=5), tile_size=12, overlap=5)
    assert odd.shape == (1, 3, 184, 232) and torch.isfinite(odd).all()
    a = decode_tiled(ours, z, 10, 4, batch_size=1)
    b = decode_tiled(ours, z, 10, 4, batch_size=5)
    assert_close_rel(b, a, tol=1e-5, what="batching")
    assert_close_rel(a[1:], decode_tiled(ours, z[1:], 10, 4), tol=1e-5, what="batch entries independent")


def test_encode_tiled_close_to_full(pair):
    ours, _ = pair
    x = torch.rand(1, 3, 384, 640, generator=torch.Generator().manual_seed(6)) * 2 - 1
    full, tiled = ours.encode(x), encode_tiled(ours, x, tile_size=36, overlap=12)
    assert tiled.mean.shape == full.mean.shape == (1, 4, 48, 80)
    # measured: 0.065 of max|mean| for this random-weight VAE (tile statistics, as for decode)
    assert max_rel_err(tiled.mean, full.mean) < 0.15
    small = x[:, :, :128, :192]
    assert torch.equal(encode_tiled(ours, small, tile_size=32).mean, ours.encode(small).mean)


# ---- reference-compatible mode ------------------------------------------------------------------
def _transcribed_reference_tiled_decode(vae, latents, current_height, current_width, sample_size, lowvram=False):
    """PRIS-CV DemoFusion's ``tiled_decode`` + ``get_views`` (no jitter), transcribed as a loop,
    on diffusers' AutoencoderKL and *scaled* latents, with the reference's pixel-sized canvas."""
    core_size = sample_size // 4
    core_stride = core_size
    pad_size = sample_size // 8 * 3
    if lowvram:
        core_stride = core_size // 2
        pad_size = core_size
    height, width = current_height // 8, current_width // 8
    nh = int((height - core_size) / core_stride - 1e-6) + 2 if height > core_size else 1
    nw = int((width - core_size) / core_stride - 1e-6) + 2 if width > core_size else 1
    views = []
    for i in range(nh * nw):
        h_start = int((i // nw) * core_stride)
        h_end = h_start + core_size
        w_start = int((i % nw) * core_stride)
        w_end = w_start + core_size
        if h_end > height:
            h_start = int(h_start + height - h_end)
            h_end = int(height)
        if w_end > width:
            w_start = int(w_start + width - w_end)
            w_end = int(width)
        if h_start < 0:
            h_end = int(h_end - h_start)
            h_start = 0
        if w_start < 0:
            w_end = int(w_end - w_start)
            w_start = 0
        views.append((h_start, h_end, w_start, w_end))
    latents_ = F.pad(latents, (pad_size, pad_size, pad_size, pad_size), "constant", 0)
    image = torch.zeros(latents.size(0), 3, current_height, current_width)
    count = torch.zeros_like(image)
    for h_start, h_end, w_start, w_end in views:
        patch = vae.decode(latents_[:, :, h_start:h_end + pad_size * 2, w_start:w_end + pad_size * 2]
                           / vae.config.scaling_factor).sample
        p = pad_size * 8
        image[:, :, h_start * 8:h_end * 8, w_start * 8:w_end * 8] += patch[:, :, p:patch.size(2) - p, p:patch.size(3) - p]
        count[:, :, h_start * 8:h_end * 8, w_start * 8:w_end * 8] += 1
    return image / count


@pytest.mark.parity
@pytest.mark.parametrize("h,w,sample_size,lowvram,extra", [
    (12, 18, 16, False, (5, 3)),  # non-square phase: the reference's canvas is a few px larger
    (8, 14, 16, True, (0, 7)),
    (3, 10, 16, False, (0, 0)),  # smaller than a core (with a larger canvas the reference crashes)
])
def test_reference_mode_equals_transcription(pair, h, w, sample_size, lowvram, extra):
    ours, ref = pair
    scaled = _latents(h, w, seed=7, batch=2)
    expect = _transcribed_reference_tiled_decode(ref, scaled, 8 * h + extra[0], 8 * w + extra[1], sample_size, lowvram)
    got = decode_tiled_reference(ours, scaled / ours.scaling_factor, sample_size, lowvram=lowvram, batch_size=1)
    assert got.shape == (2, 3, 8 * h, 8 * w) and torch.isfinite(got).all()
    # the quirk: rows/columns past 8h × 8w are 0/0 in the reference; ours stops at 8h × 8w
    assert torch.isnan(expect[:, :, 8 * h:]).all() and torch.isnan(expect[..., 8 * w:]).all()
    assert_close_rel(got, expect[:, :, :8 * h, :8 * w], what="reference tiled decode")
    if not lowvram:
        batched = decode_tiled_reference(ours, scaled / ours.scaling_factor, sample_size, batch_size=8)
        assert_close_rel(batched, got, tol=1e-5, what="batched reference views")


def test_working_set_is_one_batch_of_tiles_whatever_the_size():
    """decode_tiled / encode_tiled never hand the VAE more than batch_size tiles of ≤ tile_size."""
    vae, seen = _LocalVAE(), []
    decode, encode = vae.decode, vae.encode
    vae.decode = lambda z: (seen.append(tuple(z.shape)), decode(z))[1]
    vae.encode = lambda x: (seen.append(tuple(x.shape)), encode(x))[1]
    for h, w in ((40, 40), (300, 520)):
        seen.clear()
        decode_tiled(vae, _latents(h, w, batch=2), tile_size=32, overlap=8, batch_size=3)
        assert max(s[0] for s in seen) <= 6 and max(max(s[2:]) for s in seen) <= 32, seen[:3]
    seen.clear()
    encode_tiled(vae, torch.randn(1, 3, 8 * 100, 8 * 90), tile_size=32, overlap=8, batch_size=2)
    assert max(s[0] for s in seen) <= 2 and max(max(s[2:]) for s in seen) <= 256
