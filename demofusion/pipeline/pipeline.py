"""The DemoFusion pipeline: phase 1 (plain SDXL sampling), then progressive upscaling phases
with skip residual, local (MultiDiffusion) paths and global (dilated) paths. DESIGN.md §3.

Randomness (all from ``seed``; documented so runs replay exactly):
  root = torch.Generator().manual_seed(seed); one 62-bit sub-seed per phase is drawn from it
  (``torch.randint(2**62, (S,))``), and phase k uses its own CPU generator g_k:
  * phase 1: the starting noise ε_1 ~ N(0, I) [B,4,h1,w1] (skipped if ``latents`` is given; for
    img2img instead the posterior sample of the encoded image), then per step, for stochastic
    samplers, one noise canvas [B,4,h1,w1];
  * phase k ≥ 2: the upscale noise ε_k [B,4,h_k,w_k] (skipped if ``upscale_noise`` gives it), then
    per step: the view jitter (one ``torch.rand`` [V,2] when ``view_jitter``) and, for stochastic
    samplers, one noise canvas [B,4,h_k,w_k] sliced per window / sub-latent (overlaps agree).
  Phase generators depend only on (seed, k), so a run resumed after phase k draws what the
  uninterrupted run drew.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import mechanisms as M


@dataclass
class Mechanisms:
    """The swappable mechanism functions (replace any one for an ablation)."""

    phase_sizes: Callable = M.phase_sizes
    upsample_latents: Callable = M.upsample_latents
    cosine_factor: Callable = M.cosine_factor
    skip_residual: Callable = M.skip_residual
    multidiffusion_views: Callable = M.multidiffusion_views
    dilated_views: Callable = M.dilated_views
    dilation_blur_std: Callable = M.dilation_blur_std
    fuse: Callable = M.fuse
    renormalise: Callable = M.renormalise


@dataclass
class DemoFusionOutput:
    images: list  # one PIL image per phase (None for phases skipped by ``resume_latents``)
    latents: list  # one latent tensor [B,4,h,w] per phase (scaled, as the UNet sees them)
    phase_sizes: list = field(default_factory=list)  # (h, w) px per phase
    timings: list = field(default_factory=list)  # seconds per phase (denoise + decode)
    unet_calls: list = field(default_factory=list)  # UNet forward calls per phase


def to_pil(image: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1,1] → PIL images (uint8, rounded)."""
    x = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def from_pil(image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image or tensor ([B,3,H,W] or [3,H,W] in [-1,1]) → [B,3,h,w] in [-1,1] at ``size``."""
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.LANCZOS)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        return x
    x = torch.as_tensor(image).float()
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"image must be a PIL image or a [B,3,H,W] tensor in [-1,1], got shape {tuple(x.shape)}")
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True).clamp(-1, 1)
    return x


def _steps(timesteps, phase: int, phases: int, progress: bool):
    """The timesteps, behind a tqdm bar per phase when ``progress``."""
    if not progress:
        return timesteps
    from tqdm.auto import tqdm

    return tqdm(timesteps, desc=f"phase {phase}/{phases}", unit="step", leave=True)


def _needs_noise(scheduler) -> bool:
    name = type(scheduler).__name__
    return name == "EulerAncestralDiscreteScheduler" or (name == "DDIMScheduler" and scheduler.config.get("eta", 0) > 0)


class DemoFusionPipeline:
    """DemoFusion on SDXL / SDXL-Turbo components (our UNet, VAE, text encoders, scheduler)."""

    def __init__(self, unet, vae, text, scheduler, mechanisms: Mechanisms | None = None, name: str = "custom"):
        self.unet, self.vae, self.text, self.scheduler = unet, vae, text, scheduler
        self.mechanisms = mechanisms or Mechanisms()
        self.name = name

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_preset, device="cpu", dtype=torch.float32, kind: str | None = None,
                        scheduler=None, variant: str | None = None, vae_dtype=None, seed: int = 0,
                        allow_pickle: bool = False, tokenizer_path=None):
        """From a diffusers model folder, a single-file checkpoint, or the preset ``"tiny"``.

        ``kind``: ``"sdxl-base"`` / ``"sdxl-turbo"`` for single files (their tensors cannot tell;
        default base, or turbo when the file name says so). ``scheduler``: a scheduler, a config
        dict/file, or None (the folder's ``scheduler/scheduler_config.json``, else the kind's).
        ``vae_dtype``: defaults to ``dtype`` (fp16 VAE overflow is upcast automatically).
        ``tokenizer_path``: a folder with ``tokenizer/`` and ``tokenizer_2/`` (single files carry
        none; default: the folder itself, else the CLIP vocabulary open_clip_torch ships).
        """
        from ..schedulers import SDXL_BASE_CONFIG, SDXL_TURBO_CONFIG, from_config

        if str(path_or_preset) == "tiny":
            from ..presets import tiny_components

            unet, vae, text, sched = tiny_components(seed=seed, device=device, dtype=dtype)
            return cls(unet, vae, text, scheduler if scheduler is not None and not isinstance(scheduler, (dict, str, Path))
                       else (from_config(scheduler) if scheduler is not None else sched), name="tiny")
        if str(path_or_preset) in ("sdxl-base", "sdxl-turbo"):
            raise FileNotFoundError(
                f"'{path_or_preset}' needs its weights: run `demofusion download {path_or_preset} --dir weights/` "
                f"and pass weights/{path_or_preset} (only 'tiny' is built without downloads)")
        from ..text import load_text_encoders
        from ..unet import load_unet
        from ..vae import load_vae
        from ..weights import WeightsError

        path = Path(path_or_preset).expanduser()
        if not path.exists():
            raise WeightsError(f"weights not found: {path} does not exist. Download them with "
                               "`demofusion download sdxl-base --dir weights/` (or sdxl-turbo).")
        if kind is None:
            kind = "sdxl-turbo" if "turbo" in path.name.lower() else None
        unet = load_unet(path, dtype=dtype, device=device, kind=kind, variant=variant, allow_pickle=allow_pickle)
        vae = load_vae(path, dtype=vae_dtype or dtype, device=device, variant=variant, allow_pickle=allow_pickle)
        text = load_text_encoders(path, dtype=dtype, device=device, variant=variant, allow_pickle=allow_pickle,
                                  tokenizer_path=tokenizer_path)
        if scheduler is None:
            cfg = path / "scheduler" / "scheduler_config.json"
            scheduler = cfg if cfg.is_file() else (SDXL_TURBO_CONFIG if kind == "sdxl-turbo" else SDXL_BASE_CONFIG)
        if isinstance(scheduler, (dict, str, Path)):
            scheduler = from_config(scheduler)
        return cls(unet, vae, text, scheduler, name=str(path))

    def compile(self, mode: str | None = None, backend: str = "inductor", dynamic: bool | None = None):
        """``torch.compile`` the UNet in place (the only module on the hot path); returns self.

        ``mode="reduce-overhead"`` adds CUDA graphs on a GPU, ``"max-autotune"`` tunes kernels.
        The first call of each new input shape compiles (minutes for SDXL); the views of a phase
        share one shape, so a generation compiles a few times, then runs faster. Results equal
        eager ones up to float reordering. Weights, ``state_dict`` and ``save_pretrained`` are
        unchanged.
        """
        self.unet.compile(mode=mode, backend=backend, dynamic=dynamic)
        return self

    def save_pretrained(self, folder) -> Path:
        """Write the diffusers folder layout (safetensors + config.json per component, tokenizers,
        scheduler config, model_index.json) — loadable by ``from_pretrained`` and by diffusers."""
        from safetensors.torch import save_file

        from ..vae.loading import save_vae

        folder = Path(folder)
        (folder / "unet").mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": "UNet2DConditionModel", **self.unet.config.to_diffusers()}
        (folder / "unet" / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.unet.state_dict().items()},
                  str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
        save_vae(self.vae, folder / "vae")
        self.text.save(folder)
        (folder / "scheduler").mkdir(exist_ok=True)
        sched_cfg = {"_class_name": type(self.scheduler).__name__, **self.scheduler.config}
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2))
        index = {"_class_name": "StableDiffusionXLPipeline",
                 "force_zeros_for_empty_prompt": self.text.force_zeros_for_empty_prompt}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        return folder

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def base_size(self) -> int:
        """The model's native size in pixels (UNet sample_size × 8)."""
        return self.unet.config.sample_size * 8

    # ---- one denoising step of a stack of views --------------------------------------------
    def _denoise(self, ctx, to_step, model_in, crops, t, noise, scale_index):
        """Guided UNet calls on ``model_in`` in chunks of ``view_batch_size`` views, then one
        scheduler step per chunk from ``to_step``. ``scale_index(k)``: the σ index used to scale
        chunk k's input (None: σ of t, the correct one)."""
        B = ctx["batch"]
        n = to_step.shape[0]
        chunk = ctx["view_batch_size"] * B
        out = []
        for k, a in enumerate(range(0, n, chunk)):
            x, src = model_in[a : a + chunk], to_step[a : a + chunk]
            idx = scale_index(k)
            x = self.scheduler.scale_model_input(x, t) if idx is None else self.scheduler.scale_model_input_at(x, idx)
            m = x.shape[0]
            views = m // B
            emb, pooled = ctx["embeds"].repeat(views, 1, 1), ctx["pooled"].repeat(views, 1)
            time_ids = ctx["time_ids"].repeat(m, 1)
            time_ids[:, 2:4] = crops[a : a + chunk].to(time_ids)
            if ctx["cfg"]:
                x = x.repeat_interleave(2, 0)
                emb = torch.stack([ctx["neg_embeds"].repeat(views, 1, 1), emb], 1).flatten(0, 1)
                pooled = torch.stack([ctx["neg_pooled"].repeat(views, 1), pooled], 1).flatten(0, 1)
                time_ids = time_ids.repeat_interleave(2, 0)
            eps = self.unet(x.to(self.unet.dtype), t, emb, pooled, time_ids).to(src.dtype)
            ctx["unet_calls"] += 1
            if ctx["cfg"]:
                uncond, cond = eps[0::2], eps[1::2]
                eps = uncond + ctx["guidance_scale"] * (cond - uncond)  # ε = ε_u + g·(ε_c − ε_u)
            nz = None if noise is None else noise[a : a + chunk]
            out.append(self.scheduler.step(eps, t, src, noise=nz))
        return torch.cat(out)

    # ---- the user call -----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt,
        negative_prompt=None,
        height: int = 3072,
        width: int = 3072,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        seed: int = 0,
        view_batch_size: int = 16,
        stride: int = 64,
        cosine_scale_1: float = 3.0,
        cosine_scale_2: float = 1.0,
        cosine_scale_3: float = 1.0,
        sigma: float = 0.8,
        multi_decoder: bool = True,
        image=None,
        latents: torch.Tensor | None = None,
        upscale_noise: list | None = None,
        view_jitter: bool = True,
        reference_compat: bool = False,
        *,
        prompt_2=None,
        negative_prompt_2=None,
        base_size: int | None = None,
        phases: int | None = None,
        phase_sizes: list | None = None,
        skip_residual: bool = True,
        local_paths: bool = True,
        dilated_sampling: bool = True,
        dilated_blur: bool = True,
        renormalise: bool = True,
        output_type: str = "pil",
        callback: Callable | None = None,
        on_phase_end: Callable | None = None,
        preview_dir: str | Path | None = None,
        resume_latents: list | None = None,
        offload_text_encoders: bool = True,
        progress: bool = False,
    ) -> DemoFusionOutput:
        """Generate ``height × width`` with DemoFusion. See DESIGN.md §2/§3 and docs/pipeline.md.

        Ablation switches: ``skip_residual``, ``local_paths``, ``dilated_sampling``,
        ``dilated_blur``, ``renormalise``, ``view_jitter``, ``multi_decoder``, ``phases``.
        ``callback(phase, step, t, latents)`` after every step; ``on_phase_end(phase, image,
        latents)`` and ``preview_dir`` (writes ``phase_<k>.png``) as soon as a phase ends.
        ``resume_latents``: latents of phases already finished (phase 1 first); those phases are
        skipped and the result equals an uninterrupted run's.
        ``output_type="latent"`` skips decoding (``images`` are None). ``progress``: a tqdm bar per phase.
        ``phase_sizes``: explicit (h, w) pixel size of every phase, the last (height, width); phase k
        (1-based) then dilates by k, as in the default schedule.
        """
        mech = self.mechanisms
        base = base_size or self.base_size
        window = base // 8
        for name, v in (("height", height), ("width", width)):
            if v % 8:
                raise ValueError(f"{name}={v} is not a multiple of 8; use e.g. {name}={v // 8 * 8} or {-(-v // 8) * 8}")
        if min(height, width) < base and not reference_compat:
            raise ValueError(f"height and width must be at least the base size {base} px "
                             f"(got {height}×{width}); pass base_size= for a smaller base, or a larger target")
        if not (local_paths or dilated_sampling):
            raise ValueError("local_paths and dilated_sampling are both off: at least one path must denoise")
        if view_batch_size < 1:
            raise ValueError(f"view_batch_size must be ≥ 1, got {view_batch_size}")
        if stride < 1 or stride > window:
            raise ValueError(f"stride must be in 1..{window} latents (the window, base size / 8), got {stride}; "
                             f"for a {base} px base use e.g. stride={max(window // 2, 1)}")

        opts = dict(local_paths=local_paths, dilated_sampling=dilated_sampling, dilated_blur=dilated_blur,
                    view_jitter=view_jitter, sigma=sigma, cosine_scale_2=cosine_scale_2,
                    cosine_scale_3=cosine_scale_3, reference_compat=reference_compat)
        if phase_sizes is not None:
            sizes = _check_phase_sizes(phase_sizes, height, width, phases, reference_compat)
        else:
            sizes = self._phase_sizes(height, width, base, phases, reference_compat)
        S = len(sizes)
        root = torch.Generator().manual_seed(int(seed))
        phase_gens = [torch.Generator().manual_seed(int(s)) for s in torch.randint(2**62, (S,), generator=root)]

        # -- conditioning --------------------------------------------------------------------
        cfg = guidance_scale > 1.0
        dev, dt = self.device, self.unet.dtype
        offload = offload_text_encoders and dev.type != "cpu"
        if offload:  # encoders live on the CPU between calls; encode on the accelerator
            self.text.to(dev)
        embeds, neg_embeds, pooled, neg_pooled = self.text.encode_with_negative(
            prompt, negative_prompt, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, guidance=cfg)
        if offload:
            self.text.to("cpu")
        B = embeds.shape[0]
        ctx = dict(batch=B, cfg=cfg, guidance_scale=guidance_scale, view_batch_size=view_batch_size, unet_calls=0,
                   embeds=embeds.to(dev, dt), pooled=pooled.to(dev, dt),
                   neg_embeds=None if neg_embeds is None else neg_embeds.to(dev, dt),
                   neg_pooled=None if neg_pooled is None else neg_pooled.to(dev, dt),
                   # time_ids = (orig h, orig w, crop top, crop left, target h, target w): the final size
                   time_ids=torch.tensor([[height, width, 0, 0, height, width]], dtype=dt, device=dev))

        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device=dev)
        timesteps = sched.timesteps
        T = sched.config.get("num_train_timesteps", 1000)
        stochastic = _needs_noise(sched)
        sf = self.vae.scaling_factor
        if preview_dir is not None:
            Path(preview_dir).mkdir(parents=True, exist_ok=True)

        out = DemoFusionOutput(images=[], latents=[], phase_sizes=sizes)
        done = list(resume_latents or [])
        if len(done) > S:
            raise ValueError(f"resume_latents has {len(done)} phases but this run has only {S}")

        def finish(k, z, t0):
            out.latents.append(z)
            img = None
            if output_type != "latent":
                img = to_pil(self._decode(z / sf, k, multi_decoder, reference_compat, window))
                if preview_dir is not None:
                    img[0].save(Path(preview_dir) / f"phase_{k + 1}.png")
            out.images.append(img[0] if img and len(img) == 1 else img)
            out.timings.append(time.perf_counter() - t0)
            out.unet_calls.append(ctx["unet_calls"])
            ctx["unet_calls"] = 0
            if on_phase_end is not None:
                on_phase_end(k + 1, out.images[-1], z)

        def skipped(z):
            out.latents.append(z), out.images.append(None), out.timings.append(0.0), out.unet_calls.append(0)

        # -- phase 1 -------------------------------------------------------------------------
        t0 = time.perf_counter()
        g = phase_gens[0]
        h1, w1 = sizes[0][0] // 8, sizes[0][1] // 8
        if image is not None:  # img2img: the encoded image replaces phase 1, upscaling starts at phase 1
            x = from_pil(image, sizes[0]).to(dev)
            z = self._encode(x).sample(generator=g).to(dev) * sf
            first_upscale = 0
        elif done:  # resuming: phase 1 is finished
            z = done[0].to(dev, torch.float32)
            first_upscale = 1
        else:
            if latents is None:
                latents = torch.randn((B, 4, h1, w1), generator=g)
            if tuple(latents.shape[-2:]) != (h1, w1):
                raise ValueError(f"latents must be [B,4,{h1},{w1}] for phase 1 ({sizes[0][0]}×{sizes[0][1]} px), "
                                 f"got {tuple(latents.shape)}")
            z = latents.to(dev, torch.float32) * sched.init_noise_sigma
            for i, t in enumerate(_steps(timesteps, 1, S, progress)):
                nz = torch.randn(z.shape, generator=g).to(dev) if stochastic else None
                full = torch.tensor([[0, 0]], dtype=torch.long).repeat(B, 1)
                z = self._denoise(ctx, z, z, full, t, nz, lambda k: None)
                if callback is not None:
                    callback(1, i, t, z)
            first_upscale = 1
        anchor_mean, anchor_std = z.mean(), z.std()  # statistics every later phase is renormalised to
        if first_upscale == 1:
            if done:
                skipped(z)
            else:
                finish(0, z, t0)

        # -- upscaling phases ---------------------------------------------------------------------
        N = len(timesteps)
        for k in range(first_upscale, S):
            if k < len(done):
                z = done[k].to(dev, torch.float32)
                skipped(z)
                continue
            t0 = time.perf_counter()
            g = phase_gens[k]
            s = k + 1  # the phase's scale: dilation factor and number of sub-latent rows/cols
            hk, wk = sizes[k][0] // 8, sizes[k][1] // 8
            z_up = mech.upsample_latents(z, (hk, wk))
            eps = upscale_noise[k - first_upscale] if upscale_noise is not None else torch.randn(z_up.shape, generator=g)
            eps = eps.to(dev, z_up.dtype)
            z = sched.add_noise(z_up, eps, timesteps[0])  # ẑ_0
            stale = k > 0 or first_upscale == 1  # the reference's scheduler index is left at N by phase 1
            for i, t in enumerate(_steps(timesteps, k + 1, S, progress)):
                c = mech.cosine_factor(t, T)
                if skip_residual:
                    z = mech.skip_residual(z, sched.add_noise(z_up, eps, t), c, cosine_scale_1)
                if reference_compat:
                    # the reference's stale σ: chunk 0 of step 0 sees the previous phase's last σ
                    # (index N, i.e. 0), every later chunk of a step the next step's σ (DESIGN §3.1)
                    scale_index = lambda kk, i=i: (N if (i == 0 and stale) else i) if kk == 0 else i + 1
                else:
                    scale_index = lambda kk: None
                z = self._upscale_step(ctx, z, t, c, s, window, stride, g if view_jitter else None,
                                       g if stochastic else None, opts, scale_index)
                if callback is not None:
                    callback(k + 1, i, t, z)
            if renormalise:
                z = mech.renormalise(z, anchor_mean, anchor_std)
            finish(k, z, t0)
        return out

    def _upscale_step(self, ctx, z, t, c, s, window, stride, jitter_g, noise_g, opts, scale_index):
        """One step of an upscaling phase: local and global paths from the same z, fused."""
        mech = self.mechanisms
        paths = []
        if opts["local_paths"]:
            paths.append(mech.multidiffusion_views(z, window, stride, opts["view_jitter"], jitter_g))
        if opts["dilated_sampling"]:
            std = mech.dilation_blur_std(c, opts["sigma"], opts["cosine_scale_3"]) if opts["dilated_blur"] else None
            paths.append(mech.dilated_views(z, s, std, exact_stats=not opts["reference_compat"]))
        noise = torch.randn(z.shape, generator=noise_g).to(z.device) if noise_g is not None else None
        stepped = self._denoise_paths(ctx, paths, noise, t, opts["reference_compat"], scale_index)
        merged = [v.merge(x) for v, x in zip(paths, stepped)]
        if len(merged) == 1:
            return merged[0]
        return mech.fuse(merged[0], merged[1], c, opts["cosine_scale_2"])

    def _denoise_paths(self, ctx, paths, noise, t, compat, scale_index):
        """Denoise every path's views: all in shared UNet batches when their shapes agree
        (default), or path after path as the reference batches them (``compat``)."""
        noises = [None if noise is None else v.take(noise) for v in paths]
        if not compat and all(v.to_step.shape[1:] == paths[0].to_step.shape[1:] for v in paths):
            cat = lambda xs: torch.cat(xs) if len(xs) > 1 else xs[0]
            stepped = self._denoise(ctx, cat([v.to_step for v in paths]), cat([v.model_in for v in paths]),
                                    cat([v.crops for v in paths]), t, None if noise is None else cat(noises),
                                    scale_index)
            return stepped.split([v.to_step.shape[0] for v in paths])
        out, first_chunk = [], 0
        chunk = ctx["view_batch_size"] * ctx["batch"]
        for v, nz in zip(paths, noises):
            out.append(self._denoise(ctx, v.to_step, v.model_in, v.crops, t, nz,
                                     lambda k, f=first_chunk: scale_index(f + k)))
            first_chunk += -(-v.to_step.shape[0] // chunk)
        return out

    # ---- helpers -------------------------------------------------------------------------------
    def _phase_sizes(self, height, width, base, phases, compat):
        if compat:
            # the reference: phase 1 at (H//S, W//S), phase s at B·s on the long side, the short
            # side int()-scaled by the aspect ratio
            S = phases or M.phase_count(height, width, base)
            ar = min(height, width) / max(height, width)
            sizes = [(height // S, width // S)]
            for s in range(2, S + 1):
                ch = cw = base * s
                if height > width:
                    cw = int(cw * ar)
                else:
                    ch = int(ch * ar)
                sizes.append((ch // 8 * 8, cw // 8 * 8))
            return sizes
        return self.mechanisms.phase_sizes(height, width, base, phases)

    def _encode(self, x):
        from ..vae import encode_tiled

        tile = self.vae.config.sample_size
        if max(x.shape[-2:]) > tile:
            return encode_tiled(self.vae, x.to(self.vae.dtype))
        return self.vae.encode(x.to(self.vae.dtype))

    def _decode(self, z, phase_index, multi_decoder, compat, window):
        from ..vae import decode_tiled, decode_tiled_reference

        if compat:
            if multi_decoder and phase_index > 0:
                return decode_tiled_reference(self.vae, z, sample_size=window)
            return self.vae.decode(z)
        if multi_decoder and max(z.shape[-2:]) * 8 > self.vae.config.sample_size:
            return decode_tiled(self.vae, z)
        return self.vae.decode(z)


def _check_phase_sizes(phase_sizes, height, width, phases, reference_compat) -> list[tuple[int, int]]:
    """Explicit phase sizes, validated: multiples of 8, growing, ending at (height, width)."""
    if reference_compat:
        raise ValueError("phase_sizes= cannot be combined with reference_compat=True (the reference fixes its sizes)")
    sizes = [(int(h), int(w)) for h, w in phase_sizes]
    if phases is not None and phases != len(sizes):
        raise ValueError(f"phases={phases} but phase_sizes has {len(sizes)} entries; give one of them")
    if not sizes or sizes[-1] != (height, width):
        raise ValueError(f"phase_sizes must end with the target (height, width) = ({height}, {width}), got {sizes}")
    for k, (h, w) in enumerate(sizes, start=1):
        if h % 8 or w % 8 or h < 8 or w < 8:
            raise ValueError(f"phase_sizes[{k - 1}] = ({h}, {w}): each side must be a positive multiple of 8")
        if k > 1 and (h < sizes[k - 2][0] or w < sizes[k - 2][1]):
            raise ValueError(f"phase_sizes must not shrink: phase {k} ({h}, {w}) < phase {k - 1} {sizes[k - 2]}")
    return sizes
