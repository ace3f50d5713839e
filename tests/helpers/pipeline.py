"""Small DemoFusion pipelines for tests, and a plain loop transcription of docs/algorithm.md."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

import demofusion as df
from demofusion.presets import random_init_, tiny_components
from demofusion.schedulers import SDXL_BASE_CONFIG, SDXL_TURBO_CONFIG, from_config
from demofusion.unet import UNet, UNetConfig


def small_pipeline(kind: str = "sdxl", sample_size: int = 16, seed: int = 0) -> df.DemoFusionPipeline:
    """Tiny components with a ``sample_size``-latent UNet (base = 8·sample_size px).
    ``kind``: "sdxl" (Euler, base config) or "turbo" (Euler-ancestral, trailing)."""
    _, vae, text, _ = tiny_components(seed=seed)
    cfg = dataclasses.replace(UNetConfig.preset("tiny"), sample_size=sample_size)
    unet = random_init_(UNet(cfg), seed).eval().requires_grad_(False)
    sched = from_config(SDXL_TURBO_CONFIG if kind == "turbo" else SDXL_BASE_CONFIG)
    return df.DemoFusionPipeline(unet, vae, text, sched)


def record_steps(pipe, **kw):
    """Run the pipeline and return (output, {(phase, step): latents})."""
    steps = {}
    out = pipe(callback=lambda phase, i, t, z: steps.__setitem__((phase, i), z.clone()), **kw)
    return out, steps


# ---- docs/algorithm.md written as plain loops (slicing, one UNet call and one step per view) ---------
def _guided_eps(pipe, x, t, cond, crop, guidance, control=None, image=None, i=0, steps=1):
    """ε for one view: unconditional and conditional UNet calls, combined by CFG. ``control``:
    dict(nets, scales, starts, ends, guess) and ``image``: this view's control image per net."""
    (embeds, pooled), (neg_embeds, neg_pooled), (H, W) = cond
    tid = torch.tensor([[H, W, crop[0], crop[1], H, W]], dtype=torch.float32)

    def unet(emb, pool, uncond):
        res = {}
        if control is not None and not (uncond and control["guess"]):
            for n, net in enumerate(control["nets"]):
                inside = control["starts"][n] <= i / steps and (i + 1) / steps <= control["ends"][n]
                if not inside:
                    continue
                d, m = net(x, t, emb, pool, tid, image[n], control["scales"][n], control["guess"])
                if not res:
                    res = {"down_block_additional_residuals": d, "mid_block_additional_residual": m}
                else:
                    res["down_block_additional_residuals"] = [a + b for a, b in
                                                              zip(res["down_block_additional_residuals"], d)]
                    res["mid_block_additional_residual"] = res["mid_block_additional_residual"] + m
        return pipe.unet(x, t, emb, pool, tid, **res)

    eps_c = unet(embeds, pooled, False)
    if guidance <= 1:
        return eps_c
    eps_u = unet(neg_embeds, neg_pooled, True)
    return eps_u + guidance * (eps_c - eps_u)


