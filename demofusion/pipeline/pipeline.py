"""The DemoFusion pipeline: construction, placement, prompt encoding, decoding and the call; the
algorithm itself (phase loops, the multi-view denoiser) is demofusion/pipeline/algorithm.py.

Randomness (all from ``seed``; documented so runs replay exactly):
  root = torch.Generator().manual_seed(seed); one 62-bit sub-seed per phase is drawn from it
  (``torch.randint(2**62, (S,))``), and phase k uses its own CPU generator g_k:
  * phase 1: the starting noise ε_1 ~ N(0, I) [B,4,h1,w1] (skipped if ``latents`` is given; for
    img2img instead the posterior sample of the encoded image), then per step, for stochastic
    samplers, one noise canvas [B,4,h1,w1];
  * phase k ≥ 2: the upscale noise ε_k [B,4,h_k,w_k] (skipped if ``upscale_noise`` gives it), then
    per step: the view jitter (one ``torch.rand`` [V,2] when ``view_jitter``) and, for stochastic
    samplers, one noise canvas [B,4,h_k,w_k] for the whole latent's step.
  Phase generators depend only on (seed, k), so a run resumed after phase k draws what the
  uninterrupted run drew. Every draw is made on the host (same numbers on every device) before
  the step that uses it, and reaches the device without a blocking copy (pipeline/draws.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import parallel
from ..config import DemoFusionConfig
from ..controlnet.guide import Guide, check_fits
from ..devices import resolve_device
from ..lora import LoraStack
from ..memory.plan import MemoryPlan, plan_run
from ..placement import Placement
from ..schedulers import by_name, sampler_key
from . import algorithm as A
from .algorithm import Mechanisms, MultiViewDenoiser
from .decoding import encode_image, from_pil, phase_output, to_pil  # noqa: F401 (from_pil, to_pil re-exported)
from .denoise import Conditioning, GuidedUNet, needs_noise, phase_generators, steps_of
from .draws import PhaseDraws, upload
from .guards import FiniteWatch, likely_cause
from .loading import pretrained, save_components
from .reference import policy_for
from .settings import Settings, validate
from .steps import first_entry, run_scheduler

@dataclass
class DemoFusionOutput:
    images: list  # per phase: a PIL image (a list for B > 1), a [B,3,H,W] tensor in [0, 1] ("pt"), or None
    latents: list  # one latent tensor [B,4,h,w] per phase (scaled, as the UNet sees them)
    phase_sizes: list = field(default_factory=list)  # (h, w) px per phase
    timings: list = field(default_factory=list)  # seconds per phase (denoise + decode)
    unet_calls: list = field(default_factory=list)  # UNet forward calls per phase


class DemoFusionPipeline:
    """DemoFusion on SDXL / SDXL-Turbo components (our UNet, VAE, text encoders, scheduler)."""

    def __init__(self, unet, vae, text, scheduler, mechanisms: Mechanisms | None = None, name: str = "custom",
                 device=None, controlnet=None):
        """``device``: where the work runs (default: where the UNet is); the components may wait
        elsewhere (e.g. in CPU memory): each run brings them as its offload policy says.
        ``controlnet``: a ControlNet or a list of them (docs/api.md, ControlNets), checked to fit the UNet."""
        self.unet, self.vae, self.text, self.scheduler = unet, vae, text, scheduler
        nets = controlnet if isinstance(controlnet, (list, tuple)) else [] if controlnet is None else [controlnet]
        for k, net in enumerate(nets):
            check_fits(net, unet, "controlnet" if len(nets) == 1 else f"controlnet[{k}]")
        self.controlnets = list(nets)
        self.loras = LoraStack()  # LoRAs fused into the UNet and text encoders (load_lora)
        self.mechanisms = mechanisms or Mechanisms()
        self.name = name
        self.placement = Placement(unet.device if device is None else resolve_device(device),
                                   {"text": [text.text_encoder, text.text_encoder_2], "unet": [unet, *nets], "vae": [vae]})
        self.max_memory = self.offload = None  # defaults of every call (from_pretrained sets them)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_preset, device="auto", dtype=None, kind: str | None = None,
                        scheduler=None, variant: str | None = None, vae_dtype=None, seed: int = 0,
                        allow_pickle: bool = False, tokenizer_path=None, max_memory=None, offload: str | None = None,
                        fp8: bool = False, controlnet=None, vae=None, lora=None):
        """From a diffusers model folder, a single-file checkpoint, or the preset ``"tiny"``.

        ``device="auto"``: CUDA, then MPS, else the CPU; ``dtype=None``: fp16 on CUDA/MPS, fp32 on the CPU.

        ``kind``: ``"sdxl-base"`` / ``"sdxl-turbo"`` for single files (their tensors cannot tell;
        default base, or turbo when the file name says so). ``scheduler``: a scheduler, a config
        dict/file, a sampler name ("ddim", "euler", "euler-a": the model's schedule, another sampler;
        see :meth:`set_scheduler`) or None (the folder's ``scheduler/scheduler_config.json``, else
        the kind's). ``vae``: another VAE (a diffusers VAE folder or one safetensors file, diffusers
        or LDM names), e.g. madebyollin/sdxl-vae-fp16-fix. ``lora``: LoRA files to fuse, as
        ``[(path, scale), …]`` (before fp8; see :meth:`load_lora`).
        ``vae_dtype``: defaults to ``dtype`` (fp16 VAE overflow is upcast automatically).
        ``tokenizer_path``: a folder with ``tokenizer/`` and ``tokenizer_2/`` (single files carry
        none; default: the folder itself, else the CLIP vocabulary open_clip_torch ships).
        ``max_memory`` / ``offload``: the defaults of every call (see ``__call__``); with either,
        or with ``fp8``, the weights are loaded into CPU memory and each run brings them to
        ``device`` as its plan says. ``fp8``: store the UNet's weights as float8_e4m3fn (half the
        bytes; docs/benchmarks.md, fp8, for the error it costs). ``controlnet``: a ControlNet folder or file, a
        loaded module, ``"tiny"`` (random, fits the tiny preset), or a list of those, loaded in ``dtype``.
        """
        args = {k: v for k, v in locals().items() if k != "cls"}
        return pretrained(cls, **args)

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Fuse a LoRA (kohya/A1111 or diffusers/PEFT ``.safetensors``) into the UNet and both text
        encoders at ``scale`` (no per-step cost); several stack. Returns its name (docs/components.md, LoRAs)."""
        return self.loras.load(self._lora_targets(), path, scale, name)

    def unload_lora(self, name: str | None = None) -> None:
        """Take LoRA ``name`` out (None: all): the other LoRAs stay, the original weights come back
        bit for bit."""
        self.loras.unload(self._lora_targets(), name)

    def _lora_targets(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text.text_encoder, "text_encoder_2": self.text.text_encoder_2}

    def set_scheduler(self, name: str, timestep_spacing: str | None = None, sigmas: str | None = None):
        """Sample with ``name`` (ddim, euler, euler-a, heun, dpm++2m, dpm++2m-sde, dpm++3m-sde, unipc,
        lcm, tcd, or an A1111/ComfyUI spelling such as "DPM++ 2M Karras") on the model's own schedule:
        every option from the model's scheduler config (kept whole across switches), its timestep
        spacing unless ``timestep_spacing`` is given ("leading", "trailing", "linspace"), its σ unless
        ``sigmas`` is "karras" or "exponential" (docs/components.md, Samplers); returns self."""
        self.scheduler = by_name(name, self.scheduler, timestep_spacing, sigmas)
        return self

    def compile(self, mode: str | None = None, backend: str = "inductor", dynamic: bool | None = None,
                fuse_qkv: bool | None = None):
        """``torch.compile`` the UNet in place (the only module on the hot path); returns self.
        ``mode="reduce-overhead"`` adds CUDA graphs on a GPU, ``"max-autotune"`` tunes kernels.
        The first call of each new input shape compiles (minutes for SDXL); the views of a phase
        share one shape, so a generation compiles a few times, then runs faster. Results equal
        eager ones up to float reordering; ``state_dict`` and ``save_pretrained`` are unchanged.
        On CUDA (or ``fuse_qkv=True``) self-attention's q/k/v are one GEMM (``UNet.fuse_qkv``), and the
        UNet goes to ``channels_last`` on CUDA (no layout transposes); elsewhere eager's bits are kept."""
        if self.device.type == "cuda" if fuse_qkv is None else fuse_qkv:
            self.unet.fuse_qkv()
        if self.device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
        self.unet.compile(mode=mode, backend=backend, dynamic=dynamic)
        return self

    def save_pretrained(self, folder):
        """Write the diffusers folder layout — loadable by ``from_pretrained`` and by diffusers."""
        return save_components(self, folder)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    def to(self, device):
        """Work on ``device`` from now on, every component moved there; returns self."""
        self.placement.move_all(device)
        return self

    @property
    def base_size(self) -> int:
        """The model's native size in pixels (UNet sample_size × 8)."""
        return self.unet.config.sample_size * 8

    def validate(self, prompt, **kwargs) -> Settings:
        """Check the arguments of a call (same names as ``__call__``) without running it: the
        normalised :class:`Settings`, or an :class:`~demofusion.errors.InputError` naming the
        argument and the fix."""
        T = self.scheduler.config.get("num_train_timesteps", 1000)
        for k in ("max_memory", "offload"):  # the pipeline's defaults (from_pretrained) unless given
            kwargs[k] = getattr(self, k) if kwargs.get(k) is None else kwargs[k]
        s = validate(self.base_size, 8, self.mechanisms, prompt=prompt, num_train_timesteps=T,
                     controlnets=len(self.controlnets), pipeline_sampler=sampler_key(self.scheduler), **kwargs)
        run_scheduler(self.scheduler, s)  # a sampler the call names is built (and refused) now
        return s

    def memory_plan(self, height: int = 3072, width: int = 3072, max_memory=None, prompt="", **kwargs) -> MemoryPlan:
        """The memory plan of a call with these arguments: offload policy, view batch, VAE tiles, and
        the estimated peak of every stage (``.stages``, ``.phase_peaks()``) and of the run
        (``.peak_bytes``, reserve included); measured on fake CUDA copies of our modules, nothing
        is allocated. An impossible ``max_memory`` raises the call's one-line error."""
        return plan_run(self, self.validate(prompt, height=height, width=width, max_memory=max_memory, **kwargs))

    @torch.no_grad()
    def decode(self, latents, phase: int, prompt="", **kwargs):
        """Phase ``phase``'s (1-based) picture from its latents (``on_phase_end``'s), decoded exactly as
        the call with these arguments decodes it (a resume whose phase has latents but no picture)."""
        s = self.validate(prompt, **kwargs)
        plan = plan_run(self, s, estimate_stages=False)
        try:
            return self._image(s, plan, phase - 1, latents.to(self.device, torch.float32))
        finally:
            self.placement.finish(plan.offload)

    # ---- the user call -----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt,
        negative_prompt=None,
        height: int = 3072,
        width: int = 3072,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        *,
        preset: str | None = None,
        sampler: str | None = None,
        config: DemoFusionConfig | None = None,
        image=None,
        latents: torch.Tensor | None = None,
        upscale_noise: list | None = None,
        reference_compat: bool = False,
        prompt_2=None,
        negative_prompt_2=None,
        output_type: str = "pil",
        callback: Callable | None = None,
        on_phase_end: Callable | None = None,
        preview_dir=None,
        resume_latents: list | None = None,
        offload_text_encoders: bool = True,
        progress: bool = False,
        force: bool = False,
        distributed: bool = True,
        view_ranks: int | None = None,
        max_memory=None,
        offload: str | None = None,
        control_image=None,
        controlnet_conditioning_scale=1.0,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
        guess_mode: bool = False,
        truncate_prompts: bool = False,
        **knobs,
    ) -> DemoFusionOutput:
        """Generate ``height × width`` with DemoFusion. See docs/api.md and docs/algorithm.md.

        Every argument is checked first (:meth:`validate`); a bad one raises a one-line
        :class:`~demofusion.errors.InputError`, and NaN/Inf appearing during the run a
        :class:`~demofusion.errors.NonFiniteError` naming the phase and step.
        DemoFusion's knobs: ``config`` (a :class:`~demofusion.DemoFusionConfig`, default its
        defaults), and each of its fields as a keyword overriding it (``stride=32``, ``sigma=0.6``,
        ``skip_residual=False`` …): their defaults, ranges and meaning are the config's fields
        (docs/api.md). ``guidance_scale`` ≤ 1: no classifier-free guidance.
        ``callback(phase, step, t, latents)`` after every step; ``on_phase_end(phase, image,
        latents)`` and ``preview_dir`` (writes ``phase_<k>.png``) as soon as a phase ends.
        ``resume_latents``: latents of phases already finished (phase 1 first); those phases are
        skipped and the result equals an uninterrupted run's.
        ``output_type``: ``"pil"``, ``"pt"`` ([B,3,H,W] tensors in [0, 1]) or ``"latent"`` (no
        decoding; ``images`` are None). ``progress``: a tqdm bar per phase.
        ``phase_sizes``: phase k (1-based) dilates by k, as in the default schedule. ``force``:
        allow sizes beyond 16384 px and phase 1 under half the base size.
        ``max_memory`` (bytes, "8GB", "8GiB", "auto"): plan placement, view batch and VAE tiles so
        every stage's estimated peak fits (:meth:`memory_plan`; docs/big-images.md); ``offload``:
        "none", "model" or "sequential" (default "none", or the budget's pick). ``view_batch_size``:
        a given value is kept under a budget.
        ``distributed``: inside an initialised process group of several ranks, the views of each
        step are shared among them, with the same result on every rank (docs/big-images.md).
        ``view_ranks``: split each step's views for this many ranks (default: the process group's
        size, 1 alone); one process with ``view_ranks=N`` computes what N ranks do, bit for bit.
        ControlNets (``controlnet=`` of the constructor): ``control_image`` (one per ControlNet, RGB in
        [0, 1] or a PIL image, any size: resized to each phase), ``controlnet_conditioning_scale``,
        ``control_guidance_start/end`` (fractions of the steps) and ``guess_mode``, as diffusers'
        SDXL ControlNet pipeline names them, in every phase (docs/api.md, ControlNets).
        Prompts: longer than 75 tokens in 75-token chunks, A1111 weights ``(word:1.3)`` as compel
        computes them (docs/components.md); ``truncate_prompts``: cut at 77 tokens, no weights (diffusers).
        ``num_inference_steps`` / ``guidance_scale`` None: the preset's, else 50 / 7.5.
        ``preset``: a run preset (``fast``, ``lightning-4step``, ``lcm``, … docs/components.md) setting
        the sampler, spacing, steps, guidance and knobs this call does not give. ``sampler``: this
        call's sampler by name ("dpm++2m", "DPM++ 2M Karras", …; with ``sigmas=`` and
        ``timestep_spacing=`` keywords), on the model's schedule; None: the pipeline's (or the preset's).
        """
        args = {k: v for k, v in locals().items() if k not in ("self", "prompt", "knobs")} | knobs
        args = {k: v for k, v in args.items() if v is not None or k not in ("num_inference_steps", "guidance_scale")}
        s = self.validate(prompt, **args)
        plan = plan_run(self, s, estimate_stages=False)
        s = dataclasses.replace(s, view_batch_size=plan.view_batch_size)
        try:
            return self._run(s, plan)
        finally:
            self.placement.finish(plan.offload)  # components wait at home again (after errors too)

    # ---- the steps of a run ------------------------------------------------------------------
    def _place(self, stage: str, s: Settings, plan: MemoryPlan):
        """The device holds what ``stage`` ("text", "unet", "vae") needs under the plan's policy."""
        return self.placement.stage(stage, plan.offload, s.offload_text_encoders)

    def _run(self, s: Settings, plan: MemoryPlan) -> DemoFusionOutput:
        model = self._guided_unet(s, plan, run_scheduler(self.scheduler, s))
        gens = phase_generators(s.seed, s.phases)
        watch = FiniteWatch(likely_cause(self.unet.dtype))
        out = DemoFusionOutput(images=[], latents=[], phase_sizes=s.sizes)

        t0 = time.perf_counter()
        z = self._start(s, plan, gens[0])
        if z is None:
            with self._place("unet", s, plan):
                z = self._phase(s, model, 0, None, gens[0], watch)
        anchor = z.mean(), z.std()  # statistics every later phase is renormalised to
        if s.first_upscale == 1:
            self._finish(s, plan, out, 0, z, t0, model, done=bool(s.resume_latents))
        for k in range(s.first_upscale, s.phases):
            if k < len(s.resume_latents):  # finished before: taken as it is
                z = s.resume_latents[k].to(self.device, torch.float32)
                self._finish(s, plan, out, k, z, t0, model, done=True)
                continue
            t0 = time.perf_counter()
            with self._place("unet", s, plan):
                z = self._phase(s, model, k, z, gens[k], watch)
            if s.renormalise:
                z = self.mechanisms.renormalise(z, *anchor)
            watch.see(z, k + 1, len(model.scheduler.timesteps_cpu) - 1)
            watch.check(k + 1)
            self._finish(s, plan, out, k, z, t0, model)
        return out

    def _guided_unet(self, s: Settings, plan: MemoryPlan, scheduler) -> GuidedUNet:
        """Encode the prompts (the text encoders are on the device for this only, by default) → the
        run's guided UNet, sampling with ``scheduler``."""
        dev, dt = self.device, self.unet.dtype
        with self._place("text", s, plan):
            embeds, neg_embeds, pooled, neg_pooled = self.text.encode_with_negative(
                s.prompt, s.negative_prompt, prompt_2=s.prompt_2, negative_prompt_2=s.negative_prompt_2,
                guidance=s.cfg, truncate=s.truncate_prompts)
        on = lambda x: None if x is None else x.to(dev, dt)
        # time_ids = (orig h, orig w, crop top, crop left, target h, target w): the final size
        time_ids = torch.tensor([[s.height, s.width, 0, 0, s.height, s.width]], dtype=dt, device=dev)
        zero = self.text.zero_negative(s.negative_prompt, s.cfg)  # SDXL's forced zeros: cross-attention skipped
        cond = Conditioning(on(embeds), on(pooled), on(neg_embeds), on(neg_pooled), time_ids, zero)
        guide = None if s.control is None else Guide(self.controlnets, s.control, s.num_inference_steps, dev,
                                                     s.reference_compat)
        return GuidedUNet(self.unet, scheduler, cond, s.batch, s.view_batch_size, s.guidance_scale,
                          plan.cfg_apart, parallel.runner(s.distributed), guide)

    def _start(self, s: Settings, plan: MemoryPlan, g) -> torch.Tensor | None:
        """The phase-1 result when it is not sampled: the encoded image (img2img: upscaling starts
        at phase 1) or the resumed latents; else None."""
        if s.image is not None:
            with self._place("vae", s, plan):
                post = encode_image(self.vae, s.image.to(self.device), plan, s)
                return post.sample(generator=g).to(self.device) * self.vae.scaling_factor
        if s.resume_latents:
            return s.resume_latents[0].to(self.device, torch.float32)
        return None

    def _phase(self, s: Settings, model: GuidedUNet, k: int, z, g, watch: FiniteWatch) -> torch.Tensor:
        """Phase k+1 (0-based ``k``) with its generator ``g``: the multi-view denoiser of the phase
        and the sampler loop (:func:`.algorithm.first_phase` / :func:`.algorithm.upscale_phase`)."""
        mech, sched, dev = self.mechanisms, model.scheduler, self.device
        n, first = s.phase_steps(k)
        sched.set_timesteps(n, device=dev)  # its own steps; a multistep sampler's history restarts
        if model.guide is not None:
            model.guide.steps = n  # the ControlNets' windows are fractions of this phase's steps
        images = None if model.guide is None else model.guide.phase_images(s.sizes, k)
        upscaling = k >= s.first_upscale
        if upscaling:  # the upsampled latent and its noise ε_k come first from g, then the jitter
            z_up = mech.upsample_latents(z, (s.sizes[k][0] // 8, s.sizes[k][1] // 8))
            eps = s.upscale_noise[k - s.first_upscale] if s.upscale_noise is not None else \
                torch.randn(z_up.shape, generator=g)
        else:
            h1, w1 = s.sizes[0][0] // 8, s.sizes[0][1] // 8
            latents = s.latents if s.latents is not None else torch.randn((s.batch, 4, h1, w1), generator=g)
            z = upload(latents, dev).to(torch.float32) * sched.init_sigma()  # a CPU scalar: not read on the host
        D = MultiViewDenoiser(model, mech, s, k, policy_for(s.reference_compat), images)
        start = first_entry(sched, first)
        steps = steps_of(len(sched.timesteps_cpu), k + 1, s.phases, s.progress, start)
        noise = tuple(z_up.shape if upscaling else z.shape) if needs_noise(sched) else None
        draws = PhaseDraws(g, len(sched.timesteps_cpu), dev, D.place if D.local else None, D.jitters, noise, start)

        def on_step(i: int, z):
            watch.see(z, k + 1, i)
            if s.callback is not None:
                s.callback(k + 1, i, sched.timesteps[i], z)

        if not upscaling:
            z = A.first_phase(sched, D, z, steps, draws, on_step)
            watch.check(1)
            return z
        return A.upscale_phase(sched, D, mech, s, z_up, upload(eps, dev).to(z_up.dtype), steps, draws, on_step,
                               start)

    def _finish(self, s: Settings, plan: MemoryPlan, out: DemoFusionOutput, k: int, z, t0: float, denoise: GuidedUNet,
                done=False):
        """Record phase k+1: latents, the decoded image (unless latent output or resumed), calls."""
        image = None if done or s.output_type == "latent" else self._image(s, plan, k, z)
        out.latents.append(z)
        out.images.append(image)
        out.unet_calls.append(0 if done else denoise.calls)
        out.timings.append(0.0 if done else time.perf_counter() - t0)
        denoise.calls = 0
        if not done and s.on_phase_end is not None:
            s.on_phase_end(k + 1, image, z)

    def _image(self, s: Settings, plan: MemoryPlan, k: int, z):
        """Decode phase k+1 (checked finite) as ``output_type`` asks; write the preview if asked."""
        with self._place("vae", s, plan):
            return phase_output(self.vae, z, k, s, plan)
