"""DDIM, Euler and Euler-ancestral samplers, written from the maths (see docs/schedulers.md).

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
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

SCHEDULERS = {c.__name__: c for c in (DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)}
SAMPLERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler"}


def by_name(name: str, config, timestep_spacing: str | None = None) -> Scheduler:
    """The sampler ``name`` ("ddim", "euler", "euler-a") on a model's training schedule ``config``
    (its betas, prediction type, offset and, unless ``timestep_spacing`` is given, its spacing:
    SDXL base "leading", Turbo "trailing")."""
    from ..errors import InputError
    from .schedule import SPACINGS

    if name not in SAMPLERS:
        raise InputError(f"scheduler {name!r}: unknown; use one of {', '.join(SAMPLERS)}")
    if timestep_spacing is not None and timestep_spacing not in SPACINGS:
        raise InputError(f"timestep_spacing {timestep_spacing!r}: unknown; use one of {', '.join(SPACINGS)}")
    extra = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
    return from_config(dict(config), _class_name=SAMPLERS[name], **extra)

__all__ = ["DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "Scheduler",
           "SDXL_BASE_CONFIG", "SDXL_TURBO_CONFIG", "SCHEDULERS", "SAMPLERS", "by_name", "from_config"]


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
