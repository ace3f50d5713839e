"""DemoFusion (Du et al., CVPR 2024) as one multi-view denoiser, read top-down (docs/algorithm.md;
"§" and "eq." in the docstrings are the paper's sections and equations).

1. the paper's scalars, one function per equation;
2. the view layout of a phase (which paths, how many views, of what shape): the one function the
   denoiser, the work line (:mod:`.work`), the memory planner and the benchmarks count views with;
3. cutting views from the whole latent and merging their predictions back, each latent cut beside
   the ControlNet pixel cut that matches it;
4. the multi-view denoiser D(z, i): every view of every path through the guided UNet, the
   predictions merged per path and fused (c^α2) into ONE prediction for the whole latent;
5. the phase loops: the ordinary sampler loop plus the skip residual.

Every supported sampler step (Euler, DDIM without clipping, Euler-ancestral with given noise) is
affine in (x, ε, noise), and so are window averaging, dilated interleaving and fusion; every view
is cut from the same z. So one step of the whole latent on the fused prediction equals the
reference's "step every view, then merge" up to float rounding — and a multistep sampler sees one
whole-latent ε per step, a history that belongs to the image rather than to a batch of views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import (dilate, gather_views, gaussian_blur, jitter_range, jitter_views, match_mean_std, pad_to_multiple,
                   scatter_add_views, undilate, view_starts)
from .draws import Corners
from .reference import DEFAULT, Policy

VAE_SCALE = 8  # pixels per latent


# ---- 1. the paper's scalars ----------------------------------------------------------------------
def phase_count(height: int, width: int, base: int) -> int:
    """S = ⌊max(H, W) / B⌋ phases (at least 1)                                          (§3.1)"""
    return max(1, int(max(height, width) / base))


def phase_sizes(height: int, width: int, base: int, phases: int | None = None) -> list[tuple[int, int]]:
    """Phase s at (H, W)·s/S rounded to multiples of 8, the last exactly (H, W)         (§3.1)

    For H = B·S the long side of phase s is B·s, as in the paper; unlike the reference (int() of
    scaled sizes, ending at B·S), every phase keeps the aspect ratio to 8 px and ends at H×W."""
    n = phases or phase_count(height, width, base)
    sizes = [(max(8, round(height * s / n / 8) * 8), max(8, round(width * s / n / 8) * 8)) for s in range(1, n)]
    return sizes + [(height, width)]


def upsample_latents(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """z_up = bicubic(z_{s−1}) at the next phase's latent size                            (§3.1)"""
    return F.interpolate(z, size=size, mode="bicubic")


