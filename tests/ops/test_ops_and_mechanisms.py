"""The view operations (demofusion/ops) and the pipeline's mechanisms (cosine factors, skip residual,
fusion, views, dilation, blur, renormalisation, phase sizes) against hand-computed expectations."""

import math

import pytest
import torch

from demofusion.ops import (dilate, gather_views, gaussian_blur, gaussian_kernel1d, jitter_range, jitter_views,
                            local_views, match_mean_std, pad_to_multiple, scatter_add_views, undilate, view_starts)
from demofusion.pipeline import (PathLayout, cosine_factor, dilated_views, dilation_blur_std, fuse, multidiffusion_views,
                                 phase_sizes, renormalise, skip_residual)


def test_cosine_factor_values():
    # c = ½(1 + cos(π (T − t)/T)): 1 at t = T, ½ at t = T/2, 0 at t = 0
    assert cosine_factor(1000).item() == pytest.approx(1.0)
    assert cosine_factor(500).item() == pytest.approx(0.5, abs=1e-7)
    assert cosine_factor(0).item() == pytest.approx(0.0, abs=1e-7)
    assert cosine_factor(250).item() == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)), abs=1e-7)


def test_skip_residual_and_fuse_blends():
    z, zh = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 10.0)
    c = torch.tensor(0.5)
    # (1 − 0.5³)·2 + 0.5³·10 = 0.875·2 + 0.125·10 = 3.0
    assert torch.allclose(skip_residual(z, zh, c, 3.0), torch.full_like(z, 3.0))
    # (1 − 0.5)·2 + 0.5·10 = 6
    assert torch.allclose(fuse(z, zh, c, 1.0), torch.full_like(z, 6.0))
    assert torch.equal(skip_residual(z, zh, torch.tensor(0.0), 3.0), z)
    assert dilation_blur_std(torch.tensor(1.0), 0.8, 1.0) == pytest.approx(0.8)
    assert dilation_blur_std(torch.tensor(0.0), 0.8, 1.0) == pytest.approx(0.008)


def test_view_starts_cover_edges():
    assert view_starts(128, 128, 64) == [0]
    assert view_starts(100, 128, 64) == [0]
    assert view_starts(256, 128, 64) == [0, 64, 128]
    assert view_starts(200, 128, 64) == [0, 64, 72]  # last window shifted back to end at 200
    assert view_starts(384, 128, 64) == [0, 64, 128, 192, 256]
    for L in range(16, 120, 7):
        s = view_starts(L, 16, 8)
        assert s[0] == 0 and s[-1] + 16 == max(L, 16) and all(b - a <= 8 for a, b in zip(s, s[1:]))


def test_local_views_grid_and_jitter_bounds():
    st = local_views(40, 56, (16, 16), 8)
    assert st.shape == (4 * 6, 2) and st[0].tolist() == [0, 0] and st[-1].tolist() == [24, 40]
    J = jitter_range(16, 8)
    assert J == 2
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        j = jitter_views(st, (40, 56), (16, 16), J, g) - st - J  # the jitter itself
        seen |= set(j.flatten().tolist())
        assert (j >= -J).all() and (j <= J).all()
        assert (j[st[:, 0] == 0, 0] <= 0).all() and (j[st[:, 1] == 0, 1] <= 0).all()  # near border: −J..0
        assert (j[st[:, 0] == 24, 0] >= 0).all() and (j[st[:, 1] == 40, 1] >= 0).all()  # far border: 0..J
        moved = st + J + j
        assert (moved >= 0).all() and (moved[:, 0] + 16 <= 40 + 2 * J).all() and (moved[:, 1] + 16 <= 56 + 2 * J).all()
    assert seen == set(range(-J, J + 1))


def test_gather_scatter_round_trip_and_counts():
    x = torch.randn(2, 3, 20, 28)
    st = local_views(20, 28, (8, 8), 4)
    v = gather_views(x, st, (8, 8))
    assert v.shape == (len(st) * 2, 3, 8, 8)
    for n, (a, b) in enumerate(st.tolist()):  # view-major, batch inside
        assert torch.equal(v[2 * n : 2 * n + 2], x[:, :, a : a + 8, b : b + 8])
    total, count = scatter_add_views(v, st, x.shape)
    assert torch.allclose(total / count, x)
    expected = torch.zeros(20, 28)
    for a, b in st.tolist():
        expected[a : a + 8, b : b + 8] += 1
    assert torch.equal(count, expected)
    assert count[0, 0] == 1 and count[4, 4] == 4  # a corner once, an interior overlap 2×2


