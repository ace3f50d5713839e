"""What a weights file or folder is, from the names in its safetensors header (no tensor is read):
a whole model, one component, a LoRA or a ControlNet. ``demofusion inspect`` says it and how to use
it; the command line checks that each flag was given what it expects (:func:`expect`) before any
weights load, so a UNet given as ``--vae`` is named as a UNet."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import first_line
from .common import COMPONENT_NAMES, PICKLE_SUFFIXES, SINGLE_FILE_PREFIXES, WeightsError
from .files import resolve_component
from .integrity import safetensors_header

STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
         "text_encoder_2": "model"}

# what each kind is, and how to use it (None: not usable alone)
WHAT = {
    "model": "an SDXL model folder (unet/, vae/, text_encoder/, text_encoder_2/)",
    "checkpoint": "a single-file SDXL checkpoint (every component in one file)",
    "unet": "the weights of a UNet alone",
    "vae": "the weights of a VAE",
    "text_encoder": "the weights of a CLIP text encoder alone",
    "text_encoder_2": "the weights of an OpenCLIP text encoder alone",
    "lora": "a LoRA",
    "controlnet": "an SDXL ControlNet",
    "unknown": "no weights of a kind demofusion knows",
}
USE = {"model": "--model PATH", "checkpoint": "--model FILE", "vae": "--vae PATH", "lora": "--lora FILE[:SCALE]",
       "controlnet": "--controlnet PATH"}
# what each flag takes, and how to say it
ACCEPTS = {
    "--model": ({"model", "checkpoint"}, "an SDXL model: a diffusers folder (unet/, vae/, text_encoder/, "
                                         "text_encoder_2/) or a single-file checkpoint"),
    "--vae": ({"vae", "model", "checkpoint"}, "a VAE: a diffusers VAE folder or one .safetensors "
                                              "(e.g. madebyollin/sdxl-vae-fp16-fix)"),
    "--lora": ({"lora"}, "a LoRA .safetensors (kohya/A1111 or diffusers/PEFT)"),
    "--controlnet": ({"controlnet"}, "an SDXL ControlNet: a diffusers folder (config.json + weights) or one "
                                     ".safetensors"),
}
_LORA = re.compile(r"(^|[._])(lora_(down|up|A|B)|lora|lora_linear_layer)\.|_lora\.(down|up)\.")
_CONTROLNET = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.", "control_model.")
_UNET = ("down_blocks.", "up_blocks.", "mid_block.", "time_embedding.", "add_embedding.", "conv_in.",
         "input_blocks.", "middle_block.", "output_blocks.", "time_embed.")
_VAE = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def kind_of_keys(keys) -> str:
    """The kind (a key of :data:`WHAT`) of a state dict's names."""
    keys = list(keys)
    if any(_LORA.search(k) for k in keys):
        return "lora"
    if any(k.startswith(_CONTROLNET) for k in keys):
        return "controlnet"
    single = [c for c, p in SINGLE_FILE_PREFIXES.items() if any(k.startswith(p) for k in keys)]
    if len(single) > 1:
        return "checkpoint"
    if single:
        return single[0]
    if any(k.startswith(_UNET) for k in keys):
        return "unet"
    if any(k.startswith(_VAE) for k in keys):
        return "vae"
    if any("text_projection" in k for k in keys):
        return "text_encoder_2"
    if any(k.startswith(("text_model.", "transformer.", "token_embedding", "embeddings.")) for k in keys):
        return "text_encoder"
    return "unknown"


def weights_file(folder: Path) -> Path | None:
    """The folder's weights file: full precision first, then .fp16 (as the loaders pick)."""
    files = sorted(folder.glob("*.safetensors"))
    return min(files, key=lambda f: (".fp16." in f.name, f.name)) if files else None


def kind_of(path) -> str:
    """The kind of a file or folder; :class:`WeightsError` (one line) when it cannot be told:
    missing, a pickle, unreadable, not safetensors."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"{p} does not exist")
    if p.is_dir():
        if (p / "unet").is_dir() or (p / "model_index.json").is_file():
            return "model"
        f = weights_file(p)
        if f is None:
            pickles = sorted(q.name for q in p.iterdir() if q.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise WeightsError(f"{p / pickles[0]} is a pickle file; pickles can run code and are never "
                                   "opened: use the .safetensors release")
            raise WeightsError(f"{p} is a folder without weights (no .safetensors file, no unet/ folder)")
        p = f
    if p.suffix in PICKLE_SUFFIXES:
        raise WeightsError(f"{p} is a pickle file ({p.suffix}); pickles can run code and are never opened: "
                           "use the .safetensors release")
    header, problems = safetensors_header(p)
    if header is None:
        raise WeightsError(problems[0])
    return kind_of_keys(header)


def expect(path, flag: str) -> str:
    """``path``'s kind, checked to be what ``flag`` (a key of :data:`ACCEPTS`) takes; otherwise one
    line saying what it is and what was expected (and where it would fit)."""
    kinds, wanted = ACCEPTS[flag]
    try:
        kind = kind_of(path)
    except WeightsError as e:
        why = first_line(e).removeprefix(str(Path(path).expanduser())).lstrip(": ")
        raise WeightsError(f"{flag} {path}: {why}; {flag} takes {wanted}") from None
    if kind not in kinds:
        use = f" (use it as {USE[kind]})" if kind in USE else ""
        raise WeightsError(f"{flag} {path}: this is {WHAT[kind]}{use}; {flag} takes {wanted}")
    return kind


def _same(kind: str, component: str) -> bool:
    text = ("text_encoder", "text_encoder_2")
    return kind == component or (kind in text and component in text)


def check_model(path) -> None:
    """A model the loaders can open: a folder holding all four components (each an intact
    safetensors of its kind; config.json as the loader reads it) or a single-file checkpoint
    holding all four. One line, the loader's words where it has them; no tensor is read."""
    p = Path(path).expanduser()
    kind = expect(p, "--model")
    if kind == "checkpoint":
        header, _ = safetensors_header(p)
        absent = [c for c, pre in SINGLE_FILE_PREFIXES.items() if not any(k.startswith(pre) for k in header)]
        if absent:
            names = ", ".join(f"{COMPONENT_NAMES[c]} ({SINGLE_FILE_PREFIXES[c]}…)" for c in absent)
            raise WeightsError(f"--model {path}: this single-file checkpoint has no {names} keys; use a full SDXL "
                               "checkpoint or a diffusers folder")
        return
    for component, stem in STEMS.items():
        if not (p / component).is_dir():
            raise WeightsError(f"--model {path}: no {component}/ folder; an SDXL model folder holds unet/, vae/, "
                               "text_encoder/ and text_encoder_2/ (`demofusion download sdxl-base` fetches them)")
        file, _ = resolve_component(p, component, [stem])  # the loader's own errors: no weights, pickles, config.json
        header, problems = safetensors_header(file)
        if header is None or problems:
            raise WeightsError(problems[0])
        found = kind_of_keys(header)
        if not _same(found, component):
            raise WeightsError(f"--model {path}: {file} is {WHAT[found]}, not the {COMPONENT_NAMES[component]} "
                               f"that {component}/ should hold; put the right file there (or re-download the model)")