def control_phase_image(image, size):
    """The control image at a phase's pixel size: the original, bicubic with antialias, in [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bicubic", antialias=True).clamp(0, 1)


def control_dilated(image, s, a, b, ph, pw):
    """Sub-latent (a, b)'s control image: the image, edge-padded 8·(ph, pw) top/left like the
    latent, read from pixel (8a, 8b) onwards and averaged over s×s boxes."""
    Hp, Wp = image.shape[-2] + 8 * ph, image.shape[-1] + 8 * pw
    ext = F.pad(image, (8 * pw, 8 * s, 8 * ph, 8 * s), mode="replicate")
    part = ext[:, :, 8 * a : 8 * a + Hp, 8 * b : 8 * b + Wp]
    B, C = part.shape[:2]
    return part.reshape(B, C, Hp // s, s, Wp // s, s).mean(dim=(3, 5))


def _starts(length, window, stride):
    if length <= window:
        return [0]
    n = int((length - window) / stride - 1e-6) + 2
    out = []
    for k in range(n):
        a = k * stride
        if a + window > length:
            a = length - window
        out.append(a)
    return out


def _blur2d(x, size, std):
    c = x.shape[1]
    coords = torch.arange(size, dtype=torch.float32)
    g = torch.exp(-((coords - (size - 1) / 2) ** 2) / (2 * std**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, k, padding=size // 2, groups=c)


def transcription(pipe, prompt, height, width, steps, guidance, seed, stride, a1=3.0, a2=1.0, a3=1.0, sigma=0.8,
                  control=None, scheduler=None, whole_latent=False):
    """Per-step latents {(phase, step): z} of docs/algorithm.md with jitter off, drawing noise in the
    pipeline's documented order (phase generators from the seed; ε_k; one canvas noise per step
    for stochastic samplers). ``control``: dict(nets, images, scales, starts, ends, guess): the
    ControlNet default mode of docs/components.md (each phase's image from the original; crops
    per window, edge-padded; s×s box averages per dilated sub-latent).

    ``whole_latent``: instead of the paper's order (every view stepped, the stepped views merged
    and fused), the views' *predictions* are merged and fused and ``scheduler`` (default the
    pipeline's; e.g. a diffusers scheduler, deterministic) steps the whole latent once per step,
    its ``set_timesteps`` restarting it every phase."""
    sched = scheduler or pipe.scheduler
    diffusers = scheduler is not None and not hasattr(scheduler, "step_at")

    def step(eps, t, z, noise=None):
        if diffusers:  # a diffusers scheduler: its own step counter, a SchedulerOutput
            return sched.step(eps, t, z, return_dict=False)[0]
        return sched.step(eps, t, z, noise=noise)
    base = pipe.unet.config.sample_size * 8
    win = base // 8
    S = max(1, int(max(height, width) / base))
    sizes = [(round(height * s / S / 8) * 8, round(width * s / S / 8) * 8) for s in range(1, S)] + [(height, width)]
    root = torch.Generator().manual_seed(seed)
    gens = [torch.Generator().manual_seed(int(v)) for v in torch.randint(2**62, (S,), generator=root)]
    e, pooled = pipe.text.encode(prompt)
    cond = ((e, pooled), (torch.zeros_like(e), torch.zeros_like(pooled)), (height, width))
    sched.set_timesteps(steps)
    ts = sched.timesteps
    ancestral = type(sched).__name__ == "EulerAncestralDiscreteScheduler"
    rec = {}

    g = gens[0]
    z = torch.randn((1, 4, sizes[0][0] // 8, sizes[0][1] // 8), generator=g) * sched.init_noise_sigma
    ctl = dict(control=control, steps=steps)
    if control is not None:
        images = [control_phase_image(im, sizes[0]) for im in control["images"]]
    for i, t in enumerate(ts):
        noise = torch.randn(z.shape, generator=g) if ancestral else None
        eps = _guided_eps(pipe, sched.scale_model_input(z, t), t, cond, (0, 0), guidance, i=i,
                          image=images if control else None, **ctl)
        z = step(eps, t, z, noise=noise)
        rec[(1, i)] = z.clone()
    mean1, std1 = z.mean(), z.std()

    for k in range(1, S):
        s, g = k + 1, gens[k]
        h, w = sizes[k][0] // 8, sizes[k][1] // 8
        z_up = F.interpolate(z, size=(h, w), mode="bicubic")
        eps_noise = torch.randn(z_up.shape, generator=g)
        sched.set_timesteps(steps)  # every phase restarts the sampler (its history, diffusers' step counter)
        z = sched.add_noise(z_up, eps_noise, ts[:1])
        if control is not None:
            images = [control_phase_image(im, sizes[k]) for im in control["images"]]
        for i, t in enumerate(ts):
            c = 0.5 * (1 + math.cos(math.pi * (1000 - float(t)) / 1000))
            z = (1 - c**a1) * z + c**a1 * sched.add_noise(z_up, eps_noise, ts[i : i + 1])
            noise = torch.randn(z.shape, generator=g) if ancestral else torch.zeros_like(z)
            # local paths
            J = (win - stride) // 4
            zp, npad = F.pad(z, (J, J, J, J)), F.pad(noise, (J, J, J, J))
            value, count = torch.zeros_like(zp), torch.zeros_like(zp)
            wh, ww = min(win, h), min(win, w)
            for a in _starts(h, wh, stride):
                for b in _starts(w, ww, stride):
                    a0, b0 = a + J, b + J
                    v = zp[:, :, a0 : a0 + wh, b0 : b0 + ww]
                    crop = None if control is None else [
                        F.pad(im, (8 * J,) * 4, mode="replicate")[:, :, 8 * a0 : 8 * (a0 + wh), 8 * b0 : 8 * (b0 + ww)]
                        for im in images]
                    eps = _guided_eps(pipe, sched.scale_model_input(v, t), t, cond, (a0 * 8, b0 * 8), guidance, i=i,
                                      image=crop, **ctl)
                    nz = npad[:, :, a0 : a0 + wh, b0 : b0 + ww] if ancestral else None
                    value[:, :, a0 : a0 + wh, b0 : b0 + ww] += eps if whole_latent else step(eps, t, v, noise=nz)
                    count[:, :, a0 : a0 + wh, b0 : b0 + ww] += 1
            z_local = (value / count)[:, :, J : J + h, J : J + w]  # whole_latent: ε_local
            # global paths (dilated sampling)
            ph, pw = (-h) % s, (-w) % s
            zg, ng = F.pad(z, (pw, 0, ph, 0)), F.pad(noise, (pw, 0, ph, 0))
            valid = zg[:, :, ph:, pw:]
            blurred = _blur2d(zg, 2 * s - 1, sigma * (0.99 * c**a3 + 0.01))
            bv = blurred[:, :, ph:, pw:]
            blurred = (blurred - bv.mean()) / bv.std() * valid.std() + valid.mean()
            out = torch.zeros_like(zg)
            for a in range(s):
                for b in range(s):
                    sub = None if control is None else [control_dilated(im, s, a, b, ph, pw) for im in images]
                    eps = _guided_eps(pipe, sched.scale_model_input(blurred[:, :, a::s, b::s], t), t, cond, (0, 0),
                                      guidance, i=i, image=sub, **ctl)
                    nz = ng[:, :, a::s, b::s] if ancestral else None
                    out[:, :, a::s, b::s] = eps if whole_latent else step(eps, t, zg[:, :, a::s, b::s], noise=nz)
            z_global = out[:, :, ph:, pw:]  # whole_latent: ε_global
            fused = (1 - c**a2) * z_local + c**a2 * z_global
            z = step(fused, t, z, noise=noise if ancestral else None) if whole_latent else fused
            rec[(s, i)] = z.clone()
        z = (z - z.mean()) / z.std() * std1 + mean1
    return rec