def test_dilation_round_trip_and_order():
    x = torch.randn(2, 4, 12, 9)
    y = dilate(x, 3)
    assert y.shape == (18, 4, 4, 3)
    for k in range(9):
        i, j = divmod(k, 3)
        assert torch.equal(y[2 * k : 2 * k + 2], x[:, :, i::3, j::3])
    assert torch.equal(undilate(y, 3), x)
    with pytest.raises(ValueError, match="multiple"):
        dilate(torch.randn(1, 1, 10, 9), 3)
    xp, pads = pad_to_multiple(torch.ones(1, 1, 10, 9), 3)
    assert pads == (2, 0) and xp.shape[-2:] == (12, 9) and xp[0, 0, :2].abs().sum() == 0


def test_blur_kernel_normalised_and_separable_equals_2d():
    g = gaussian_kernel1d(5, 0.8)
    assert g.sum().item() == pytest.approx(1.0) and torch.allclose(g, g.flip(0))
    assert g.argmax() == 2
    x = torch.randn(1, 4, 16, 16)
    k2 = (g[:, None] * g[None, :])[None, None].repeat(4, 1, 1, 1)
    ref = torch.nn.functional.conv2d(x, k2, padding=2, groups=4)
    assert torch.allclose(gaussian_blur(x, 5, 0.8), ref, atol=1e-6)
    const = torch.ones(1, 1, 9, 9)
    assert torch.allclose(gaussian_blur(const, 5, 0.8)[..., 2:-2, 2:-2], const[..., 2:-2, 2:-2])  # Σ g = 1


def test_mean_std_rescaling_and_renormalise():
    x = torch.randn(1, 4, 8, 8) * 3 + 1
    y = match_mean_std(x, torch.tensor(0.5), torch.tensor(2.0))
    assert y.mean().item() == pytest.approx(0.5, abs=1e-5) and y.std().item() == pytest.approx(2.0, abs=1e-5)
    r = renormalise(x, torch.tensor(-1.0), torch.tensor(0.25))
    assert r.mean().item() == pytest.approx(-1.0, abs=1e-5) and r.std().item() == pytest.approx(0.25, abs=1e-5)


def test_dilated_views_statistics_ignore_alignment_padding():
    z = torch.randn(1, 4, 10, 9) + 5  # needs 2 rows of padding for s = 3
    layout = PathLayout("global", 9, (4, 3), dilation=3)
    v = dilated_views(z, layout, blur_std=0.5)
    zp, (ph, pw) = pad_to_multiple(z, 3)
    from demofusion.pipeline import blur_for_dilation
    blurred = blur_for_dilation(zp, 3, 0.5, (slice(ph, None), slice(pw, None)))
    region = blurred[:, :, ph:, pw:]
    assert region.mean().item() == pytest.approx(z.mean().item(), abs=1e-4)
    assert region.std().item() == pytest.approx(z.std().item(), abs=1e-4)
    assert torch.equal(v.model_in, dilate(blurred, 3))  # the UNet sees the blurred sub-latents
    assert torch.equal(v.merge(v.cut(z)), z)  # merge inverts the split exactly


def test_multidiffusion_views_merge_is_identity_on_unchanged_views():
    z = torch.randn(1, 4, 24, 40)
    starts = tuple(map(tuple, local_views(24, 40, (16, 16), 8).tolist()))
    layout = PathLayout("local", len(starts), (16, 16), starts, margin=2)
    v = multidiffusion_views(z, layout, jitter=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(v.model_in, v.cut(z))
    assert torch.allclose(v.merge(v.model_in), z, atol=1e-6)
    assert (v.crops % 8 == 0).all() and v.crops.shape[0] == v.model_in.shape[0]


def test_phase_sizes_any_aspect_ratio():
    assert phase_sizes(3072, 3072, 1024) == [(1024, 1024), (2048, 2048), (3072, 3072)]
    assert phase_sizes(2048, 4096, 1024) == [(512, 1024), (1024, 2048), (1536, 3072), (2048, 4096)]
    for h, w in [(1536, 2560), (2000, 3000), (1024, 1800), (3072, 1080)]:
        sizes = phase_sizes(h, w, 1024)
        assert sizes[-1] == (h, w)
        assert all(a % 8 == 0 and b % 8 == 0 for a, b in sizes)
        for a, b in sizes:
            assert abs(a / b - h / w) < 16 / min(a, b)  # aspect ratio kept to within rounding
