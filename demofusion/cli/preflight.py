"""Checks a run makes before any weights load (dry runs too): the files it names are there and of
the kind each flag takes, the fields a replayed PNG carries have a flag's type, and warnings about
settings that do less than the user may think."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..errors import first_line
from ..frontend.errors import CLIError
from ..frontend.loading import parse_loras
from ..frontend.runs import FLAGS
from ..presets import PRESETS
from ..weights import WeightsError
from ..weights.kinds import check_model, expect
from .args import OFFLOAD, PRESET_NAMES, SAMPLER_NAMES, SIGMAS, SPACINGS


def check_files(params: dict) -> None:
    """--model, --vae, --lora and --controlnet: present, readable safetensors, of the kind each takes
    (a UNet given as --vae is named as a UNet); read from the headers only."""
    model = str(params["model"])
    try:
        if model not in PRESETS or Path(model).expanduser().exists():
            check_model(model)
        if params.get("vae"):
            expect(params["vae"], "--vae")
        for path, _ in parse_loras(params.get("lora")) or []:  # scales checked here too
            expect(path, "--lora")
        for net in params.get("controlnet") or []:
            if str(net) != "tiny":
                expect(net, "--controlnet")
    except WeightsError as e:
        raise CLIError(first_line(e)) from None


def warn_settings(params: dict) -> None:
    """Settings that are valid but do less than they seem to."""
    guidance = params.get("guidance_scale")
    if params.get("negative_prompt") and isinstance(guidance, (int, float)) and guidance <= 1:
        print(f"warning: --negative-prompt is unused: --guidance {guidance:g} (≤ 1) turns classifier-free guidance "
              "off, and the negative prompt acts only through it; give --guidance > 1 (default 7.5) to use it",
              file=sys.stderr)


# ---- fields of a replayed PNG: untrusted input, checked like the flags they stand for ------------
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _texts(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _sizes(v) -> bool:
    return isinstance(v, list) and all(isinstance(hw, list) and len(hw) == 2 and all(map(_int, hw)) for hw in v)


def _one_of(*names):
    return lambda v: v in names


# field → (check, what a flag would take); None is allowed where the flag's default is None
FIELDS = {
    "prompt": (lambda v: isinstance(v, str), "a text"),
    "height": (_int, "a whole number of pixels"), "width": (_int, "a whole number of pixels"),
    "num_inference_steps": (_int, "a whole number"), "seed": (_int, "a whole number"),
    "guidance_scale": (_number, "a number"), "cosine_scale_1": (_number, "a number"),
    "cosine_scale_2": (_number, "a number"), "cosine_scale_3": (_number, "a number"), "sigma": (_number, "a number"),
    "upscale_strength": (_number, "a number"),
    "canny_low": (_int, "a whole number"), "canny_high": (_int, "a whole number"),
    "model": (lambda v: isinstance(v, str), "a path or a preset name"), "dtype": (lambda v: isinstance(v, str), "a dtype name"),
}
OPTIONAL = {
    "negative_prompt": (lambda v: isinstance(v, str), "a text"), "phases": (_int, "a whole number"),
    "phase_sizes": (_sizes, "a list of [height, width] pairs"), "view_batch_size": (_int, "a whole number"),
    "stride": (_int, "a whole number"), "image": (lambda v: isinstance(v, str), "a path"),
    "vae": (lambda v: isinstance(v, str), "a path"), "lora": (_texts, "a list of FILE[:SCALE] texts"),
    "controlnet": (_texts, "a list of paths"), "control_image": (_texts, "a list of paths"),
    "control_source": (lambda v: isinstance(v, str), "a path"), "control": (_one_of("canny"), "canny"),
    "control_scale": (lambda v: isinstance(v, list) and all(map(_number, v)), "a list of numbers"),
    "control_start": (lambda v: isinstance(v, list) and all(map(_number, v)), "a list of numbers"),
    "control_end": (lambda v: isinstance(v, list) and all(map(_number, v)), "a list of numbers"),
    "scheduler": (_one_of(*SAMPLER_NAMES), " or ".join(SAMPLER_NAMES)),
    "timestep_spacing": (_one_of(*SPACINGS), " or ".join(SPACINGS)),
    "sigmas": (_one_of(*SIGMAS), " or ".join(SIGMAS)), "preset": (_one_of(*PRESET_NAMES), " or ".join(PRESET_NAMES)),
    "steps_per_phase": (lambda v: isinstance(v, list) and len(v) > 0 and all(map(_int, v)), "a list of whole numbers"),
    "max_memory": (lambda v: isinstance(v, str), "a size such as 8GB"), "offload": (_one_of(*OFFLOAD), " or ".join(OFFLOAD)),
    "view_ranks": (_int, "a whole number"),
    "fp8": (lambda v: isinstance(v, bool), "true or false"), "force": (lambda v: isinstance(v, bool), "true or false"),
    "truncate_prompts": (lambda v: isinstance(v, bool), "true or false"),
    "guess_mode": (lambda v: isinstance(v, bool), "true or false"),
}
SWITCH_FIELDS = ("multi_decoder", "skip_residual", "local_paths", "dilated_sampling", "dilated_blur", "renormalise",
                 "view_jitter")


def check_replayed(source: dict, where: str) -> None:
    """Every field of a PNG's metadata that a replay uses has the type its flag would have (ranges
    are then checked as the flag's are); one line naming the field otherwise."""
    checks = {**FIELDS, **{k: (lambda v: isinstance(v, bool), "true or false") for k in SWITCH_FIELDS}}
    for key, value in source.items():
        if key in checks:
            check, what = checks[key]
        elif key in OPTIONAL:
            if value is None:
                continue
            check, what = OPTIONAL[key]
        else:
            continue  # recorded facts (hashes, version, phase …) are not settings
        if not check(value):
            flag = FLAGS.get(key, f"--{key.replace('_', '-')}")
            raise CLIError(f"--from-image {where}: its metadata's {key} is {value!r:.60}, not {what} as {flag} "
                           "takes; the file was edited or damaged — give the setting as a flag instead")
