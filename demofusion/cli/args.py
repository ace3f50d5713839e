"""The command line's arguments: one parser, whose errors are one line (exit 2) like every other."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..config import GUIDANCE_MAX, knobs
from ..errors import InputError
from ..frontend.loading import COMPILE_MODES
from ..placement import POLICIES as OFFLOAD
from ..run_presets import PRESET_NAMES
from ..schedulers.names import SAMPLER_NAMES, SIGMAS
from ..schedulers.schedule import SPACINGS



def ablations(cls=None) -> dict:
    """The ``ablate --grid`` cells: the full model, "no-<knob>" for each ablation switch of the
    config (its field metadata says ``ablation``), and plain MultiDiffusion upscaling."""
    cells = {"full": {}}
    cells |= {f"no-{k.name.replace('_', '-')}": {k.name: False} for k in knobs(cls) if k.ablation}
    return cells | {"progressive-only": {"skip_residual": False, "dilated_sampling": False}}


ABLATIONS = ablations()


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr and exit 2 (no usage dump)."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


class KnobType:
    """argparse ``type=`` of a config knob: parsed and range-checked by the knob itself, so a bad
    value is argparse's one line ("argument --stride: must be ≥ 1, got 0")."""

    def __init__(self, knob):
        self.knob = knob
        self.__name__ = knob.kind  # argparse names the type in some messages

    def __call__(self, text: str):
        try:
            return self.knob.parse(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{self.knob.name} ")) from None


def add_config_flags(p: argparse.ArgumentParser, cls=None) -> None:
    """A ``--<field-with-dashes>`` flag for every field of a DemoFusionConfig (sub)class: help, default
    and range from its metadata; on/off knobs as ``--x/--no-x``. Default None: the caller tells
    given flags from defaults."""
    for k in knobs(cls):
        said = [] if k.optional else [f"default {({True: 'on', False: 'off'}).get(k.default, k.default)}"]
        said += [k.range_text()] if k.range_text() and k.kind != "bool" else []  # optional: the help says the default
        help_ = (k.help + (f" ({'; '.join(said)})" if said else "")).replace("%", "%%")
        if k.kind == "bool":
            p.add_argument(k.flag, dest=k.name, action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument(k.flag, dest=k.name, type=KnobType(k), metavar=k.metavar, help=help_)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """Every generation flag, default None: the caller tells given flags from defaults (DEFAULTS)."""
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt")
    p.add_argument("--height", type=int, help="pixels (default 3072, or the image size × --scale with an image)")
    p.add_argument("--width", type=int)
    p.add_argument("--steps", "--num-inference-steps", dest="num_inference_steps", type=int, help="default 50")
    p.add_argument("--guidance", "--guidance-scale", dest="guidance_scale", type=float,
                   help=f"classifier-free guidance scale (default 7.5; 0 … {GUIDANCE_MAX:g}; ≤ 1 turns guidance off)")
    p.add_argument("--seed", type=int, help="0 … 2**64−1 (default 0)")
    add_config_flags(p)
    _add_control_args(p)
    p.add_argument("--model", help="a path, or a preset: tiny (default), sdxl-base, sdxl-turbo")
    p.add_argument("--scheduler", metavar="NAME",
                   help=f"the sampler, on the model's own schedule: {', '.join(SAMPLER_NAMES)}, or an A1111/ComfyUI "
                        "name such as 'DPM++ 2M Karras' or dpmpp_2m (default: the model's scheduler config)")
    p.add_argument("--sigmas", choices=SIGMAS, help="the σ schedule of euler, heun, dpm++*, unipc (default: the model's)")
    p.add_argument("--timestep-spacing", dest="timestep_spacing", choices=SPACINGS,
                   help="how the steps are spread (default: the model's: leading for SDXL base, trailing for Turbo)")
    p.add_argument("--preset", choices=PRESET_NAMES,
                   help="sampler, spacing, steps, guidance (and upscale strength) as the model family's card says; "
                        "flags given override it (docs/components.md, Presets)")
    p.add_argument("--vae", metavar="PATH", help="another VAE: a diffusers VAE folder or one .safetensors "
                   "(e.g. madebyollin/sdxl-vae-fp16-fix)")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="a LoRA (kohya/A1111 or diffusers/PEFT .safetensors), fused at SCALE (default 1); repeatable")
    p.add_argument("--truncate-prompts", dest="truncate_prompts", action="store_true", default=None,
                   help="cut prompts at CLIP's 77 tokens, no weighting syntax (diffusers' behaviour); default: "
                        "long prompts in 75-token chunks, A1111 (word:1.3) weights")
    p.add_argument("--device", help="auto (default: cuda, then mps, else cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", help="auto (default: float16 on cuda/mps, float32 on cpu), float32, float16 or bfloat16")
    p.add_argument("--max-memory", dest="max_memory", metavar="SIZE",
                   help="GPU memory budget, e.g. 8GB (10⁹ bytes), 8GiB or auto (the free memory): placement, view "
                        "batch and VAE tiles are planned so every stage fits (docs/big-images.md)")
    p.add_argument("--offload", choices=OFFLOAD, help="none (default), model (each component on the GPU only while "
                   "it works) or sequential (UNet weights stream through the GPU); default: --max-memory's pick")
    p.add_argument("--view-ranks", dest="view_ranks", type=int, metavar="N",
                   help="split each step's views as N ranks do (default: torchrun's rank count, else 1): one process "
                        "with --view-ranks N writes the files of a run on N ranks, bit for bit (docs/big-images.md)")
    p.add_argument("--fp8", action="store_true", default=None,
                   help="store the UNet's weights as fp8 (half the memory, small error: docs/big-images.md)")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help=f"torch.compile the UNet (MODE: {', '.join(COMPILE_MODES)}); compiling takes minutes, "
                        "then each step is faster")
    p.add_argument("--force", action="store_true", default=None,
                   help="run sizes beyond 16384 px or with phase 1 under half the base size")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing --out folder")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--debug", action="store_true", help="show the traceback of internal errors")


