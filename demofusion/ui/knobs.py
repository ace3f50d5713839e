"""The page's words: every control's label (the pipeline's names) and its help text.

The DemoFusion knobs' controls, labels, help and ranges are generated from the fields of
:class:`~demofusion.config.DemoFusionConfig` (:func:`control_spec`, :func:`page_value`), so the
page offers and refuses exactly what the command line does; their help is the reference's
(PRIS-CV/DemoFusion, its README and pipeline docstring). The rest in this project's words
(docs/api.md, docs/big-images.md). No gradio here: the names also turn the pipeline's one-line
errors into the page's words.
"""

from __future__ import annotations

import re

from ..config import GUIDANCE_MAX, Knob, knobs
from ..errors import InputError, reword
from ..schedulers.names import SAMPLERS, SIGMA_SCHEDULE_CLASSES, SIGMAS

# argument → the label the page shows (errors name arguments; the page says labels)
LABELS = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "height": "Height",
    "width": "Width",
    "num_inference_steps": "Steps",
    "guidance_scale": "Guidance",
    "seed": "Seed",
    "max_memory": "Memory budget",
    "image": "Picture",
    "control_image": "Control map",
    "controlnet_conditioning_scale": "Conditioning scale",
    "control_guidance_start": "Control start",
    "control_guidance_end": "Control end",
    "guess_mode": "Guess mode",
    "sampler": "Sampler",
    **{k.name: k.title for k in knobs()},
}
# the CLI's flags, as some shared helpers word their errors
FLAG_LABELS = {"--scale": "Scale", "--canny-low": "Canny low", "--canny-high": "Canny high",
               "--control-source": "Picture for edges", "--control-image": "Control map", "--image": "Picture",
               "--height": "Height", "--width": "Width"}

HELP = {
    "prompt": "What the picture shows. Every phase uses it; an accurate description of content and style "
              "matters most when upscaling a picture.",
    "negative_prompt": "What the picture should not show, e.g. blurry, ugly, duplicate, poorly drawn, deformed, "
                       "mosaic.",
    "height": "Pixels, a multiple of 8 and at least the model's base size. DemoFusion runs ⌊max(Height, Width) / "
              "base⌋ phases, doubling, tripling … the base size (2048 on SDXL: 2 phases).",
    "width": "Pixels, a multiple of 8 and at least the model's base size.",
    "num_inference_steps": "Denoising steps of every phase (the reference uses 50).",
    "guidance_scale": "Classifier-free guidance: how strongly the prompt steers (7.5 as the reference); ≤ 1 turns "
                      f"guidance off and halves the work. 0 … {GUIDANCE_MAX:g}.",
    "seed": "The same seed and settings give the same picture (the PNG records them all).",
    "max_memory": "GPU memory budget, e.g. 8GiB, 8GB or auto: placement, view batch and VAE tiles are planned so "
                  "every stage fits (docs/big-images.md). Empty: no budget.",
    "picture": "The picture to upscale: it replaces phase 1, then DemoFusion upscales it phase by phase.",
    "scale": "Target = the picture's size × Scale (rounded to multiples of 8).",
    "size_from_picture": "Off: use Height and Width instead.",
    "control_from": "Canny edges computed from a picture (OpenCV), or a ready control map (edges, depth …).",
    "control_picture": "The picture whose Canny edges guide the generation.",
    "control_map": "A ready control map for the ControlNet; any size, resized to every phase.",
    "canny_low": "Canny's lower hysteresis threshold (100 by default).",
    "canny_high": "Canny's upper hysteresis threshold (200 by default).",
    "control_scale": "How strongly the ControlNet steers (0.5 as the reference demo; 1 is full strength).",
    "control_start": "The fraction of the steps after which the ControlNet starts acting.",
    "control_end": "The fraction of the steps after which the ControlNet stops acting.",
    "guess_mode": "The ControlNet sees only the conditional half (diffusers' guess mode); try with an empty prompt.",
    "control_upscale": "Also start from the picture (image to image), as the reference's ControlNet img2img demo.",
    "sampler": "The sampler, by its A1111 name, on the model's own schedule (docs/components.md); the PNG records "
               "it. Model's own: the scheduler the model (or the app's --scheduler) brings.",
}


def sampler_choices() -> list[tuple[str, str]]:
    """The Sampler menu: (label, value) pairs, the model's own first, then every sampler by its A1111
    name, with " Karras" / " Exponential" for those that take a σ schedule."""
    names = []
    for cls, _, a1111 in SAMPLERS.values():
        names += [a1111] + ([f"{a1111} {k.capitalize()}" for k in SIGMAS] if cls in SIGMA_SCHEDULE_CLASSES else [])
    return [("Model's own", "")] + [(n, n) for n in names]


def knob_help(k: Knob) -> str:
    """A knob's help in the page: the config's text, its range (the CLI's) and what empty means."""
    return (k.help + (f" Range {k.range_text()}." if k.range_text() and k.kind != "bool" else "")
            + (" Empty: the default." if k.optional else ""))


HELP |= {k.name: knob_help(k) for k in knobs()}


# ---- the knobs' controls, generated from the config's fields (gradio builds them: ui/app.py) -------
def control_spec(k: Knob) -> dict:
    """How the page shows knob ``k``: ``kind`` checkbox (on/off), text (empty = the run's default, or
    sizes) or number, with its label, help, starting value and element id. No bounds are set on
    the control: the run's check refuses out-of-range values in the page's words, as the CLI does."""
    kind = "checkbox" if k.kind == "bool" else "text" if k.optional or k.kind == "sizes" else "number"
    value = "" if kind == "text" else k.default
    return {"kind": kind, "label": k.title, "info": knob_help(k), "value": value,
            "elem_id": f"df-{k.name}", "name": k.name}


def page_value(k: Knob, raw):
    """A control's value → the call's: empty text is the default (None), text is converted
    (``2.5`` for a whole number is refused, never rounded), numbers and on/off pass to the run's check."""
    if isinstance(raw, str):
        if not raw.strip():
            return None if k.optional else k.default
        try:
            return k.convert(raw)
        except InputError as e:
            raise InputError(in_page_words(str(e))) from None
    return raw

_ESCAPE = re.compile(r"([\\`*_\[\]<>#|])")


# the API's arguments the page has no control for: their advice is left out of its messages
NOT_IN_PAGE = {"force": None, "base_size": None, "phases": None}


def in_page_words(message: str, uploads=()) -> str:
    """A pipeline/CLI error in the page's words (errors.reword with LABELS and FLAG_LABELS): ``width=500``
    → ``Width 500``, ``--scale`` → ``Scale``, no advice to pass ``force=True``; ``uploads``: the server's
    temporary paths of uploaded files, named by their file names."""
    from pathlib import Path

    names = {str(p): Path(p).name for p in uploads if p}
    return reword(message, {**LABELS, **FLAG_LABELS, **NOT_IN_PAGE, **names})


def markdown_text(text: str) -> str:
    """Plain text shown verbatim in Markdown (no emphasis from ``_``/``*`` in names)."""
    return _ESCAPE.sub(r"\\\1", text)
