"""Every argument of a DemoFusion run, checked once, up front: :func:`validate` → :class:`Settings`.

The API (``pipe(...)``), the CLI (``generate``, every ``ablate`` cell before the first runs) and
any front end call the same function, so a value means the same everywhere. Values with a
meaning keep it (σ = 0: no blur; guidance ≤ 1: no classifier-free guidance); nonsense (wrong
types, NaN/Inf, out-of-range numbers, absurd sizes) raises :class:`~demofusion.errors.InputError`
with one line naming the argument and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from ..config import (GUIDANCE_MAX, MAX_PHASES, DemoFusionConfig, check_bool, check_float, check_int, knobs, parse_budget,
                      split_overrides, with_overrides)
from ..controlnet.guide import check_control
from .. import parallel
from ..errors import InputError
from ..images import image_to_tensor
from ..placement import POLICIES
from ..run_presets import get_preset, preset_values
from ..schedulers.names import parse_sampler
from ..schedulers.schedule import SPACINGS
from . import mechanisms as M

OUTPUT_TYPES = ("pil", "pt", "latent")
MAX_SIDE = 16384  # px; larger targets are refused unless force=True
MAX_VIEW_RANKS = 4096
# on/off arguments of a call that are not DemoFusion knobs (those are DemoFusionConfig's fields)
SWITCHES = ("reference_compat", "offload_text_encoders", "progress", "force", "distributed", "truncate_prompts")


@dataclass(frozen=True)
class Settings:
    """A validated run: the call's arguments, normalised, plus the phase sizes they imply.

    The knobs are flat fields as the run reads them (stride and base size resolved) and, as given
    and checked, ``config``; a knob without a flat field here is read from ``config``
    (``s.<knob>``), so a new knob needs no edit of this class."""

    prompt: list
    negative_prompt: list | None
    prompt_2: list | None
    negative_prompt_2: list | None
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    view_batch_size: int | None  # None: 16, or fewer when max_memory needs it
    stride: int
    cosine_scale_1: float
    cosine_scale_2: float
    cosine_scale_3: float
    sigma: float
    base_size: int
    sizes: list  # (h, w) px of every phase, the last (height, width)
    image: torch.Tensor | None  # img2img start [B,3,h1,w1] in [-1, 1]
    latents: torch.Tensor | None
    upscale_noise: list | None
    resume_latents: list
    output_type: str
    callback: Callable | None
    on_phase_end: Callable | None
    preview_dir: Path | None
    max_memory: int | str | None = None  # bytes, "auto" (the device's free memory) or None
    offload: str | None = None  # "none" | "model" | "sequential"; None: "none", or max_memory's pick
    multi_decoder: bool = True
    view_jitter: bool = True
    reference_compat: bool = False
    skip_residual: bool = True
    local_paths: bool = True
    dilated_sampling: bool = True
    dilated_blur: bool = True
    renormalise: bool = True
    offload_text_encoders: bool = True
    progress: bool = False
    force: bool = False
    distributed: bool = True  # inside a process group of > 1 rank: share the views (demofusion.parallel)
    view_ranks: int = 1  # the ranks each step's views are split for (default: the process group's, shared)
    control: object = None  # the ControlNets' images, scales and windows (controlnet.guide.Control) or None
    truncate_prompts: bool = False  # cut at 77 tokens, no weights (diffusers); else chunks and A1111 weights
    config: DemoFusionConfig | None = None  # the knobs as given (checked): stride/base_size None = the default
    preset: str | None = None  # the run preset that filled the arguments not given (run_presets.py)
    sampler: str | None = None  # the call's sampler (our name), its σ schedule and spacing; None: the pipeline's
    sigmas: str | None = None
    timestep_spacing: str | None = None
    pipeline_sampler: str | None = None  # the pipeline's own sampler (our name), for counting evaluations

    def __getattr__(self, name):
        """A knob of ``config`` without a flat field (one added later, or by a subclass)."""
        config = self.__dict__.get("config")
        if name.startswith("_") or config is None or not hasattr(config, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(config, name)

    @property
    def batch(self) -> int:
        return len(self.prompt)

    @property
    def phases(self) -> int:
        return len(self.sizes)

    @property
    def window(self) -> int:
        """The UNet's native latent size (base size / 8): the side of a view."""
        return self.base_size // 8

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs only for guidance_scale > 1 (as diffusers)."""
        return self.guidance_scale > 1.0

    @property
    def blur(self) -> bool:
        """Blur before dilated sampling: switched on and σ > 0 (σ = 0 means no blur)."""
        return self.dilated_blur and self.sigma > 0

    @property
    def first_upscale(self) -> int:
        """Index of the first upscaling phase: 0 for img2img (the image replaces phase 1), else 1."""
        return 0 if self.image is not None else 1

    @property
    def counted_sampler(self) -> str | None:
        """The sampler the run steps with (our name), as far as the settings know."""
        return self.sampler or self.pipeline_sampler

    def phase_steps(self, k: int) -> tuple[int, int]:
        """(steps of phase ``k``'s schedule, the first step it runs): pipeline/steps.py."""
        return M.phase_steps(self, k)

    def unet_evaluations(self, layout=None) -> list[int]:
        """Single-view UNet forwards per phase (× 2 with guidance): the run's work, counted on
        ``layout`` (a pipeline's ``mechanisms.view_layout``; default the algorithm's)."""
        return M.unet_evaluations(self, layout or M.view_layout)


# ---- small checkers: each returns the normalised value or raises one line ----------------------
# (check_int, check_float, check_bool live with the knobs in demofusion/config.py)
def _type_name(v) -> str:
    return type(v).__name__


def check_prompts(name: str, v, batch: int | None, optional: bool) -> list | None:
    """A string or a list of strings (one per image); ``batch`` fixes the list length."""
    if v is None and optional:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(p, str) for p in v):
        raise InputError(f"{name} must be a string or a non-empty list of strings, got {_type_name(v)} {v!r:.60}")
    if batch is not None and len(v) not in (1, batch):
        raise InputError(f"{name} has {len(v)} entries but prompt has {batch}; give one or {batch}")
    return list(v) * (batch if batch is not None and len(v) == 1 else 1)


