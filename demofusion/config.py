"""DemoFusion's knobs: one frozen dataclass, each field with its default, help text and range.

Every place that shows or records a knob is generated from these fields, so a knob is written
once: the pipeline call's keyword overrides and their checks (``pipeline/settings.py``), the
command line's flags (``cli/args.py``), the browser UI's controls and labels (``ui/knobs.py``,
``ui/app.py``), the ``ablate`` grid and sweeps (``cli/ablate.py``), the run id
(``frontend/runs.py``) and the PNG metadata keys (``outputs.py``). Adding a knob is a field here
plus its use in the algorithm (docs/algorithm.md, "Where to change X").

Run-level values (prompt, seed, size, steps, guidance, output paths, memory budget) are not
knobs of the algorithm and stay arguments of the call. No torch here: the CLI imports this to
build its parser.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field

from .errors import InputError

KINDS = ("bool", "int", "float", "sizes", "ints")
GUIDANCE_MAX = 100.0  # guidance_scale's upper bound, for the API, the CLI and the UI alike
MAX_PHASES = 64  # one limit for phases=… and the count a size implies (⌊max(H, W) / base⌋)


def knob(default, help: str, kind: str, *, lo=None, hi=None, hint: str = "", label: str | None = None,
         ablation: bool = False, always_in_run_id: bool = False, metavar: str | None = None, lo_open: bool = False):
    """A config field: ``default``, ``help`` (the reference's words where it has them), ``kind``
    (bool, int, float, sizes, or ints: a list of whole numbers, each in range), the inclusive range
    ``lo``..``hi`` (``lo_open``: ``lo`` itself excluded; ``hi`` may name a value only
    the run knows, e.g. "window"), ``hint`` appended to range errors, the UI ``label`` (default:
    the name in words), ``ablation``: an ``ablate`` cell "no-<name>" turns it off,
    ``always_in_run_id``: hashed even at its default (the knobs older run ids hold; a knob added
    later enters the id only when set, so older runs keep their ids)."""
    assert kind in KINDS, kind
    meta = dict(help=help, kind=kind, lo=lo, hi=hi, hint=hint, label=label, ablation=ablation,
                always_in_run_id=always_in_run_id, metavar=metavar, lo_open=lo_open)
    return field(default=default, metadata=meta)


def mechanism(help: str):
    """A DemoFusion mechanism's switch: on (as the paper runs), an ``ablate`` cell turns it off, and
    it is hashed into every run id."""
    return knob(True, help, "bool", ablation=True, always_in_run_id=True)


# ---- checks: each returns the normalised value or raises one line naming the argument -----------
def _type_name(v) -> str:
    return type(v).__name__


def check_int(name: str, v, lo: int | None = None, hi: int | None = None, hint: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and float(v).is_integer():
            v = int(v)  # 512.0 is 512
        else:
            raise InputError(f"{name} must be a whole number, got {_type_name(v)} {v!r}{hint}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f"≥ {lo}"
        raise InputError(f"{name} must be {rng}, got {v}{hint}")
    return v


def check_float(name: str, v, lo: float | None = None, hi: float | None = None, hint: str = "",
                lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise InputError(f"{name} must be a number, got {_type_name(v)} {v!r}{hint}")
    v = float(v)
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {v}{hint}")
    below = lo is not None and (v <= lo if lo_open else v < lo)
    if below or (hi is not None and v > hi):
        rng = (f"in {'(' if lo_open else '['}{lo}, {hi}]" if hi is not None else
               f"{'>' if lo_open else '≥'} {lo}")
        raise InputError(f"{name} must be {rng}, got {v}{hint}")
    return v


def check_ints(name: str, v, lo: int | None = None, hi: int | None = None, hint: str = "") -> list[int]:
    """A non-empty list (or tuple) of whole numbers, each in ``lo``..``hi``."""
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or not v:
        raise InputError(f"{name} must be a list of whole numbers, e.g. [30, 20, 20], got {_type_name(v)} "
                         f"{v!r:.60}{hint}")
    return [check_int(f"{name}[{i}]", x, lo, hi, hint) for i, x in enumerate(v)]


def parse_ints(text: str) -> list[int]:
    """``"30,20,20"`` → [30, 20, 20]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = None
    if not values:
        raise InputError(f"{text!r}: give whole numbers separated by commas, e.g. 30,20,20")
    return values


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise InputError(f"{name} must be True or False, got {_type_name(v)} {v!r}")
    return v


def parse_sizes(text: str) -> list[list[int]]:
    """``"1024x1024,2048x2048"`` → [[1024, 1024], [2048, 2048]] (height × width, px)."""
    try:
        sizes = [[int(v) for v in part.lower().split("x")] for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = None
    if not sizes or any(len(hw) != 2 for hw in sizes):
        raise InputError(f"{text!r}: give HEIGHTxWIDTH pairs separated by commas, e.g. 1024x1024,2048x2048")
    return sizes


# ---- one field as the front ends read it --------------------------------------------------------
@dataclass(frozen=True)
class Knob:
    """A config field's name, default and metadata; checks and parses its values."""

    name: str
    default: object
    help: str
    kind: str
    lo: object = None
    hi: object = None
    hint: str = ""
    label: str | None = None
    ablation: bool = False
    always_in_run_id: bool = False
    metavar: str | None = None
    lo_open: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def title(self) -> str:
        """The UI label: given, else the name in words (cosine_scale_1 → Cosine scale 1)."""
        return self.label or self.name.replace("_", " ").capitalize()

    @property
    def optional(self) -> bool:
        """None is a value (the default is computed by the run: stride, phases, base size …)."""
        return self.default is None

    def bounds(self, **context) -> tuple:
        """(lo, hi) with a named bound (e.g. hi="window") taken from ``context`` (None: unbounded)."""
        pick = lambda b: context.get(b) if isinstance(b, str) else b  # noqa: E731
        return pick(self.lo), pick(self.hi)

    def range_text(self) -> str:
        """The range in words for help texts: "0 … 1000", "≥ 1", "on/off"."""
        if self.kind == "bool":
            return "on/off"
        lo, hi = self.lo, self.hi
        if lo is None and hi is None:
            return ""
        if hi is None:
            return f"{'>' if self.lo_open else '≥'} {lo}"
        return f"({lo}, {hi}]" if self.lo_open else f"{lo} … {hi}"

    def check(self, value, **context):
        """The normalised value, or an InputError naming the argument; None passes for optional knobs."""
        if value is None and self.optional:
            return None
        lo, hi = self.bounds(**context)
        try:
            hint = self.hint.format(**context)
        except (KeyError, IndexError, ValueError):
            hint = ""  # the hint needs what only the run knows
        if self.kind == "bool":
            return check_bool(self.name, value)
        if self.kind == "int":
            return check_int(self.name, value, lo, hi, hint)
        if self.kind == "float":
            return check_float(self.name, value, lo, hi, hint, self.lo_open)
        if self.kind == "ints":
            return check_ints(self.name, value, lo, hi, hint)
        return value  # sizes: checked against the target by the run (settings.resolve_sizes)

    def parse(self, text: str):
        """A value typed as text (the command line), converted and checked."""
        return self.check(self.convert(text))

    def convert(self, text: str):
        """A value typed as text (the command line, the page) → its type; unchecked (the run checks
        it with the bounds only it knows, e.g. stride ≤ the window)."""
        text = str(text).strip()
        if self.kind == "bool":
            words = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False,
                     "no": False}
            if text.lower() not in words:
                raise InputError(f"{self.name} must be on or off, got {text!r}")
            return words[text.lower()]
        if self.kind in ("sizes", "ints"):
            try:
                return (parse_sizes if self.kind == "sizes" else parse_ints)(text)
            except InputError as e:
                raise InputError(f"{self.name} {e}") from None
        try:
            value = float(text)
            value = int(value) if self.kind == "int" and value.is_integer() and "." not in text else value
        except ValueError:
            what = "a whole number" if self.kind == "int" else "a number"
            raise InputError(f"{self.name} must be {what}, got {text!r}") from None
        if self.kind == "int" and not isinstance(value, int):
            raise InputError(f"{self.name} must be a whole number, got {text!r}")
        return value


def knobs(cls=None) -> list[Knob]:
    """The knobs of a config class (DemoFusionConfig or a subclass), in field order."""
    cls = cls or DemoFusionConfig
    return [Knob(f.name, f.default, **f.metadata) for f in dataclasses.fields(cls) if "kind" in f.metadata]


def knob_names(cls=None) -> list[str]:
    return [k.name for k in knobs(cls)]


def config_defaults(cls=None) -> dict:
    return {k.name: k.default for k in knobs(cls)}


def run_id_items(params: dict, cls=None) -> dict:
    """The knobs a run id hashes: those older ids hold always, any other only when not its default."""
    return {k.name: params.get(k.name, k.default) for k in knobs(cls)
            if k.always_in_run_id or params.get(k.name, k.default) != k.default}


def check_config(cfg, **context):
    """``cfg`` with every knob checked and normalised (512.0 → 512); ``context`` fills named bounds."""
    values = {k.name: k.check(getattr(cfg, k.name), **context) for k in knobs(type(cfg))}
    return dataclasses.replace(cfg, **values) if values != {k: getattr(cfg, k) for k in values} else cfg


def split_overrides(kwargs: dict, cls=None) -> tuple[dict, dict]:
    """(the knobs among ``kwargs``, the rest)."""
    names = set(knob_names(cls))
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}


