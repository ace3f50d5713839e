"""DDIM, Euler, Euler-ancestral, Heun, DPM-Solver++, UniPC, LCM and TCD samplers, written from the maths (see docs/components.md).

Same method names as diffusers' schedulers, but ``step`` is stateless: it finds its step from the
timestep on every call and returns the previous sample as a tensor, so DemoFusion can step every
view separately at the same timestep.

    sched = from_config(SDXL_BASE_CONFIG)          # or a scheduler_config.json / model folder
    sched.set_timesteps(50, device="cuda")
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t, ...)
        x = sched.step(eps, t, x)
"""

from .base import Scheduler
from .config import SDXL_BASE_CONFIG, SDXL_TURBO_CONFIG, read_config
from .ddim import DDIMScheduler
from .dpm import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .lcm import LCMScheduler, TCDScheduler
from .names import (SAMPLER_NAMES, SAMPLERS, SIGMAS, a1111_name, is_sampler_name, parse_sampler, sampler_key,
                    sampler_options, sigma_schedule)
from .unipc import UniPCMultistepScheduler

SCHEDULERS = {c.__name__: c for c in (DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                                      HeunDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
                                      LCMScheduler, TCDScheduler)}


def by_name(name: str, config, timestep_spacing: str | None = None, sigmas: str | None = None) -> Scheduler:
    """The sampler ``name`` (see ``SAMPLER_NAMES``; A1111/ComfyUI spellings such as "DPM++ 2M Karras"
    or "dpmpp_2m" too) on a model's schedule. ``config``: a scheduler (its ``model_config``, the
    model's config kept whole, is used), a config dict, or a scheduler_config.json / model folder.
    Options come from that config, else the SDXL family's published values; ``timestep_spacing``
    ("leading", "trailing", "linspace") and ``sigmas`` ("karras", "exponential"; None: the model's)
    override it."""
    cls_name, cfg, model = sampler_options(name, config, timestep_spacing, sigmas)
    sched = SCHEDULERS[cls_name].from_config(cfg)
    sched.model_config = model  # the model's config travels on to the next switch unchanged
    return sched


__all__ = ["DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
           "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler", "Scheduler",
           "SDXL_BASE_CONFIG", "SDXL_TURBO_CONFIG", "SCHEDULERS", "SAMPLERS", "SAMPLER_NAMES", "SIGMAS", "by_name",
           "from_config", "a1111_name", "is_sampler_name", "parse_sampler", "sampler_key", "sigma_schedule"]


def from_config(cfg, **overrides) -> Scheduler:
    """The scheduler named by the config's ``_class_name`` (dict, scheduler_config.json or folder)."""
    data = read_config(cfg)
    name = overrides.pop("_class_name", None) or data.get("_class_name")
    if name is None:
        raise ValueError("scheduler config has no '_class_name'; call e.g. "
                         "EulerDiscreteScheduler.from_config(cfg) to choose the sampler yourself")
    if name not in SCHEDULERS:
        raise ValueError(f"unsupported scheduler {name!r}; supported: {', '.join(SCHEDULERS)} "
                         f"(override with from_config(cfg, _class_name='EulerDiscreteScheduler'))")
    return SCHEDULERS[name].from_config(data, **overrides)