def _add_control_args(p) -> None:
    p.add_argument("--controlnet", action="append", metavar="PATH",
                   help="an SDXL ControlNet (diffusers folder or .safetensors; 'tiny' fits the tiny model); "
                        "repeat for several")
    p.add_argument("--control-image", dest="control_image", action="append", metavar="FILE",
                   help="a ready control map (edges, depth …) for the next ControlNet; any size, resized per phase")
    p.add_argument("--control", choices=["canny"],
                   help="compute the first ControlNet's map: Canny edges (OpenCV) of --control-source or --image")
    p.add_argument("--control-source", dest="control_source", metavar="FILE",
                   help="the picture --control canny reads (default: --image)")
    p.add_argument("--canny-low", dest="canny_low", type=int, help="Canny's lower threshold (default 100)")
    p.add_argument("--canny-high", dest="canny_high", type=int, help="Canny's upper threshold (default 200)")
    p.add_argument("--control-scale", dest="control_scale", type=float, action="append", metavar="S",
                   help="conditioning scale (default 1; the reference demo uses 0.5); once, or once per ControlNet")
    p.add_argument("--control-start", dest="control_start", type=float, action="append", metavar="F",
                   help="the fraction of the steps after which a ControlNet starts acting (default 0)")
    p.add_argument("--control-end", dest="control_end", type=float, action="append", metavar="F",
                   help="the fraction of the steps after which a ControlNet stops acting (default 1)")
    p.add_argument("--guess-mode", dest="guess_mode", action="store_true", default=None,
                   help="the ControlNets see only the conditional half (diffusers' guess mode)")