def with_overrides(config, overrides: dict, **context):
    """``config`` (None: the defaults) with keyword overrides, every knob checked; ``context``
    (e.g. ``window=``) fills the bounds only a run knows, so errors name them."""
    if config is None:
        config = DemoFusionConfig()
    if not isinstance(config, DemoFusionConfig):
        raise InputError(f"config must be a DemoFusionConfig, got {_type_name(config)}")
    by_name = {k.name: k for k in knobs(type(config))}
    checked = {n: by_name[n].check(v, **context) for n, v in overrides.items()}  # before __post_init__ sees them
    return check_config(dataclasses.replace(config, **checked) if checked else config, **context)


# ---- the knobs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoFusionConfig:
    """The paper's knobs (Du et al., CVPR 2024) and the reference's defaults. ``pipe(...,
    config=cfg, **overrides)``; every field is a ``demofusion generate --<name-with-dashes>`` flag.
    Values are checked when the config is made (ranges here; those that depend on the run, such
    as stride ≤ the window, when a run is validated)."""

    phases: int | None = knob(
        None, "Number of phases; default ⌊max(height, width) / base size⌋.", "int", lo=1, hi=MAX_PHASES,
        hint="; leave it out for ⌊max(height, width) / base⌋", always_in_run_id=True)
    phase_sizes: list | None = knob(
        None, "Explicit (height, width) in px of every phase, ending with the target size; default: from the size.",
        "sizes", label="Phase sizes", metavar="HxW,HxW,...", always_in_run_id=True)
    view_batch_size: int | None = knob(
        None, "Views per UNet call (the batch size of the denoising paths): larger is faster but needs more GPU "
        "memory; default 16, or fewer as the memory budget needs. Results do not depend on it.", "int", lo=1,
        hint=" (views per UNet call; None: what max_memory allows)", always_in_run_id=True)
    stride: int | None = knob(
        None, "The stride of moving local patches, in latents (window = base size / 8). A smaller stride "
        "alleviates seams but costs more views and time; default half the window (64 on SDXL, 16 on tiny).",
        "int", lo=1, hi="window", hint=" latents (the window is base size / 8 = {window}; e.g. stride={half})",
        always_in_run_id=True)
    cosine_scale_1: float = knob(
        3.0, "Decay of the skip residual (α1): smaller keeps closer to the previous phase but may show more "
        "upsampling noise. See Appendix C of the DemoFusion paper.", "float", lo=0.0, hi=1000.0,
        always_in_run_id=True)
    cosine_scale_2: float = knob(
        1.0, "Decay of dilated sampling (α2): smaller fights repetition better but may look grainy. See "
        "Appendix C of the paper.", "float", lo=0.0, hi=1000.0, always_in_run_id=True)
    cosine_scale_3: float = knob(
        1.0, "Decay of the Gaussian filter (α3): smaller is less grainy but may over-smooth. See Appendix C of "
        "the paper.", "float", lo=0.0, hi=1000.0, always_in_run_id=True)
    sigma: float = knob(
        0.8, "Standard deviation of the Gaussian filter before dilated sampling: larger promotes global "
        "guidance but may over-smooth; 0 means no blur.", "float", lo=0.0, hi=100.0, hint=" (0 means no blur)",
        always_in_run_id=True)
    multi_decoder: bool = knob(
        True, "Decode large phases in tiles (the VAE's memory grows with the picture); needed from about "
        "3072×3072 on a GPU.", "bool", label="Multi-decoder", always_in_run_id=True)
    skip_residual: bool = mechanism(
        "Skip residual: each step starts from a mix with the upsampled previous phase, noised to the step.")
    local_paths: bool = mechanism("MultiDiffusion local paths: overlapping windows of the base size, averaged.")
    dilated_sampling: bool = mechanism(
        "Dilated sampling: global paths of every k-th latent, fused with the local paths.")
    dilated_blur: bool = mechanism("Gaussian blur before dilated sampling (σ = 0 is the same as off).")
    renormalise: bool = mechanism("Renormalise the fused latents to the mean and std they had before fusion.")
    view_jitter: bool = mechanism("Random jitter of the local windows, so their seams move from step to step.")
    base_size: int | None = knob(
        None, "The model's native size in px, the size of phase 1's long side and of a window × 8; default: "
        "the model's (1024 for SDXL, 512 for Turbo).", "int", lo=64, hi=16384)
    upscale_strength: float = knob(
        1.0, "Fraction of the schedule every upscaling phase runs: it starts from the upsampled latent noised to "
        "the step where this fraction remains (SDEdit-style), not from pure noise; 1 is the paper (all steps), "
        "0.5 runs the last half.", "float", lo=0.0, hi=1.0, lo_open=True, label="Upscale strength")
    steps_per_phase: list | None = knob(
        None, "Steps of each phase, e.g. 30,20,20 (one number per phase); default: every phase takes the "
        "run's steps.", "ints", lo=1, hi=1000, metavar="N,N,...", label="Steps per phase")

    def __post_init__(self):
        for k in knobs(type(self)):  # a config holds checked values only
            object.__setattr__(self, k.name, k.check(getattr(self, k.name)))


# Memory sizes a user writes (max_memory): decimal and binary units.
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(v, name: str = "max_memory"):
    """``max_memory`` → bytes (int), ``"auto"`` or None. Strings: a number and a unit, "8GB" (10⁹
    bytes), "8GiB" (2³⁰), "7.5 GiB", "8000MB"; an int is bytes."""
    if v is None or v == "auto":
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        if v <= 0:
            raise InputError(f"{name} {v}: a budget must be positive; write it like 8GB or 8GiB")
        return v
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)\s*", v, re.I) if isinstance(v, str) else None
    if m is None:
        raise InputError(f"{name} {v!r}: not a memory size; write it like 8GB (10⁹ bytes), 8GiB (2³⁰), 7.5GiB "
                         "or 8000MB, or auto (the device's free memory)")
    n = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if n <= 0:
        raise InputError(f"{name} {v!r}: a budget must be positive")
    return n
