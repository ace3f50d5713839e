"""DemoFusion's mechanisms, one small function each, named after the paper (Du et al., CVPR 2024).

Every function is pure (tensors in, tensors out) so an ablation can import one and swap it:
see :class:`demofusion.pipeline.DemoFusionPipeline`'s ``mechanisms=`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..ops import (dilate, gather_views, gaussian_blur, jitter_range, jitter_views, local_views, match_mean_std,
                   pad_to_multiple, scatter_add_views, undilate)

# ---- progressive upscaling (§3.1) ------------------------------------------------------------
def phase_count(height: int, width: int, base: int) -> int:
    """S = ⌊max(H, W) / B⌋ phases (at least 1)."""
    return max(1, int(max(height, width) / base))


def phase_sizes(height: int, width: int, base: int, phases: int | None = None) -> list[tuple[int, int]]:
    """Pixel size of every phase: (H, W)·s/S rounded to multiples of 8, the last exactly (H, W).

    For H = B·S the long side of phase s is B·s, as in the paper. Unlike the reference (which
    takes int() of scaled sizes and ends at B·S, not H), every phase keeps the target's aspect
    ratio to within 8 px and the final phase is exactly the requested size.
    """
    n = phases or phase_count(height, width, base)
    sizes = [(max(8, round(height * s / n / 8) * 8), max(8, round(width * s / n / 8) * 8)) for s in range(1, n)]
    return sizes + [(height, width)]


def upsample_latents(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """z_up = bicubic(z) to the next phase's latent size."""
    return F.interpolate(z, size=size, mode="bicubic")