def build_parser() -> Parser:
    ap = Parser(prog="demofusion", description="DemoFusion high-resolution generation (SDXL / SDXL-Turbo).")
    ap.add_argument("--version", action="version", version=f"demofusion {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate an image, one PNG per phase")
    _add_generation_args(g)
    g.add_argument("--out", help="output folder (default: a new out/<date>-<time>-seed<seed>)")
    g.add_argument("--image", help="img2img: start from this picture (phase 1 is the picture, then DemoFusion upscales)")
    g.add_argument("--scale", type=float, help="with --image and no --height/--width: target = image size × scale (default 2)")
    g.add_argument("--prompts", metavar="FILE", help="one image per line of FILE (seed --seed + line), into --out "
                   "DIR as 0000.png …, sharded across ranks under torchrun; the same command again resumes")
    g.add_argument("--from-image", help="reproduce a PNG written by demofusion from its metadata (the file is only read)")
    g.add_argument("--ignore-hashes", dest="ignore_hashes", action="store_true",
                   help="with --from-image: replay even when a file (model, VAE, LoRA, ControlNet, picture, control "
                        "source) differs from the one recorded; a warning names each")
    g.add_argument("--resume", help="continue an interrupted run in this folder")
    g.add_argument("--stop-after-phase", type=int, help="stop after phase N (resume later)")
    g.add_argument("--dry-run", action="store_true", help="check the settings, picture and output folder, print the phases and the work; load no weights, write nothing")

    u = sub.add_parser("upscale", help="img2img: upscale IMAGE with DemoFusion (generate --image IMAGE)")
    u.add_argument("image", help="the picture to upscale (any format Pillow reads)")
    _add_generation_args(u)
    u.add_argument("--out", help="output folder (default: a new out/<date>-<time>-seed<seed>)")
    u.add_argument("--scale", type=float, help="target = image size × scale, unless --height/--width (default 2)")
    u.add_argument("--stop-after-phase", type=int, help="stop after phase N (resume later)")
    u.add_argument("--dry-run", action="store_true", help="check the settings, picture and output folder, print the phases and the work; load no weights, write nothing")

    a = sub.add_parser("ablate", help="the same seed across mechanism switches and knob sweeps → contact sheet")
    _add_generation_args(a)
    a.add_argument("--out", help="output folder (default: a new out/<date>-<time>-seed<seed>)")
    a.add_argument("--grid", default="full,no-skip-residual,no-dilated-sampling,no-local-paths,progressive-only",
                   help=f"comma list of: {', '.join(ABLATIONS)}")
    a.add_argument("--sweep", action="append", default=[], metavar="KNOB=V1,V2",
                   help="knob sweep on the full model, e.g. --sweep cosine_scale_1=1,3,5 (repeatable)")

    d = sub.add_parser("download", help="download SDXL weights (only the files we load)")
    d.add_argument("model", choices=["sdxl-base", "sdxl-turbo", "controlnet-canny-sdxl", "controlnet-canny-sdxl-mid",
                                     "controlnet-canny-sdxl-small"])
    d.add_argument("--dir", default="weights")
    d.add_argument("--variant", default=None, choices=["fp16"])
    d.add_argument("--single-file", action="store_true", help="the one-file SGM checkpoint instead")
    d.add_argument("--debug", action="store_true", help="show the traceback of internal errors")

    i = sub.add_parser("inspect", help="describe a checkpoint without loading it (and check it as loading would)")
    i.add_argument("path")
    i.add_argument("--debug", action="store_true", help="show the traceback of internal errors")

    w = sub.add_parser("ui", help="the browser UI with live phase previews (needs pip install -e '.[ui]'; docs/cli.md)")
    w.add_argument("--model", default="tiny", help="a path, or the preset tiny (default); loaded once at startup")
    w.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    w.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    w.add_argument("--controlnet", metavar="PATH", help="an SDXL ControlNet ('tiny' fits the tiny model): adds the "
                   "ControlNet tab")
    w.add_argument("--device", default="auto", help="auto (default: cuda, then mps, else cpu), cpu, cuda, cuda:N or mps")
    w.add_argument("--share", action="store_true", help="also publish a public gradio.live link (off by default)")
    w.add_argument("--out", default="out/ui", help="where each run's folder goes (default out/ui)")
    w.add_argument("--vae", metavar="PATH", help="another VAE (as generate --vae)")
    w.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="a LoRA fused at startup; repeatable")
    w.add_argument("--scheduler", metavar="NAME", help="the sampler (as generate --scheduler); the page's Sampler "
                   "menu picks another per run")
    w.add_argument("--sigmas", choices=SIGMAS, help="its σ schedule (as generate --sigmas)")
    w.add_argument("--timestep-spacing", dest="timestep_spacing", choices=SPACINGS)
    w.add_argument("--debug", action="store_true", help="show the traceback of internal errors")
    return ap