def check_latent(name: str, z, shape: tuple) -> torch.Tensor:
    """A finite float tensor of exactly ``shape``."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise InputError(f"{name} must be a float tensor of shape {list(shape)}, got {_type_name(z)}")
    if tuple(z.shape) != tuple(shape):
        raise InputError(f"{name} must have shape {list(shape)}, got {list(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise InputError(f"{name} holds NaN or Inf values; pass finite latents")
    return z


def check_callable(name: str, v):
    if v is not None and not callable(v):
        raise InputError(f"{name} must be a function or None, got {_type_name(v)}")
    return v


# ---- phase sizes ------------------------------------------------------------------------------
def resolve_sizes(height, width, base, phases, phase_sizes, reference_compat, mech=M) -> list[tuple[int, int]]:
    """The pixel size of every phase: explicit ``phase_sizes``, the reference's (compat) or ours."""
    if phase_sizes is not None:
        return _check_phase_sizes(phase_sizes, height, width, phases, reference_compat)
    if reference_compat:
        # the reference: phase 1 at (H//S, W//S), phase s at B·s on the long side, the short side
        # int()-scaled by the aspect ratio
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
    return mech.phase_sizes(height, width, base, phases)


def _check_phase_sizes(phase_sizes, height, width, phases, reference_compat) -> list[tuple[int, int]]:
    """Explicit phase sizes, validated: multiples of 8, growing, ending at (height, width)."""
    if reference_compat:
        raise InputError("phase_sizes= cannot be combined with reference_compat=True (the reference fixes its sizes)")
    try:
        sizes = [(check_int("phase_sizes height", h), check_int("phase_sizes width", w)) for h, w in phase_sizes]
    except (TypeError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"phase_sizes must be a list of (height, width) pairs, got {phase_sizes!r:.80}") from None
    if phases is not None and phases != len(sizes):
        raise InputError(f"phases={phases} but phase_sizes has {len(sizes)} entries; give one of them")
    if len(sizes) > MAX_PHASES:
        raise InputError(f"phase_sizes has {len(sizes)} entries, more than {MAX_PHASES} phases; give fewer")
    if not sizes or sizes[-1] != (height, width):
        raise InputError(f"phase_sizes must end with the target (height, width) = ({height}, {width}), got {sizes}")
    for k, (h, w) in enumerate(sizes, start=1):
        if h % 8 or w % 8 or h < 8 or w < 8:
            raise InputError(f"phase_sizes[{k - 1}] = ({h}, {w}): each side must be a positive multiple of 8")
        if k > 1 and (h < sizes[k - 2][0] or w < sizes[k - 2][1]):
            raise InputError(f"phase_sizes must not shrink: phase {k} ({h}, {w}) < phase {k - 1} {sizes[k - 2]}")
    return sizes