# ---- the schedule of the three cosine factors (§3.2, §3.3) ------------------------------------
def cosine_factor(t: torch.Tensor | float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """c = ½(1 + cos(π (T − t) / T)): 1 at t = T (pure noise), 0 at t = 0."""
    t = torch.as_tensor(t).cpu()
    T = num_train_timesteps
    return 0.5 * (1 + torch.cos(torch.pi * (T - t) / T))


def skip_residual(z: torch.Tensor, z_hat: torch.Tensor, c: torch.Tensor, alpha1: float) -> torch.Tensor:
    """z ← (1 − c^α1)·z + c^α1·ẑ_t   (ẑ_t: the upsampled previous phase noised to t)."""
    c1 = c**alpha1
    return z * (1 - c1) + z_hat * c1


def fuse(z_local: torch.Tensor, z_global: torch.Tensor, c: torch.Tensor, alpha2: float) -> torch.Tensor:
    """z ← (1 − c^α2)·z_local + c^α2·z_global   (written as a normalised weighted average)."""
    c2 = c**alpha2
    return (z_local * (1 - c2) + z_global * c2) / ((1 - c2) + c2)


def dilation_blur_std(c: torch.Tensor, sigma: float, alpha3: float) -> torch.Tensor:
    """σ_blur = σ·c3, c3 = 0.99·c^α3 + 0.01 (a 0-d tensor like c: the blur takes it as it is, unread)."""
    return sigma * (0.99 * c**alpha3 + 1e-2)


def renormalise(z: torch.Tensor, anchor_mean: torch.Tensor, anchor_std: torch.Tensor) -> torch.Tensor:
    """Phase end: z ← (z − mean z)/std z · std_1 + mean_1 (statistics of the phase-1 latents)."""
    return (z - z.mean()) / z.std() * anchor_std + anchor_mean


# ---- the two kinds of paths: each a stack of views plus how to put them back -------------------
@dataclass
class Views:
    """A stack of views of a latent z [B,C,H,W], ready for batched denoising.

    to_step [N,C,h,w]: the latents each view is stepped from; model_in [N,C,h,w]: what the UNet
    sees; crops [N,2]: crop coordinates (px) for the micro-conditioning; take(x): a z-shaped
    tensor (e.g. a noise canvas) cut into the same views; merge(stepped): views back to z's shape;
    pixels(image, reference): an image at z's pixel size [B,3,8H,8W] (a ControlNet's control image)
    cut into the matching view images, lazily: one function per view returning its [B,3,8h,8w].
    """

    to_step: torch.Tensor
    model_in: torch.Tensor
    crops: torch.Tensor
    take: Callable[[torch.Tensor], torch.Tensor]
    merge: Callable[[torch.Tensor], torch.Tensor]
    pixels: Callable[[torch.Tensor, bool], list] | None = None
    path: str = "local"  # "local" or "global" (dilated)


def multidiffusion_views(z: torch.Tensor, window: int, stride: int, jitter: bool,
                         generator: torch.Generator | None = None, vae_scale: int = 8) -> Views:
    """Local paths: overlapping windows of z, averaged where they overlap after stepping.

    z is padded by J = (window − stride)//4 on every side; each window moves by a random jitter
    within that margin (when ``jitter``) and is conditioned on its crop (h·8, w·8) in the padded
    frame (as the reference).  merge: z_local = Σ_views / count, cropped back to H×W.
    """
    b, c, h, w = z.shape
    win = (min(window, h), min(window, w))
    J = jitter_range(window, stride)
    starts = local_views(h, w, win, stride)
    starts = jitter_views(starts, (h, w), win, J, generator) if jitter else starts + J
    pad = lambda x: F.pad(x, (J, J, J, J))
    take = lambda x: gather_views(pad(x), starts, win)

    def merge(stepped: torch.Tensor) -> torch.Tensor:
        total, count = scatter_add_views(stepped, starts, (b, c, h + 2 * J, w + 2 * J))
        return (total / count)[:, :, J : J + h, J : J + w]

    views = take(z)
    pixels = lambda image, reference: window_pixels(image, starts, win, J, vae_scale, reference)
    return Views(views, views, (starts * vae_scale).repeat_interleave(b, 0), take, merge, pixels)


def blur_for_dilation(z: torch.Tensor, s: int, std: float | torch.Tensor, valid: tuple[slice, slice] | None = None) -> torch.Tensor:
    """Gaussian-blur z (kernel 2s − 1, std σ·c3), then rescale it to z's own mean and std.

    ``valid``: the region whose statistics count (excludes alignment padding); None = all.
    """
    ref = z if valid is None else z[..., valid[0], valid[1]]
    return match_mean_std(gaussian_blur(z, 2 * s - 1, std), ref.mean(), ref.std(), valid)


def dilated_views(z: torch.Tensor, s: int, blur_std: float | torch.Tensor | None, exact_stats: bool = True) -> Views:
    """Global paths (dilated sampling): the s² sub-latents z[:, :, i::s, j::s]; the UNet sees
    those of the blurred latent, each is stepped from the unblurred one; merge interleaves back.

    z is zero-padded top/left to a multiple of s. ``exact_stats``: the blur's mean/std matching
    uses the unpadded region only (the reference includes the padding). ``blur_std`` None: no blur.
    """
    b = z.shape[0]
    zp, (ph, pw) = pad_to_multiple(z, s)
    valid = (slice(ph, None), slice(pw, None)) if exact_stats and (ph or pw) else None
    model_in = zp if blur_std is None else blur_for_dilation(zp, s, blur_std, valid)
    take = lambda x: dilate(pad_to_multiple(x, s)[0], s)
    merge = lambda stepped: undilate(stepped, s)[:, :, ph:, pw:]
    pixels = lambda image, reference: dilated_pixels(image, s, (ph, pw), 8, reference)
    return Views(dilate(zp, s), dilate(model_in, s), torch.zeros(s * s * b, 2, dtype=torch.long), take, merge, pixels,
                 "global")


# ---- control images (ControlNet): the part of the phase's control image each view sees ---------
def window_pixels(image: torch.Tensor, starts: torch.Tensor, win: tuple[int, int], J: int, f: int,
                  reference: bool) -> list:
    """Local window v sees image[8·y_v : 8·(y_v + h), 8·x_v : 8·(x_v + w)] of the image padded by 8J
    like the latent: edge-replicated (``reference``: zeros, as PRIS-CV)."""
    p = J * f
    padded = F.pad(image, (p, p, p, p), mode="constant" if reference else "replicate") if p else image
    h, w = win[0] * f, win[1] * f
    return [lambda y=int(y) * f, x=int(x) * f: padded[:, :, y : y + h, x : x + w] for y, x in starts.tolist()]


def dilated_pixels(image: torch.Tensor, s: int, pad: tuple[int, int], f: int, reference: bool) -> list:
    """Sub-latent (i, j) = z[i::s, j::s] sees the image at 1/s: pixel p ← mean of image[8i + s·p + (0..s−1)]
    (an s×s box from its own cell onwards; image padded 8·pad top/left as the latent, edge-replicated).
    ``reference``: PRIS-CV's point sample image[8i::s, 8j::s] of the zero-padded image."""
    (ph, pw), (H, W) = pad, (image.shape[-2] + pad[0] * f, image.shape[-1] + pad[1] * f)
    if reference:
        cut = lambda i, j: F.pad(image, (pw * f, j * f, ph * f, i * f))[:, :, i * f :: s, j * f :: s][
            :, :, : H // s, : W // s]
        return [lambda i=i, j=j: cut(i, j) for i in range(s) for j in range(s)]
    ext = F.pad(image, (pw * f, (s - 1) * f, ph * f, (s - 1) * f), mode="replicate")
    box = lambda i, j: F.avg_pool2d(ext[:, :, i * f : i * f + H, j * f : j * f + W], s)
    return [lambda i=i, j=j: box(i, j) for i in range(s) for j in range(s)]


@dataclass
class Mechanisms:
    """The swappable mechanism functions (replace any one for an ablation)."""

    phase_sizes: Callable = phase_sizes
    upsample_latents: Callable = upsample_latents
    cosine_factor: Callable = cosine_factor
    skip_residual: Callable = skip_residual
    multidiffusion_views: Callable = multidiffusion_views
    dilated_views: Callable = dilated_views
    dilation_blur_std: Callable = dilation_blur_std
    fuse: Callable = fuse
    renormalise: Callable = renormalise
