"""The page's words: every control's label (the pipeline's names) and its help text.

The DemoFusion knobs are explained as the reference (PRIS-CV/DemoFusion, its README and pipeline
docstring) explains them; the rest in this project's words (docs/pipeline.md, docs/memory.md).
No gradio here: the names also turn the pipeline's one-line errors into the page's words.
"""

from __future__ import annotations

import re

# argument → the label the page shows (errors name arguments; the page says labels)
LABELS = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "height": "Height",
    "width": "Width",
    "num_inference_steps": "Steps",
    "guidance_scale": "Guidance",
    "seed": "Seed",
    "view_batch_size": "View batch size",
    "stride": "Stride",
    "cosine_scale_1": "Cosine scale 1",
    "cosine_scale_2": "Cosine scale 2",
    "cosine_scale_3": "Cosine scale 3",
    "sigma": "Sigma",
    "multi_decoder": "Multi-decoder",
    "max_memory": "Memory budget",
    "image": "Picture",
    "control_image": "Control map",
    "controlnet_conditioning_scale": "Conditioning scale",
    "control_guidance_start": "Control start",
    "control_guidance_end": "Control end",
    "guess_mode": "Guess mode",
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
                      "guidance off and halves the work.",
    "seed": "The same seed and settings give the same picture (the PNG records them all).",
    "view_batch_size": "The batch size for multiple denoising paths: a larger batch is faster but needs more GPU "
                       "memory. Empty (or 0): 16, or fewer as the Memory budget needs.",
    "stride": "The stride of moving local patches, in latents (window = base / 8). A smaller stride alleviates "
              "seams but costs more views and time. Empty (or 0): half the window, 64 on SDXL.",
    "cosine_scale_1": "Decay of the skip residual (α1, 3 by default): smaller keeps closer to the previous phase "
                      "but may show more upsampling noise. See Appendix C of the DemoFusion paper.",
    "cosine_scale_2": "Decay of dilated sampling (α2, 1 by default): smaller fights repetition better but may look "
                      "grainy. See Appendix C of the paper.",
    "cosine_scale_3": "Decay of the Gaussian filter (α3, 1 by default): smaller is less grainy but may "
                      "over-smooth. See Appendix C of the paper.",
    "sigma": "Standard deviation of the Gaussian filter before dilated sampling: larger promotes global guidance "
             "but may over-smooth; 0 means no blur.",
    "multi_decoder": "Decode large phases in tiles (the VAE's memory grows with the picture); needed from about "
                     "3072×3072 on a GPU.",
    "max_memory": "GPU memory budget, e.g. 8GiB, 8GB or auto: placement, view batch and VAE tiles are planned so "
                  "every stage fits (docs/memory.md). Empty: no budget.",
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
}

_ESCAPE = re.compile(r"([\\`*_\[\]<>#|])")


# the API's arguments the page has no control for: their advice is left out of its messages
NOT_IN_PAGE = {"force": None, "base_size": None, "phases": None}


def in_page_words(message: str, uploads=()) -> str:
    """A pipeline/CLI error in the page's words (errors.reword with LABELS and FLAG_LABELS): ``width=500``
    → ``Width 500``, ``--scale`` → ``Scale``, no advice to pass ``force=True``; ``uploads``: the server's
    temporary paths of uploaded files, named by their file names."""
    from pathlib import Path

    from ..errors import reword

    names = {str(p): Path(p).name for p in uploads if p}
    return reword(message, {**LABELS, **FLAG_LABELS, **NOT_IN_PAGE, **names})


def markdown_text(text: str) -> str:
    """Plain text shown verbatim in Markdown (no emphasis from ``_``/``*`` in names)."""
    return _ESCAPE.sub(r"\\\1", text)