def cosine_factor(t: torch.Tensor | float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """c = ½(1 + cos(π (T − t) / T)): 1 at t = T, 0 at t = 0                              (eq. 4)"""
    t = torch.as_tensor(t).cpu()
    T = num_train_timesteps
    return 0.5 * (1 + torch.cos(torch.pi * (T - t) / T))


def skip_residual(z: torch.Tensor, z_hat: torch.Tensor, c: torch.Tensor, alpha1: float) -> torch.Tensor:
    """z ← (1 − c^α1)·z + c^α1·ẑ_t   (ẑ_t: the upsampled previous phase noised to t)       (eq. 4)"""
    c1 = c**alpha1
    return z * (1 - c1) + z_hat * c1


def fuse(eps_local: torch.Tensor, eps_global: torch.Tensor, c: torch.Tensor, alpha2: float) -> torch.Tensor:
    """ε ← (1 − c^α2)·ε_local + c^α2·ε_global, a normalised weighted average             (eq. 6)

    The paper fuses stepped latents; every step is affine in ε, so fusing predictions is the same."""
    c2 = c**alpha2
    return (eps_local * (1 - c2) + eps_global * c2) / ((1 - c2) + c2)


def dilation_blur_std(c: torch.Tensor, sigma: float, alpha3: float) -> torch.Tensor:
    """σ_blur = σ·c3, c3 = 0.99·c^α3 + 0.01 (a 0-d tensor like c, never read on the host)   (§3.3)"""
    return sigma * (0.99 * c**alpha3 + 1e-2)


def blur_for_dilation(z: torch.Tensor, s: int, std, valid: tuple[slice, slice] | None = None) -> torch.Tensor:
    """Gaussian blur (kernel 2s − 1, std σ·c3), rescaled to z's own mean and std              (§3.3)

    ``valid``: the region whose statistics count (the alignment padding left out); None = all."""
    ref = z if valid is None else z[..., valid[0], valid[1]]
    return match_mean_std(gaussian_blur(z, 2 * s - 1, std), ref.mean(), ref.std(), valid)


def renormalise(z: torch.Tensor, anchor_mean: torch.Tensor, anchor_std: torch.Tensor) -> torch.Tensor:
    """Phase end: z ← (z − mean z)/std z · std_1 + mean_1 (the phase-1 statistics)"""
    return (z - z.mean()) / z.std() * anchor_std + anchor_mean


# ---- 2. the view layout of a phase ---------------------------------------------------------------
@dataclass(frozen=True)
class PathLayout:
    """One path of a phase: ``count`` views of ``shape`` latents. "whole": the latent itself
    (phase 1); "local": windows at ``starts`` (corners before jitter), jittered by up to ``margin``
    on a latent padded by it; "global": the ``dilation``² sub-latents of z padded to a multiple."""

    path: str
    count: int
    shape: tuple[int, int]
    starts: tuple = ()
    margin: int = 0
    dilation: int = 1


def view_layout(s, k: int) -> list[PathLayout]:
    """The paths of phase ``k`` (0-based) of run ``s`` (Settings): the one place views are counted."""
    h, w = s.sizes[k][0] // VAE_SCALE, s.sizes[k][1] // VAE_SCALE
    if k < s.first_upscale:
        return [PathLayout("whole", 1, (h, w))]
    paths = []
    if s.local_paths:
        win = (min(s.window, h), min(s.window, w))
        rows, cols = view_starts(h, win[0], s.stride), view_starts(w, win[1], s.stride)
        starts = tuple((a, b) for a in rows for b in cols)  # row-major, as ops.local_views; plain ints
        paths.append(PathLayout("local", len(starts), win, starts, jitter_range(s.window, s.stride)))
    if s.dilated_sampling:
        d = k + 1  # phase k+1 dilates by k+1
        paths.append(PathLayout("global", d * d, (-(-h // d), -(-w // d)), dilation=d))
    return paths


# ---- 3. cutting views and merging their predictions ----------------------------------------------
@dataclass(frozen=True)
class Views:
    """The views of one path cut from a latent z [B,C,H,W] at one step: ``model_in`` [N·B,C,h,w]
    (view-major) is what the UNet sees, ``crops`` [N·B,2] their crop coordinates in px;
    ``corners`` (local: corners in z padded by the margin, on z's device; ``corners_host`` the same
    on the host) and ``pad`` (global: rows/columns added top/left) say where they sit, for
    :meth:`merge`, :meth:`cut` and :meth:`pixels`."""

    layout: PathLayout
    model_in: torch.Tensor
    crops: torch.Tensor
    size: tuple[int, int]
    corners: torch.Tensor | None = None
    pad: tuple[int, int] = (0, 0)
    corners_host: torch.Tensor | None = None

    @property
    def path(self) -> str:
        return self.layout.path

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        """A z-shaped tensor cut into the same views (unblurred)."""
        if self.path == "local":
            J = self.layout.margin
            return gather_views(F.pad(x, (J, J, J, J)), self.corners, self.layout.shape)
        return dilate(pad_to_multiple(x, self.layout.dilation)[0], self.layout.dilation) if self.path == "global" else x

    def merge(self, eps: torch.Tensor) -> torch.Tensor:
        """The views' predictions [N·B,C,h,w] → one prediction of z's shape."""
        if self.path == "local":
            return merge_windows(eps, self.corners, self.size, self.layout.margin)
        return merge_dilated(eps, self.layout.dilation, self.pad) if self.path == "global" else eps

    def pixels(self, image: torch.Tensor, policy: Policy = DEFAULT, first: int = 0, n: int | None = None):
        """The control image of views ``first … first+n−1`` [n·B,3,8h,8w], cut from ``image`` at
        z's pixel size as the latent views are (``policy``: padding and sampling)."""
        n = self.layout.count - first if n is None else n
        if self.path == "local":
            return window_pixels(image, self.corners_host[first : first + n], self.layout.shape, self.layout.margin,
                                 policy.control_pad)
        if self.path == "global":
            return dilated_pixels(image, self.layout.dilation, self.pad, policy.control_sample, first, n)
        return image


def whole_view(z: torch.Tensor, layout: PathLayout) -> Views:
    """Phase 1: the whole latent is the only view, uncropped."""
    return Views(layout, z, torch.zeros(z.shape[0], 2, dtype=torch.long, device=z.device), tuple(z.shape[-2:]))


def window_corners(layout: PathLayout, size: tuple[int, int], u: torch.Tensor | None = None) -> torch.Tensor:
    """Local paths: the windows' corners in z (of ``size``) padded by J = margin [V,2], moved by the
    jitter that uniforms ``u`` [..., V, 2] give (→ [..., V, 2]; None: unmoved), on the host (§3.3)"""
    starts = torch.tensor(layout.starts, dtype=torch.long).reshape(-1, 2)
    return starts + layout.margin if u is None else jitter_views(starts, size, layout.shape, layout.margin, u=u)


def multidiffusion_views(z: torch.Tensor, layout: PathLayout, jitter: bool, generator=None, corners=None) -> Views:
    """Local paths: the windows of z padded by J = margin, each moved by a random jitter within J,
    conditioned on its crop (8·corner in the padded frame, as the reference)           (§3.3)

    ``corners``: this step's :class:`~.draws.Corners` (drawn ahead, already on z's device: the
    pipeline's way); None: drawn here, one ``torch.rand`` [V,2] from ``generator`` when ``jitter``,
    and copied to the device."""
    b, _, h, w = z.shape
    J, win = layout.margin, layout.shape
    if corners is None:
        u = torch.rand((layout.count, 2), generator=generator, dtype=torch.float64) if jitter and J else None
        host = window_corners(layout, (h, w), u)
        corners = Corners(host, host.to(z.device))
    views = gather_views(F.pad(z, (J, J, J, J)), corners.device, win)
    crops = (corners.device * VAE_SCALE)[:, None].expand(-1, b, 2).reshape(-1, 2)  # view-major, as the views
    return Views(layout, views, crops, (h, w), corners.device, corners_host=corners.host)


def merge_windows(eps: torch.Tensor, corners: torch.Tensor, size: tuple[int, int], J: int) -> torch.Tensor:
    """ε_local = Σ_windows ε / count over overlaps, cropped back from the padded frame (MultiDiffusion)."""
    b, c = eps.shape[0] // corners.shape[0], eps.shape[1]
    h, w = size
    total, count = scatter_add_views(eps, corners, (b, c, h + 2 * J, w + 2 * J))
    return (total / count)[:, :, J : J + h, J : J + w]


def window_pixels(image: torch.Tensor, corners: torch.Tensor, win: tuple[int, int], J: int,
                  pad_mode: str = "replicate") -> torch.Tensor:
    """Window v sees image[8·y_v : 8·(y_v + h), 8·x_v : 8·(x_v + w)] of the image padded by 8J
    like the latent (``pad_mode`` "replicate", or "constant": zeros, as PRIS-CV)."""
    p, f = J * VAE_SCALE, VAE_SCALE
    padded = F.pad(image, (p, p, p, p), mode=pad_mode) if p else image
    h, w = win[0] * f, win[1] * f
    return torch.cat([padded[:, :, y * f : y * f + h, x * f : x * f + w] for y, x in corners.tolist()])


def dilated_views(z: torch.Tensor, layout: PathLayout, blur_std=None, policy: Policy = DEFAULT) -> Views:
    """Global paths: the s² sub-latents z[:, :, i::s, j::s] of the blurred latent (z zero-padded
    top/left to a multiple of s; the blur's statistics over the region ``policy`` says)    (§3.3)
    ``blur_std`` None: no blur."""
    b, s = z.shape[0], layout.dilation
    zp, pad = pad_to_multiple(z, s)
    if blur_std is not None:
        zp = blur_for_dilation(zp, s, blur_std, policy.blur_statistics(pad))
    crops = torch.zeros(s * s * b, 2, dtype=torch.long, device=z.device)
    return Views(layout, dilate(zp, s), crops, tuple(z.shape[-2:]), None, pad)


def merge_dilated(eps: torch.Tensor, s: int, pad: tuple[int, int]) -> torch.Tensor:
    """ε_global: the sub-latents' predictions interleaved back, the padding cut off."""
    return undilate(eps, s)[:, :, pad[0] :, pad[1] :]


def dilated_pixels(image: torch.Tensor, s: int, pad: tuple[int, int], sample: str = "box", first: int = 0,
                   n: int | None = None) -> torch.Tensor:
    """Sub-latent (i, j) sees the image at 1/s: pixel p ← mean of image[8i + s·p + (0..s−1)] (an
    s×s box from its own cell on; the image padded 8·pad top/left as the latent, edge-replicated).
    ``sample="point"``: PRIS-CV's point sample image[8i::s, 8j::s] of the zero-padded image."""
    f, (ph, pw) = VAE_SCALE, pad
    H, W = image.shape[-2] + ph * f, image.shape[-1] + pw * f
    cells = [divmod(v, s) for v in range(first, s * s if n is None else first + n)]
    if sample == "point":
        cut = lambda i, j: F.pad(image, (pw * f, j * f, ph * f, i * f))[:, :, i * f :: s, j * f :: s][
            :, :, : H // s, : W // s]
        return torch.cat([cut(i, j) for i, j in cells])
    ext = F.pad(image, (pw * f, (s - 1) * f, ph * f, (s - 1) * f), mode="replicate")
    return torch.cat([F.avg_pool2d(ext[:, :, i * f : i * f + H, j * f : j * f + W], s) for i, j in cells])


# ---- 4. the multi-view denoiser ------------------------------------------------------------------
class MultiViewDenoiser:
    """D(z, i): the prediction ε for the whole latent z of phase ``k`` at step ``i`` — the views of
    every path cut from z, through the guided UNet (``model``: :class:`~.denoise.GuidedUNet`, in
    the batches ``policy`` forms), merged per path and fused. ``images``: the phase's control
    images (one per ControlNet) or None. The local windows' corners of a step are an argument,
    drawn ahead from the jitter uniforms by :meth:`place` (:class:`~.draws.PhaseDraws`)."""

    def __init__(self, model, mech, s, k: int, policy: Policy = DEFAULT, images=None):
        self.model, self.mech, self.s, self.k, self.policy, self.images = model, mech, s, k, policy, images
        self.layout = mech.view_layout(s, k)
        self.T = model.scheduler.config.get("num_train_timesteps", 1000)
        self.local = next((p for p in self.layout if p.path == "local"), None)
        # the windows move: jitter on, and a margin to move in (none: nothing drawn, as jitter_views)
        self.jitters = bool(s.view_jitter and self.local is not None and self.local.margin)

    def place(self, u: torch.Tensor | None) -> torch.Tensor:
        """Jitter uniforms [..., V, 2] (None: no jitter) → the local windows' corners, on the host."""
        size = (self.s.sizes[self.k][0] // VAE_SCALE, self.s.sizes[self.k][1] // VAE_SCALE)
        return self.mech.window_corners(self.local, size, u)

    def cut(self, z: torch.Tensor, c: torch.Tensor, corners: Corners | None = None) -> list[Views]:
        mech, s, out = self.mech, self.s, []
        for p in self.layout:
            if p.path == "local":
                out.append(mech.multidiffusion_views(z, p, corners is not None and s.view_jitter, None, corners))
            elif p.path == "global":
                std = mech.dilation_blur_std(c, s.sigma, s.cosine_scale_3) if s.blur else None
                out.append(mech.dilated_views(z, p, std, self.policy))
            else:
                out.append(whole_view(z, p))
        return out

    def __call__(self, z: torch.Tensor, i: int, corners: Corners | None = None) -> torch.Tensor:
        """ε for z at step i; ``corners``: the local windows' at this step (None: unjittered, made here)."""
        sched = self.model.scheduler
        c = self.mech.cosine_factor(sched.timesteps_cpu[i], self.T)  # a CPU scalar: not read on the host
        views = self.cut(z, c, corners)
        eps = [v.merge(e) for v, e in zip(views, self.predict(views, i))]
        if len(eps) == 1:
            return eps[0]
        return self.mech.fuse(eps[0], eps[1], c, self.s.cosine_scale_2)

    def predict(self, views: list[Views], i: int) -> list[torch.Tensor]:
        """Every path's view predictions, the paths batched together or apart and cut into chunks
        (split among the ranks) as the policy says (:meth:`~.reference.Policy.step_chunks`)."""
        out: list = [None] * len(views)
        chunk_no, steps, model = 0, len(self.model.scheduler.timesteps_cpu), self.model
        plan = self.policy.step_chunks([v.layout for v in views], model.view_batch_size, getattr(self.s, "view_ranks", 1),
                                       model.cfg, self.images is not None)
        for members, cut in plan:
            group = [views[m] for m in members]
            cat = lambda xs: torch.cat(xs) if len(xs) > 1 else xs[0]
            chunks = []
            for c in cut:
                idx = self.policy.input_sigma_index(i, chunk_no, self.k, steps, self.layout[0].path != "whole")
                chunks.append((c, idx))
                chunk_no += 1
            control = None if self.images is None else ControlCut(group, self.images, self.policy)
            eps = model(cat([v.model_in for v in group]), cat([v.crops for v in group]), i, chunks, control)
            for m, part in zip(members, eps.split([v.model_in.shape[0] for v in group])):
                out[m] = part
        return out


@dataclass(frozen=True)
class ControlCut:
    """The control images of a stack of views (several paths, in order): :meth:`rows` cuts those of
    views ``a … a+n−1`` per ControlNet, only when their chunk runs."""

    views: list
    images: list
    policy: Policy

    def rows(self, a: int, n: int) -> list[torch.Tensor]:
        out = []
        for image in self.images:
            parts, first = [], 0
            for v in self.views:
                lo, hi = max(a, first), min(a + n, first + v.layout.count)
                if lo < hi:
                    parts.append(v.pixels(image, self.policy, lo - first, hi - lo))
                first += v.layout.count
            out.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        return out


# ---- 5. the phase loops --------------------------------------------------------------------------
def first_phase(sched, D, z: torch.Tensor, steps, draws=None, on_step=None) -> torch.Tensor:
    """Phase 1: plain sampling of the whole (small) latent, z = noise · init σ given. ``draws``:
    the phase's :class:`~.draws.PhaseDraws` (stochastic samplers' noise), or None."""
    for i in steps:
        noise = None if draws is None else draws.step(i)[1]
        z = sched.step_at(D(z, i), i, z, noise=noise)
        if on_step is not None:
            on_step(i, z)
    return z


def upscale_step(sched, D, mech, s, z: torch.Tensor, z_up: torch.Tensor, eps_k: torch.Tensor, i: int,
                 corners: Corners | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One step of an upscaling phase: the skip residual, the fused prediction D(z, i), one sampler
    step. Its random inputs (window corners, noise canvas) come drawn and on the device, so a step
    draws nothing, copies nothing from the host, reads nothing back: one graph (torch.compile,
    CUDA graphs; tests/pipeline/test_determinism.py)."""
    if s.skip_residual:
        c = mech.cosine_factor(sched.timesteps_cpu[i], sched.config.get("num_train_timesteps", 1000))
        z = mech.skip_residual(z, sched.add_noise_at(z_up, eps_k, i), c, s.cosine_scale_1)
    return sched.step_at(D(z, i, corners), i, z, noise=noise)


def upscale_phase(sched, D, mech, s, z_up: torch.Tensor, eps_k: torch.Tensor, steps, draws=None,
                  on_step=None, start: int = 0) -> torch.Tensor:
    """An upscaling phase from the upsampled previous latent ``z_up`` and its noise ``eps_k``:
    ẑ at the first entry ``start`` (0: pure noise, the paper; later: SDEdit from the upsampled
    latent, ``upscale_strength``), then :func:`upscale_step` per step, its jitter and noise from
    ``draws`` (PhaseDraws)."""
    z = sched.add_noise_at(z_up, eps_k, start)  # ẑ_start
    for i in steps:
        corners, noise = (None, None) if draws is None else draws.step(i)
        z = upscale_step(sched, D, mech, s, z, z_up, eps_k, i, corners, noise)
        if on_step is not None:
            on_step(i, z)
    return z


@dataclass
class Mechanisms:
    """The swappable mechanism functions (replace any one for an ablation; ``view_layout`` is also
    what :meth:`~demofusion.DemoFusionPipeline.memory_plan` and the work line count)."""

    phase_sizes: object = phase_sizes
    upsample_latents: object = upsample_latents
    cosine_factor: object = cosine_factor
    skip_residual: object = skip_residual
    view_layout: object = view_layout
    window_corners: object = window_corners
    multidiffusion_views: object = multidiffusion_views
    dilated_views: object = dilated_views
    dilation_blur_std: object = dilation_blur_std
    fuse: object = fuse
    renormalise: object = renormalise
