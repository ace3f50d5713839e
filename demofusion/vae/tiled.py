"""Tiled VAE decode/encode for images larger than the VAE's native size.

``decode_tiled`` (ours): latent tiles of at most ``tile_size`` latents (default: the VAE's native
size, 128 latents = 1024 px for SDXL), neighbours overlapping by at least ``overlap`` latents
(default a quarter tile, at least 16), the fewest such tiles, shrunk to the smallest size that
still covers and spread evenly so the image is covered exactly. Each tile is decoded whole
and weighted by a separable cosine cross-fade over the overlaps (weights of all tiles sum to 1
at every pixel, so there is no count map and no 0/0). Tiles are decoded ``batch_size`` at a time;
the working set is one batch of tiles, whatever the image size. The redundancy factor
(decoded pixels / output pixels) is ``(n_h·t_h / h) · (n_w·t_w / w)``; with the SDXL defaults it
stays below (128/96)² ≈ 1.78 (1.57 at 2048², 1.56 at 4096², 1.75 at 8192²): see
:func:`redundancy`. The reference's is 16.

``decode_tiled_reference``: the PRIS-CV DemoFusion ``tiled_decode`` reproduced tile for tile:
cores of ``sample_size/4`` latents at that stride, each decoded with ``3·sample_size/8``
latents of zero-padded context on every side (a ``sample_size`` window, 16× redundant), the
cores pasted and averaged where they overlap.

All functions take *unscaled* latents, like ``vae.decode`` (divide the UNet's latents by
``vae.scaling_factor`` first).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..parallel import Serial
from .model import AutoencoderKL, DiagonalGaussian


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of size ``min(tile, length)`` covering ``[0, length)``, evenly spread,
    neighbours overlapping by at least ``overlap``."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile_size), got overlap={overlap}, tile_size={tile}")
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_layout(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile size, starts) along one axis: the fewest tiles of at most ``tile`` that cover
    ``length`` with overlaps of at least ``overlap``, each shrunk to the smallest size that still
    does (so the redundancy is ≈ 1 + overlap·(n−1)/length, not n·tile/length)."""
    n = len(tile_starts(length, tile, overlap))
    if n == 1:
        return min(tile, length), [0]
    t = min(tile, -(-(length + (n - 1) * overlap) // n))  # ⌈(L + (n−1)·O)/n⌉
    return t, tile_starts(length, t, overlap)


def redundancy(h: int, w: int, tile_size: int, overlap: int) -> float:
    """Decoded pixels / output pixels of :func:`decode_tiled` for an ``h×w`` latent."""
    (th, hs), (tw, ws) = tile_layout(h, tile_size, overlap), tile_layout(w, tile_size, overlap)
    return len(hs) * th * len(ws) * tw / (h * w)


def _ramp(n: int) -> torch.Tensor:
    """Cosine ramp 0→1 across an overlap of n samples (pixel centres): ½(1 − cos(π(k+½)/n))."""
    return 0.5 * (1 - torch.cos(math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n))


def _axis_weights(starts: list[int], tile: int, length: int, mul: int) -> list[torch.Tensor]:
    """Per-tile 1-D blend weights (length ``tile·mul``) that sum to 1 at every output position.

    Each tile ramps up over its overlap with the previous tile and down over its overlap with
    the next (mirror images, so two tiles' weights sum to 1); the sum is then normalised, which
    only matters where three tiles meet. Every position keeps a positive total weight.
    """
    ws = []
    for i, s in enumerate(starts):
        w = torch.ones(tile * mul, dtype=torch.float64)
        if i > 0 and (ov := (starts[i - 1] + tile - s) * mul) > 0:
            w[:ov] *= _ramp(ov)
        if i < len(starts) - 1 and (ov := (s + tile - starts[i + 1]) * mul) > 0:
            w[-ov:] *= _ramp(ov).flip(0)
        ws.append(w)
    total = torch.zeros(length * mul, dtype=torch.float64)
    for s, w in zip(starts, ws):
        total[s * mul : s * mul + w.numel()] += w
    # every weight is > 0, so a position has total weight 0 exactly when no tile covers it (checked
    # on the integer layout: cannot happen for starts from tile_starts; guard anyway)
    covered = 0
    for s in sorted(starts):
        covered = max(covered, s + tile) if s <= covered else covered
    if covered < length:
        raise RuntimeError("tile weights leave positions uncovered")
    return [w / total[s * mul : s * mul + w.numel()] for s, w in zip(starts, ws)]


def _blend_tiles(
    vae: AutoencoderKL,
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid: tuple[int, int],
    in_mul: int,
    out_mul: int,
    out_channels: int,
    tile_size: int | None,
    overlap: int | None,
    batch_size: int,
    out_dtype: torch.dtype,
    out_device,
    runner=None,
) -> torch.Tensor:
    """Apply ``fn`` (one half of ``vae``, run where the VAE is) to overlapping tiles of ``x`` and
    cross-fade the results.

    Positions are in latent-grid units: a tile at grid offset g reads ``x`` from ``g·in_mul``
    and writes the output from ``g·out_mul``. Tiles of at most ``tile_size`` (default: the VAE's
    native size in latents), overlapping by ``overlap`` (default a quarter tile, at least 16
    latents: the decoder's zero padding disturbs ~5 latents, 40 px, inside a tile edge, which the
    cross-fade must reach past). ``runner`` (:mod:`demofusion.parallel`): under a process group,
    each round of batches is shared by the ranks (one batch each), gathered, and blended in the
    one-process order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tile = tile_size or max(vae.config.sample_size // vae.scale_factor, 1)
    overlap = min(max(tile // 4, 16), tile // 2) if overlap is None else overlap
    compute_device = vae.device
    (gh, gw), b = grid, x.shape[0]
    (th, hs), (tw, ws) = tile_layout(gh, tile, overlap), tile_layout(gw, tile, overlap)
    wh, ww = _axis_weights(hs, th, gh, out_mul), _axis_weights(ws, tw, gw, out_mul)
    out_device = x.device if out_device is None else torch.device(out_device)
    out = torch.zeros(b, out_channels, gh * out_mul, gw * out_mul, dtype=out_dtype, device=out_device)
    tiles = [(i, j) for i in range(len(hs)) for j in range(len(ws))]
    batches = [tiles[k : k + batch_size] for k in range(0, len(tiles), batch_size)]
    if runner is None:
        runner = Serial()

    def run(chunk) -> torch.Tensor:
        inp = torch.cat([
            x[:, :, hs[i] * in_mul : (hs[i] + th) * in_mul, ws[j] * in_mul : (ws[j] + tw) * in_mul]
            for i, j in chunk
        ]).to(compute_device)
        return fn(inp).to(dtype=out_dtype)

    like = torch.empty(0, out_channels, th * out_mul, tw * out_mul, dtype=out_dtype, device=compute_device)
    for r0 in range(0, len(batches), runner.world):  # one batch per rank at a time
        group = batches[r0 : r0 + runner.world]
        decoded = runner.map(lambda q: run(group[q]), [len(c) * b for c in group], like)
        for chunk, res in zip(group, decoded):
            res = res.to(out_device)
            for n, (i, j) in enumerate(chunk):
                weight = (wh[i][:, None] * ww[j][None, :]).to(out_device, out_dtype)
                y, xo = hs[i] * out_mul, ws[j] * out_mul
                out[:, :, y : y + weight.shape[0], xo : xo + weight.shape[1]] += res[n * b : (n + 1) * b] * weight
    return out


def decode_tiled(vae: AutoencoderKL, z: torch.Tensor, tile_size: int | None = None, overlap: int | None = None,
                 batch_size: int = 2, out_dtype: torch.dtype = torch.float32, out_device=None,
                 runner=None) -> torch.Tensor:
    """Decode unscaled latents ``z`` [B,4,h,w] → image [B,3,8h,8w] in overlapping, blended tiles.

    ``tile_size``/``overlap`` are in latents (defaults: the VAE's native size, 128 for SDXL, and
    a quarter of it, at least 16); ``batch_size`` tiles are decoded per call. Images no larger
    than one tile are decoded whole (identical to ``vae.decode``). Redundancy ≈
    (tile/(tile−overlap))² at most (< 1.79 with the SDXL defaults; :func:`redundancy` gives the
    exact figure). ``out_device``: where the image is assembled (e.g. ``"cpu"`` to keep a GPU's
    working set to one batch of tiles).
    """
    if z.ndim != 4:
        raise ValueError(f"decode_tiled expects latents [B,C,h,w], got shape {tuple(z.shape)}")
    return _blend_tiles(vae, vae.decode, z, tuple(z.shape[2:]), 1, vae.scale_factor, vae.config.out_channels,
                        tile_size, overlap, batch_size, out_dtype, out_device, runner)


def encode_tiled(vae: AutoencoderKL, x: torch.Tensor, tile_size: int | None = None, overlap: int | None = None,
                 batch_size: int = 2, out_device=None, runner=None) -> DiagonalGaussian:
    """Encode a large image ``x`` [B,3,H,W] (H, W multiples of 8) in overlapping tiles.

    Same tiling as :func:`decode_tiled` on the latent grid (tiles of ``8·tile_size`` pixels);
    the posterior moments (mean and log-variance) are cross-faded. Returns the posterior.
    """
    sf = vae.scale_factor
    if x.ndim != 4 or x.shape[2] % sf or x.shape[3] % sf:
        raise ValueError(f"encode_tiled expects images [B,3,H,W] with H, W multiples of {sf}, got {tuple(x.shape)}")

    def moments(t: torch.Tensor) -> torch.Tensor:
        post = vae.encode(t)
        return torch.cat([post.mean, post.logvar], dim=1)

    grid = (x.shape[2] // sf, x.shape[3] // sf)
    m = _blend_tiles(vae, moments, x, grid, sf, 1, 2 * vae.config.latent_channels, tile_size, overlap,
                     batch_size, torch.float32, out_device, runner)
    return DiagonalGaussian(m)


# ---- the reference's tiling ------------------------------------------------------------------
def reference_views(h: int, w: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The reference's ``get_views`` without jitter: windows (h0, h1, w0, w1) on an h×w latent,
    the last row/column shifted back to end at the border."""

    def axis(n: int) -> list[tuple[int, int]]:
        count = int((n - window) / stride - 1e-6) + 2 if n > window else 1
        spans = []
        for i in range(count):
            a = i * stride
            b = a + window
            if b > n:
                a, b = a + n - b, n
            if a < 0:
                a, b = 0, b - a
            spans.append((a, b))
        return spans

    return [(a, b, c, d) for a, b in axis(h) for c, d in axis(w)]


def decode_tiled_reference(
    vae: AutoencoderKL, z: torch.Tensor, sample_size: int, lowvram: bool = False, batch_size: int = 1
) -> torch.Tensor:
    """The PRIS-CV DemoFusion ``tiled_decode``, reproduced (unscaled latents in, float32 out).

    ``sample_size``: the UNet's latent sample size (128 for SDXL base). Cores of
    ``sample_size//4`` latents at that stride (``lowvram``: half that stride, context = one
    core), each decoded with ``3·sample_size//8`` latents of zero context on each side; the
    decoded cores are summed and divided by their count. Output [B,3,8h,8w]. The reference
    allocates its canvas at the phase's pixel size, which for non-square phases can exceed
    ``8h×8w`` by a few never-written (0/0 = NaN) rows/columns; those are not reproduced.
    ``batch_size`` > 1 decodes several views per call (the reference uses 1).
    """
    core = sample_size // 4
    stride, pad = (core // 2, core) if lowvram else (core, sample_size // 8 * 3)
    if core < 1 or stride < 1:
        raise ValueError(f"sample_size {sample_size} is too small for the reference tiling (needs >= 8)")
    sf = vae.scale_factor
    b, _, h, w = z.shape
    views = reference_views(h, w, core, stride)
    zp = F.pad(z, (pad, pad, pad, pad))
    image = torch.zeros(b, vae.config.out_channels, h * sf, w * sf, device=z.device)
    count = torch.zeros_like(image)
    for k in range(0, len(views), batch_size):
        chunk = views[k : k + batch_size]
        patches = vae.decode(torch.cat([zp[:, :, h0 : h1 + 2 * pad, w0 : w1 + 2 * pad] for h0, h1, w0, w1 in chunk])
                             .to(vae.device))
        for n, (h0, h1, w0, w1) in enumerate(chunk):
            p = patches[n * b : (n + 1) * b, :, pad * sf : -pad * sf or None, pad * sf : -pad * sf or None]
            image[:, :, h0 * sf : h1 * sf, w0 * sf : w1 * sf] += p.to(z.device)
            count[:, :, h0 * sf : h1 * sf, w0 * sf : w1 * sf] += 1
    return image / count
