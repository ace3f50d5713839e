"""What the browser UI does before a run, without gradio: the model (loaded once) and the page's
values → the run's parameters (the CLI's, so the PNG metadata is the one `demofusion generate
--from-image` replays) and the pipeline's arguments, checked by the pipeline's own validation.
The run itself: :mod:`demofusion.ui.worker`.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field, make_dataclass
from types import SimpleNamespace

from ..config import knobs
from ..errors import InputError, first_line
from ..frontend.control import canny, net_hashes
from ..frontend.loading import check_device, check_dtype, load_pipeline, model_fingerprint, parse_loras
from ..frontend.runs import PLACEMENT_KEYS, RUN_KEYS, defaults, image_size
from ..frontend.sampling import normalise_sampler
from ..images import load_image
from ..pipeline.settings import check_int
from ..schedulers import parse_sampler
from .knobs import in_page_words, page_value

MODES = ("txt2img", "img2img", "control")


# ---- the model, loaded once ---------------------------------------------------------------------
@dataclass
class Model:
    """The loaded pipeline and how a run records it (the CLI's ``model``, ``device``, ``dtype``…)."""

    pipe: object
    name: str  # a path, or a preset ("tiny")
    device: str
    dtype: str
    fingerprint: str
    controlnet: str | None = None  # a path or "tiny" (the app's --controlnet)
    controlnet_hash: list | None = None
    setup: dict = field(default_factory=dict)  # --vae, --lora, --scheduler … and their hashes, recorded per run
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _plain: object = field(default=None, repr=False)

    @property
    def base(self) -> int:
        return self.pipe.base_size

    def pipe_for(self, mode: str):
        """The pipeline of a mode: with its ControlNet for "control", else the same components
        without it (a shallow copy: nothing is loaded twice; runs take turns through ``lock``)."""
        if mode == "control" or not self.pipe.controlnets:
            return self.pipe
        if self._plain is None:
            self._plain = copy.copy(self.pipe)
            self._plain.controlnets = []
        return self._plain


def load_model(model: str = "tiny", device: str = "auto", controlnet: str | None = None,
               setup: dict | None = None) -> Model:
    """Load as `demofusion generate` does (same checks, same one-line errors). ``setup``: the
    model options of a run (``vae``, ``lora``, ``scheduler``, ``timestep_spacing``), applied once."""
    setup = normalise_sampler({k: v for k, v in (setup or {}).items() if v})
    params = defaults() | setup | {"model": str(model), "device": check_device(device),
                                   "controlnet": [str(controlnet)] if controlnet else None}
    params["dtype"] = check_dtype(params["dtype"], params["device"])
    pipe = load_pipeline(params)
    if setup.get("vae"):
        setup["vae_hash"] = model_fingerprint(pipe.vae, setup["vae"], "vae")
    if setup.get("lora"):
        setup["lora_hash"] = [model_fingerprint(None, f) for f, _ in parse_loras(setup["lora"])]
    m = wrap_pipeline(pipe, str(model), controlnet and str(controlnet), params["device"], params["dtype"])
    m.setup = setup
    return m


def wrap_pipeline(pipe, model: str | None = None, controlnet: str | None = None, device: str | None = None,
                  dtype: str | None = None) -> Model:
    """A pipeline loaded elsewhere; ``model`` / ``controlnet``: the names its runs record."""
    name = str(model or getattr(pipe, "name", "custom"))
    if pipe.controlnets and controlnet is None:
        controlnet = "tiny" if name == "tiny" else "custom"
    nets = {"controlnet": [controlnet] if controlnet else None}
    return Model(pipe, name, device or str(pipe.device), dtype or str(pipe.unet.dtype).replace("torch.", ""),
                 model_fingerprint(pipe, name), controlnet, net_hashes(pipe, nets))


# ---- the page's values → a checked plan ------------------------------------------------------------
@dataclass
class PageBase:
    """The values of the page's run-level controls (gradio hands over None for an empty number);
    :class:`Page` adds one field per DemoFusion knob."""

    mode: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    height: float | None = None
    width: float | None = None
    num_inference_steps: float | None = 50
    guidance_scale: float | None = 7.5
    seed: str | int | None = "0"  # text in the page: a browser's numbers round above 2**53
    max_memory: str = ""
    picture: str | None = None  # image to image: the uploaded file
    scale: float | None = 2.0
    size_from_picture: bool = True
    control_from: str = "canny"  # "canny" (edges of control_picture) or "map" (control_map)
    control_picture: str | None = None
    control_map: str | None = None
    canny_low: float = 100
    canny_high: float = 200
    control_scale: float | None = 0.5
    control_start: float | None = 0.0
    control_end: float | None = 1.0
    guess_mode: bool = False
    control_upscale: bool = False  # ControlNet tab: also start from control_picture (image to image)
    sampler: str = ""  # the Sampler menu: an A1111 name ("DPM++ 2M Karras"); empty: the model's


# one field per DemoFusionConfig knob, its default the config's (text controls: "" or None is the default)
Page = make_dataclass("Page", [(k.name, object, field(default=k.default)) for k in knobs()], bases=(PageBase,),
                      namespace={"__doc__": "The values of the page's controls: run-level and every knob."})
Page.__module__ = __name__


@dataclass
class Plan:
    mode: str
    params: dict  # the CLI's parameters of the run (run.json, PNG metadata)
    kwargs: dict  # the pipeline call's arguments, prompt included
    settings: object  # the validated Settings: phase sizes, work
    inputs: dict = field(default_factory=dict)  # params key → uploaded file, copied into the run folder
    maps: list = field(default_factory=list)  # the control maps (PIL)


def edges(path, low, high):
    """Canny edges of the picture at ``path`` (the CLI's OpenCV helper), thresholds checked."""
    try:
        return canny(path, check_int("Canny low", low, 0, 1000), check_int("Canny high", high, 0, 1000))
    except InputError as e:
        raise InputError(in_page_words(str(e), [path])) from None


def uploads(page: "Page") -> list:
    """The page's uploaded files (the server's temporary paths, never shown: the page names them by file name)."""
    return [page.picture, page.control_picture, page.control_map]


def prepare(model: Model, page: Page) -> Plan:
    """Check a page's values with the pipeline's validation; an ``InputError`` in the page's words."""
    try:
        return _prepare(model, page)
    except InputError as e:
        raise InputError(in_page_words(first_line(e), uploads(page))) from None


def seed_of(text) -> int:
    """The Seed box's text → the seed, exactly (digits only: no sign, no exponent, no rounding)."""
    value = str(text if text is not None else "").strip()
    if not value.isdecimal() or not value.isascii():
        raise InputError(f"Seed must be a whole number 0 … {SEED_MAX}, got {value!r}")
    return int(value)


SEED_MAX = 2**64 - 1  # the pipeline's range (docs/api.md)


def _prepare(model: Model, page: Page) -> Plan:
    if page.mode not in MODES:
        raise InputError(f"unknown mode {page.mode!r}; use one of {', '.join(MODES)}")
    params = defaults() | {
        "model": model.name, "device": model.device, "dtype": model.dtype, "prompt": page.prompt or "",
        "negative_prompt": page.negative_prompt or None, "height": page.height, "width": page.width,
        "seed": seed_of(page.seed),
        **{k: getattr(page, k) for k in ("num_inference_steps", "guidance_scale")},
        **{k.name: page_value(k, getattr(page, k.name)) for k in knobs()},  # refused as the CLI does, never replaced
        "max_memory": (page.max_memory or "").strip() or None,
        "controlnet": [model.controlnet] if page.mode == "control" else None}
    plan = Plan(page.mode, params, {}, None)
    image, control = None, {}
    if page.mode == "img2img" and not page.picture:
        raise InputError("Image to image needs a Picture: upload the picture to upscale")
    if page.mode == "control":
        control = _control(model, page, plan)
    picture = page.picture if page.mode == "img2img" else \
        page.control_picture if page.mode == "control" and page.control_upscale else None
    if picture:
        image = load_image(picture, "Picture")
        explicit = page.mode == "control" or not page.size_from_picture
        size = SimpleNamespace(scale=2.0 if explicit else page.scale, height=page.height if explicit else None,
                               width=page.width if explicit else None)
        image_size(image, size, params)
        plan.inputs["image"] = picture
    kwargs = {k: params[k] for k in (*RUN_KEYS, *PLACEMENT_KEYS)} | {"image": image, "force": False} | control
    kwargs |= _sampler(model, page, params)
    s = model.pipe_for(page.mode).validate(kwargs["prompt"], **{k: v for k, v in kwargs.items() if k != "prompt"})
    norm = {k: getattr(s, k) for k in ("height", "width", "num_inference_steps", "guidance_scale", "seed")}
    norm |= {k.name: getattr(s.config, k.name) for k in knobs()} | {"stride": s.stride}
    params.update(norm)  # as the pipeline reads them: 512 not 512.0, the default stride filled in (as the CLI)
    if control:
        params.update(control_scale=[float(page.control_scale)], control_start=[float(page.control_start)],
                      control_end=[float(page.control_end)], guess_mode=bool(page.guess_mode))
    plan.kwargs, plan.settings = kwargs | norm, s
    return plan


def _sampler(model: Model, page: Page, params: dict) -> dict:
    """The Sampler menu's choice → the call's sampler (on the app's --timestep-spacing), recorded as
    the CLI's --scheduler/--sigmas; empty: the pipeline's own (the app's --scheduler, if any)."""
    if not page.sampler:
        return {}
    name, kind = parse_sampler(page.sampler)
    params.update(scheduler=name, sigmas=kind)
    return {"sampler": name, "sigmas": kind, "timestep_spacing": model.setup.get("timestep_spacing")}


def _control(model: Model, page: Page, plan: Plan) -> dict:
    """The ControlNet's map and arguments (recorded as the CLI's --control… flags)."""
    if not model.controlnet:
        raise InputError("this app was started without a ControlNet; restart it with --controlnet PATH (or tiny)")
    if page.control_from == "canny":
        if not page.control_picture:
            raise InputError("ControlNet needs a picture for its Canny edges: upload one (or use a ready control map)")
        plan.maps.append(edges(page.control_picture, page.canny_low, page.canny_high))
        plan.params.update(control="canny", control_source=page.control_picture, canny_low=int(page.canny_low),
                           canny_high=int(page.canny_high))
        plan.inputs["control_source"] = page.control_picture
    else:
        if page.control_upscale:
            raise InputError("starting from the picture needs Canny edges of a picture, not a ready control map")
        if not page.control_map:
            raise InputError("ControlNet needs a Control map: upload one (or use Canny edges of a picture)")
        plan.maps.append(load_image(page.control_map, "Control map"))
        plan.params["control_image"] = [page.control_map]
        plan.inputs["control_image"] = page.control_map
    return {"control_image": plan.maps[0], "controlnet_conditioning_scale": page.control_scale,
            "control_guidance_start": page.control_start, "control_guidance_end": page.control_end,
            "guess_mode": bool(page.guess_mode)}


def target_size(picture, scale, size_from_picture: bool, height, width) -> str:
    """One line for the image-to-image tab: the picture's size and the target's."""
    if not picture:
        return "Upload a picture to upscale."
    try:
        im = load_image(picture, "Picture")
        if not size_from_picture:
            return f"Picture {im.width}×{im.height} px → Width × Height {width}×{height} px."
        p = {"height": None, "width": None}
        image_size(im, SimpleNamespace(scale=scale if scale is not None else 2.0, height=None, width=None), p)
        times = scale if scale is not None else 2
        return f"Picture {im.width}×{im.height} px × {times} → {p['width']}×{p['height']} px."
    except InputError as e:
        return in_page_words(str(e), [picture])