def check_size(height: int, width: int, base: int, reference_compat: bool, force: bool) -> None:
    for name, v in (("height", height), ("width", width)):
        if v % 8:
            raise InputError(f"{name}={v} is not a multiple of 8; use e.g. {name}={v // 8 * 8} or {-(-v // 8) * 8}")
    if min(height, width) < base and not reference_compat:
        raise InputError(f"height={height}, width={width}: both must be at least the base size {base} px; "
                         "give a larger target; or pass base_size= for a smaller base")
    if max(height, width) > MAX_SIDE and not force:
        raise InputError(f"height={height}, width={width}: beyond {MAX_SIDE} px a side (days of work, terabytes of "
                         "latents traffic); pass force=True if you really mean it")


# ---- the one entry point ----------------------------------------------------------------------
UNSET = object()  # an argument not given: a preset's value, else the default (50 steps, guidance 7.5)


def validate(pipe_base_size: int, vae_scale: int = 8, mech=M, *, prompt, negative_prompt=None, height=3072,
             width=3072, num_inference_steps=UNSET, guidance_scale=UNSET, seed=0, config=None, image=None,
             latents=None, upscale_noise=None, prompt_2=None, negative_prompt_2=None, output_type="pil", callback=None,
             on_phase_end=None, preview_dir=None, resume_latents=None, max_memory=None, offload=None,
             num_train_timesteps: int = 1000, view_ranks=None, controlnets: int = 0, control_image=None,
             controlnet_conditioning_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0,
             guess_mode=False, preset=None, sampler=None, sigmas=None, timestep_spacing=None,
             pipeline_sampler=None, **switches) -> Settings:
    """Check every argument of a run once and return the normalised :class:`Settings`.

    ``config``: a :class:`~demofusion.config.DemoFusionConfig` (None: the defaults); its field
    names given as keywords override it (``stride=32``, ``cosine_scale_1=2.0`` …), checked by the
    config's own field metadata. ``controlnets``: how many ControlNets the pipeline has; the
    control arguments are theirs. ``view_ranks``: split each step's views for this many ranks
    (None: the process group's size when ``distributed``, else 1); one process with N computes
    what N ranks compute, bit for bit. ``preset`` (run_presets.PRESETS) fills the sampler, spacing,
    steps, guidance and knobs not given; ``sampler`` (any spelling), ``sigmas``, ``timestep_spacing``:
    the call's sampler (None: the pipeline's, ``pipeline_sampler`` by name)."""
    overrides, switches = split_overrides(switches, type(config) if isinstance(config, DemoFusionConfig) else None)
    sampling = _sampling(preset, overrides, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         sampler=sampler, sigmas=sigmas, timestep_spacing=timestep_spacing)
    num_inference_steps, guidance_scale = sampling.pop("num_inference_steps"), sampling.pop("guidance_scale")
    unknown = set(switches) - set(SWITCHES)
    if unknown:
        raise InputError(f"unknown argument(s): {', '.join(sorted(unknown))}")
    sw = {k: check_bool(k, switches.get(k, f.default)) for f in fields(Settings) if (k := f.name) in SWITCHES}
    prompts = check_prompts("prompt", prompt, None, optional=False)
    B = len(prompts)
    base_knob = next(k for k in knobs() if k.name == "base_size")
    base = base_knob.check(overrides.get("base_size", getattr(config, "base_size", None))) or pipe_base_size
    base = base_knob.check(base)  # the model's own base size, as a given one
    if base % 64:
        raise InputError(f"base_size={base} must be a multiple of 64 (the UNet halves the latent three times)")
    window = base // 8
    cfg = with_overrides(config, overrides, window=window, half=max(window // 2, 1))
    height = check_int("height", height, 8, hint=" (pixels)")
    width = check_int("width", width, 8, hint=" (pixels)")
    check_size(height, width, base, sw["reference_compat"], sw["force"])
    if cfg.phases is None and cfg.phase_sizes is None and M.phase_count(height, width, base) > MAX_PHASES:
        raise InputError(f"{height}×{width} px at base size {base} makes {M.phase_count(height, width, base)} phases, "
                         f"more than {MAX_PHASES}; pass phases={MAX_PHASES} (or fewer) or a smaller size")
    sizes = resolve_sizes(height, width, base, cfg.phases, cfg.phase_sizes, sw["reference_compat"], mech)
    if max(sizes[0]) < base // 2 and not sw["force"] and cfg.phase_sizes is None:
        raise InputError(f"phases={len(sizes)} makes phase 1 only {sizes[0][1]}×{sizes[0][0]} px (width × height), "
                         f"under half the base size {base} (SDXL draws nothing useful there); use fewer phases; "
                         "or pass force=True")
    if not (cfg.local_paths or cfg.dilated_sampling):
        raise InputError("at least one path must denoise, but local_paths and dilated_sampling are both off")
    _check_phase_steps(cfg, len(sizes), num_train_timesteps, sw["reference_compat"])
    flat = {f.name for f in fields(Settings)}
    knob_fields = {k.name: getattr(cfg, k.name) for k in knobs(type(cfg)) if k.name in flat}
    knob_fields.update(stride=window // 2 if cfg.stride is None else cfg.stride, base_size=base)  # the defaults
    s = Settings(
        prompt=prompts,
        negative_prompt=check_prompts("negative_prompt", negative_prompt, B, optional=True),
        prompt_2=check_prompts("prompt_2", prompt_2, B, optional=True),
        negative_prompt_2=check_prompts("negative_prompt_2", negative_prompt_2, B, optional=True),
        height=height, width=width,
        num_inference_steps=check_int("num_inference_steps", num_inference_steps, 1, num_train_timesteps),
        guidance_scale=check_float("guidance_scale", guidance_scale, 0.0, GUIDANCE_MAX,
                                   hint=" (≤ 1 switches classifier-free guidance off)"),
        seed=check_int("seed", seed, 0, 2**64 - 1),
        sizes=sizes, image=None, latents=None, upscale_noise=None, resume_latents=[],
        output_type=_check_output_type(output_type),
        callback=check_callable("callback", callback), on_phase_end=check_callable("on_phase_end", on_phase_end),
        preview_dir=_check_dir(preview_dir), max_memory=parse_budget(max_memory), offload=_check_offload(offload),
        view_ranks=parallel.world(sw["distributed"]) if view_ranks is None else
        check_int("view_ranks", view_ranks, 1, MAX_VIEW_RANKS, hint=" (ranks the views are split for)"),
        control=check_control(controlnets, B, control_image, controlnet_conditioning_scale, control_guidance_start,
                              control_guidance_end, guess_mode), config=cfg, **knob_fields, **sw, **sampling,
        pipeline_sampler=pipeline_sampler)
    return _with_tensors(s, image, latents, upscale_noise, resume_latents, vae_scale)


def _sampling(preset, overrides: dict, **given) -> dict:
    """Steps, guidance and the call's sampler (normalised: our name, σ schedule, spacing), the
    preset filling what was not given (its knobs go into ``overrides`` unless given there)."""
    explicit = {k for k, v in given.items() if v is not UNSET and v is not None} | set(overrides)
    values = preset_values(get_preset(preset).name, explicit) if preset is not None else {}
    for k, v in values.items():
        if k in given:
            given[k] = v
        else:
            overrides[k] = v
    defaults = {"num_inference_steps": 50, "guidance_scale": 7.5}
    out = {k: defaults[k] if v is UNSET else v for k, v in given.items()}
    if out["sampler"] is not None or out["sigmas"] is not None:
        name, kind = parse_sampler(out["sampler"] or "euler", out["sigmas"])
        out["sampler"], out["sigmas"] = (name if out["sampler"] is not None else None), kind
    if out["timestep_spacing"] is not None and out["timestep_spacing"] not in SPACINGS:
        raise InputError(f"timestep_spacing {out['timestep_spacing']!r}: unknown; use one of {', '.join(SPACINGS)}")
    return out | {"preset": preset}


def _check_phase_steps(cfg, phases: int, num_train_timesteps: int, reference_compat: bool) -> None:
    """steps_per_phase names every phase; the reference has no partial upscaling phases."""
    if cfg.steps_per_phase is not None:
        if len(cfg.steps_per_phase) != phases:
            raise InputError(f"steps_per_phase has {len(cfg.steps_per_phase)} entries but the run has {phases} "
                             f"phases; give one number per phase")
        for k, n in enumerate(cfg.steps_per_phase):
            check_int(f"steps_per_phase[{k}]", n, 1, num_train_timesteps)
    if reference_compat and cfg.upscale_strength != 1.0:
        raise InputError(f"upscale_strength={cfg.upscale_strength} cannot be combined with reference_compat=True "
                         "(the reference restarts every phase from pure noise); drop one of them")


def _check_offload(v) -> str | None:
    if v is not None and v not in POLICIES:
        raise InputError(f"offload must be one of {', '.join(map(repr, POLICIES))} (or None), got {v!r}")
    return v


def _check_output_type(v) -> str:
    if v not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {v!r}")
    return v


def _check_dir(v) -> Path | None:
    if v is None:
        return None
    if not isinstance(v, (str, Path)):
        raise InputError(f"preview_dir must be a folder path, got {_type_name(v)}")
    if Path(v).exists() and not Path(v).is_dir():
        raise InputError(f"preview_dir {v} is a file; give a folder")
    return Path(v)


def _with_tensors(s: Settings, image, latents, upscale_noise, resume_latents, vae_scale: int) -> Settings:
    """Check the tensors of a run against its phase sizes (image, latents, noise, resumed phases)."""
    import dataclasses

    B, f = s.batch, vae_scale
    lat = [(B, 4, h // f, w // f) for h, w in s.sizes]
    if image is not None:
        if latents is not None:
            raise InputError("give image (img2img) or latents (phase-1 noise), not both")
        image = image_to_tensor(image, s.sizes[0])
        if image.shape[0] not in (1, B):
            raise InputError(f"image has a batch of {image.shape[0]} but prompt has {B}; give one image or {B}")
        image = image.expand(B, -1, -1, -1) if image.shape[0] != B else image
    if latents is not None:
        latents = check_latent("latents", latents, lat[0])
    first = 0 if image is not None else 1
    if upscale_noise is not None:
        if not isinstance(upscale_noise, (list, tuple)) or len(upscale_noise) != s.phases - first:
            raise InputError(f"upscale_noise must be a list of {s.phases - first} tensors (one per upscaling phase)")
        upscale_noise = [check_latent(f"upscale_noise[{i}]", z, lat[first + i]) for i, z in enumerate(upscale_noise)]
    done = list(resume_latents or [])
    if len(done) > s.phases:
        raise InputError(f"resume_latents has {len(done)} phases but this run has only {s.phases}")
    done = [check_latent(f"resume_latents[{i}]", z, lat[i]) for i, z in enumerate(done)]
    return dataclasses.replace(s, image=image, latents=latents, upscale_noise=upscale_noise, resume_latents=done)
