"""Run presets: the sampler, timestep spacing, steps and guidance a model family's card gives
(``--preset NAME``, ``pipe(..., preset=NAME)``), and ``fast``: DemoFusion on SDXL base with fewer
UNet evaluations. Explicit arguments override a preset's values (docs/components.md, "Presets").

No torch here: the command line reads the table to build its parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError


@dataclass(frozen=True)
class Preset:
    """What a preset sets. ``sampler``: our sampler name (None: the model's); ``sigmas``: "karras",
    "exponential" or None; ``timestep_spacing``: None keeps the model's; ``guidance``: None keeps
    the run's; ``knobs``: DemoFusionConfig fields; ``weights``: the model it is for."""

    name: str
    sampler: str | None
    steps: int
    guidance: float | None
    weights: str
    sigmas: str | None = None
    timestep_spacing: str | None = None
    knobs: dict = field(default_factory=dict)


def _lightning(n: int) -> Preset:
    # ByteDance/SDXL-Lightning's card: Euler with "trailing" timesteps (as trained), guidance 0
    return Preset(f"lightning-{n}step", "euler", n, 0.0, f"SDXL-Lightning {n}-step (UNet, checkpoint or LoRA)",
                  timestep_spacing="trailing")


PRESETS = {p.name: p for p in (
    # DPM++ 2M Karras in 20 steps, and every upscaling phase from the last 80 % of its schedule
    Preset("fast", "dpm++2m", 20, None, "SDXL base (or any SDXL fine-tune)", sigmas="karras",
           knobs={"upscale_strength": 0.8}),
    _lightning(2), _lightning(4), _lightning(8),
    # ByteDance/Hyper-SD's card, N-step SDXL LoRAs: DDIM with "trailing" spacing, guidance 0 (8 steps)
    Preset("hyper", "ddim", 8, 0.0, "Hyper-SDXL 8-step LoRA", timestep_spacing="trailing"),
    # latent-consistency/lcm-lora-sdxl's card: LCMScheduler, 4 steps, guidance 1 (off)
    Preset("lcm", "lcm", 4, 1.0, "LCM-LoRA SDXL (or an LCM-distilled SDXL UNet)"),
    # h1t/TCD-SDXL-LoRA's card: TCDScheduler, 4 steps, guidance 0, gamma ("eta") 0.3 (our default)
    Preset("tcd", "tcd", 4, 0.0, "TCD-SDXL LoRA"),
    # stabilityai/sdxl-turbo's own scheduler config (Euler a, trailing), guidance 0; the card samples
    # 1 step (2 at strength 0.5 from a picture): 4 gives every upscaling phase several steps
    Preset("turbo", "euler-a", 4, 0.0, "SDXL-Turbo", timestep_spacing="trailing"),
)}
PRESET_NAMES = tuple(PRESETS)


def get_preset(name) -> Preset:
    if not isinstance(name, str) or name not in PRESETS:
        raise InputError(f"preset {name!r}: unknown; use one of {', '.join(PRESET_NAMES)}")
    return PRESETS[name]


def preset_values(name: str, given=()) -> dict:
    """The run arguments preset ``name`` sets, less those in ``given`` (the caller's explicit ones):
    ``sampler``, ``sigmas``, ``timestep_spacing``, ``num_inference_steps``, ``guidance_scale`` and
    its knobs. An explicit sampler drops the preset's σ schedule too (it may not take one)."""
    p = get_preset(name)
    values = {"sampler": p.sampler, "sigmas": p.sigmas, "timestep_spacing": p.timestep_spacing,
              "num_inference_steps": p.steps, "guidance_scale": p.guidance, **p.knobs}
    dropped = set(given) | ({"sigmas"} if "sampler" in given else set())
    return {k: v for k, v in values.items() if k not in dropped and v is not None}


# the paper's run (Du et al.): 50 steps at guidance 7.5 in every phase, each upscaling phase from
# pure noise — what a preset's work is compared with
PAPER = {"num_inference_steps": 50, "guidance_scale": 7.5, "upscale_strength": 1.0, "steps_per_phase": None}
