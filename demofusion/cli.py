"""The `demofusion` command: generate, ablate, download, inspect (see docs/cli.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

META_KEY = "demofusion"  # PNG text chunk holding the generation parameters as JSON
RUN_FILE = "run.json"
TINY_NOTE = ("note: 'tiny' is an UNTRAINED model with random weights — the pictures are structured noise, "
             "not art. For real images: `demofusion download sdxl-base --dir weights/` then "
             "`--model weights/sdxl-base` (see weights/README.md).")

# DemoFusion knobs: (name, type, default, help) with the reference's names and defaults
KNOBS = [
    ("view_batch_size", int, 16, "views per UNet call (lower it when out of memory)"),
    ("stride", int, None, "MultiDiffusion view stride in latents; default half the window: 64 for SDXL, 16 for tiny"),
    ("cosine_scale_1", float, 3.0, "skip-residual decay exponent (α1)"),
    ("cosine_scale_2", float, 1.0, "dilated-sampling weight exponent (α2)"),
    ("cosine_scale_3", float, 1.0, "Gaussian-blur weight exponent (α3)"),
    ("sigma", float, 0.8, "Gaussian blur std for dilated sampling"),
]
SWITCHES = [  # on by default; --no-<name> turns off
    ("multi_decoder", "tiled VAE decoding of large phases"),
    ("skip_residual", "skip residual from the upsampled previous phase"),
    ("local_paths", "MultiDiffusion local views"),
    ("dilated_sampling", "dilated global paths"),
    ("dilated_blur", "Gaussian blur before dilated sampling"),
    ("renormalise", "renormalise fused latents"),
    ("view_jitter", "random view jitter"),
]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ---- arguments ------------------------------------------------------------------------------
def _phase_sizes_arg(text: str) -> list[list[int]]:
    """``"1024x1024,2048x2048"`` → [[1024, 1024], [2048, 2048]] (height × width, px)."""
    try:
        sizes = [[int(v) for v in part.lower().split("x")] for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = None
    if not sizes or any(len(hw) != 2 for hw in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: give HEIGHTxWIDTH pairs separated by commas, e.g. 1024x1024,2048x2048")
    return sizes


def _add_generation_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--prompt", default=d("a photo of a lighthouse at dawn, highly detailed"))
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default=d(None))
    p.add_argument("--height", type=int, default=d(3072))
    p.add_argument("--width", type=int, default=d(3072))
    p.add_argument("--steps", "--num-inference-steps", dest="num_inference_steps", type=int, default=d(50))
    p.add_argument("--guidance", "--guidance-scale", dest="guidance_scale", type=float, default=d(7.5))
    p.add_argument("--seed", type=int, default=d(0))
    p.add_argument("--phases", type=int, default=None, help="number of phases (default: from the size)")
    p.add_argument("--phase-sizes", dest="phase_sizes", type=_phase_sizes_arg, default=None, metavar="HxW,HxW,...",
                   help="explicit size of every phase, ending with --height x --width (default: from the size)")
    for name, typ, default, help_ in KNOBS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=d(default), help=f"{help_} (default {default})")
    for name, help_ in SWITCHES:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                       default=d(True), help=f"{help_} (default on)")
    p.add_argument("--model", default=d("tiny"), help="a path, or a preset: tiny, sdxl-base, sdxl-turbo")
    p.add_argument("--device", default=d("cpu"))
    p.add_argument("--dtype", default=d("float32"), help="float32, float16 or bfloat16")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the UNet (MODE: default, reduce-overhead = CUDA graphs, max-autotune); "
                        "compiling takes minutes, then each step is faster")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="demofusion", description="DemoFusion high-resolution generation (SDXL / SDXL-Turbo).")
    ap.add_argument("--version", action="version", version=f"demofusion {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image, one PNG per phase")
    _add_generation_args(g, defaults=False)
    g.add_argument("--out", default=None, help="output folder (default out/)")
    g.add_argument("--from-image", default=None, help="reproduce from a PNG written by demofusion")
    g.add_argument("--resume", default=None, help="continue an interrupted run in this folder")
    g.add_argument("--stop-after-phase", type=int, default=None, help="stop after phase N (resume later)")
    g.add_argument("--no-progress", dest="progress", action="store_false")

    a = sub.add_parser("ablate", help="the same seed across mechanism switches and knob sweeps → contact sheet")
    _add_generation_args(a)
    a.add_argument("--out", default="out/ablation")
    a.add_argument("--grid", default="full,no-skip-residual,no-dilated-sampling,no-local-paths,progressive-only",
                   help=f"comma list of: {', '.join(ABLATIONS)}")
    a.add_argument("--sweep", action="append", default=[], metavar="KNOB=V1,V2",
                   help="knob sweep on the full model, e.g. --sweep cosine_scale_1=1,3,5 (repeatable)")

    d = sub.add_parser("download", help="download SDXL weights (only the files we load)")
    d.add_argument("model", choices=["sdxl-base", "sdxl-turbo"])
    d.add_argument("--dir", default="weights")
    d.add_argument("--variant", default=None, choices=["fp16"])
    d.add_argument("--single-file", action="store_true", help="the one-file SGM checkpoint instead")

    i = sub.add_parser("inspect", help="describe a checkpoint without loading it")
    i.add_argument("path")
    return ap


ABLATIONS = {
    "full": {},
    "no-skip-residual": {"skip_residual": False},
    "no-dilated-sampling": {"dilated_sampling": False},
    "no-local-paths": {"local_paths": False},
    "progressive-only": {"skip_residual": False, "dilated_sampling": False},  # plain MultiDiffusion upscaling
    "no-dilated-blur": {"dilated_blur": False},
    "no-renormalise": {"renormalise": False},
}


# ---- helpers ----------------------------------------------------------------------------
def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device} was requested but CUDA is not available here; use --device cpu "
                       "(or install a CUDA build of torch)")
    if device.startswith("mps") and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device} was requested but MPS is not available here; use --device cpu")


def _check_size(h: int, w: int) -> None:
    for name, v in (("height", h), ("width", w)):
        if v % 8:
            raise CLIError(f"--{name} {v} is not a multiple of 8; use {v // 8 * 8} or {-(-v // 8) * 8}")


def load_pipeline(model: str, device: str, dtype: str, compile_mode: str | None = None):
    import torch

    from .pipeline import DemoFusionPipeline
    from .weights import WeightsError, parse_dtype

    _check_device(device)
    try:
        dt = parse_dtype(dtype)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--dtype {dtype}: {e}") from e
    if dt != torch.float32 and device == "cpu":
        print(f"note: {dtype} on CPU is slow and not always supported; float32 is the CPU default", file=sys.stderr)
    try:
        pipe = DemoFusionPipeline.from_pretrained(model, device=device, dtype=dt)
    except (WeightsError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0]
        if "demofusion download" not in msg:
            msg += " — get weights with `demofusion download sdxl-base --dir weights/`"
        raise CLIError(msg) from e
    if compile_mode is not None:
        pipe.compile(mode=None if compile_mode == "default" else compile_mode)
    return pipe


def model_fingerprint(pipe, model: str) -> str:
    """sha256 (first 16 hex) of the UNet weights file (first 64 MiB + size), or of the tiny preset's state."""
    path = Path(model)
    if path.exists():
        from .weights import resolve_component

        f = Path(resolve_component(path, "unet", ["diffusion_pytorch_model"])[0]) if path.is_dir() else path
        h = hashlib.sha256(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(64 << 20))
        return h.hexdigest()[:16]
    h = hashlib.sha256()
    for k, v in pipe.unet.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _warn_long_prompt(pipe, params: dict) -> None:
    for key in ("prompt", "negative_prompt"):
        text = params.get(key)
        tok = getattr(getattr(pipe, "text", None), "tokenizer", None)
        if not text or tok is None:
            continue
        ids = tok.encode(text)
        keep = tok.max_length - 2
        if len(ids) > keep:
            print(f"warning: {key} has {len(ids) + 2} tokens, more than CLIP's {tok.max_length}; "
                  f"this part was cut off: {tok.decode(ids[keep:])!r}", file=sys.stderr)


def _pipe_kwargs(params: dict) -> dict:
    keys = ["prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "seed", "phases",
            "phase_sizes"]
    keys += [k for k, *_ in KNOBS] + [k for k, _ in SWITCHES]
    return {k: params[k] for k in keys if k in params}


def save_png(img, path: Path, params: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(META_KEY, json.dumps(params, sort_keys=True))
    info.add_text("parameters", params.get("prompt") or "")
    img.save(path, pnginfo=info)


def read_png_params(path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        text = im.text.get(META_KEY) if hasattr(im, "text") else None
    if text is None:
        raise CLIError(f"{path} carries no demofusion metadata (was it written by `demofusion generate`?)")
    return json.loads(text)


def _oom_message(e: Exception) -> str:
    return (f"out of memory ({str(e).splitlines()[0][:120]}). Try a smaller --view-batch-size (e.g. 4), "
            "keep --multi-decoder on (tiled VAE decode), --dtype float16 on GPU, or a smaller --height/--width")


def _is_oom(e: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _peak_memory(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    try:
        import resource

        return f"peak process RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    except ImportError:
        return "peak memory unknown"


class _Stop(Exception):
    pass


# ---- generate ---------------------------------------------------------------------------------
def _generation_params(args) -> tuple[dict, Path, list]:
    """(params, out folder, finished-phase latents) from --resume, --from-image or the flags."""
    from safetensors.torch import load_file

    from . import __version__

    given = {k: v for k, v in vars(args).items() if v is not None}
    done = []
    if args.resume:
        out = Path(args.resume)
        if not (out / RUN_FILE).is_file():
            raise CLIError(f"--resume {out}: no {RUN_FILE} there (not a demofusion output folder)")
        params = json.loads((out / RUN_FILE).read_text())
        while (out / f"phase_{len(done) + 1}.safetensors").is_file():
            done.append(load_file(str(out / f"phase_{len(done) + 1}.safetensors"))["latents"])
        return params, out, done
    defaults = vars(build_parser().parse_args(["ablate"]))  # the generation defaults live on `ablate`
    params = {k: defaults[k] for k in _pipe_kwargs(defaults) | {"model": 0, "device": 0, "dtype": 0}}
    params["phases"] = None
    if args.from_image:
        params.update(read_png_params(args.from_image))
    cli_keys = set(_pipe_kwargs(given)) | ({"model", "device", "dtype"} & set(given))
    params.update({k: given[k] for k in cli_keys})
    params["version"] = __version__
    params.pop("phase", None)
    return params, Path(args.out or "out"), done


def cmd_generate(args) -> int:
    import torch

    params, out, done = _generation_params(args)
    _check_size(params["height"], params["width"])
    _check_device(params["device"])
    t0 = time.perf_counter()
    pipe = load_pipeline(params["model"], params["device"], params["dtype"], args.compile)
    if params["model"] == "tiny":
        print(TINY_NOTE)
    fp = model_fingerprint(pipe, params["model"])
    if params.get("model_hash") not in (None, fp):
        print(f"warning: model hash {fp} differs from the one recorded ({params['model_hash']}); "
              "the pictures will not match", file=sys.stderr)
    params["model_hash"] = fp
    params["stride"] = params.get("stride") or pipe.base_size // 16
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(params, indent=2, sort_keys=True))
    _warn_long_prompt(pipe, params)
    if done:
        print(f"resuming {out}: phases 1–{len(done)} already finished")

    def on_phase_end(k, image, latents):
        from safetensors.torch import save_file

        save_file({"latents": latents.detach().contiguous().cpu()}, str(out / f"phase_{k}.safetensors"))
        if image is not None:
            save_png(image, out / f"phase_{k}.png", {**params, "phase": k})
            print(f"phase {k}: {image.width}×{image.height} → {out / f'phase_{k}.png'}")
        if args.stop_after_phase is not None and k >= args.stop_after_phase:
            raise _Stop(k)

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="prompt is longer")
            result = pipe(**_pipe_kwargs(params), on_phase_end=on_phase_end, resume_latents=done or None,
                          progress=args.progress)
    except _Stop as s:
        print(f"stopped after phase {s.args[0]} as asked; continue with `demofusion generate --resume {out}`")
        return 0
    except KeyboardInterrupt:
        raise CLIError(f"interrupted; finished phases are saved in {out} — continue with "
                       f"`demofusion generate --resume {out}`") from None
    except ValueError as e:
        raise CLIError(str(e).splitlines()[0]) from e
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if _is_oom(e):
            raise CLIError(_oom_message(e)) from e
        raise
    total = time.perf_counter() - t0
    phases = ", ".join(f"{h}×{w}: {t:.1f}s" for (h, w), t in zip(result.phase_sizes, result.timings))
    print(f"done in {total:.1f}s ({phases}); {_peak_memory(params['device'])}; final image {out / f'phase_{len(result.phase_sizes)}.png'}")
    return 0


# ---- ablate ---------------------------------------------------------------------------------
def _parse_sweeps(sweeps: list[str]) -> list[tuple[str, dict]]:
    types = {k: t for k, t, *_ in KNOBS} | {"num_inference_steps": int, "guidance_scale": float}
    cells = []
    for s in sweeps:
        if "=" not in s:
            raise CLIError(f"--sweep {s!r}: write KNOB=V1,V2 (knobs: {', '.join(types)})")
        k, vals = s.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in types:
            raise CLIError(f"--sweep: unknown knob {k!r}; choose from {', '.join(types)}")
        cells += [(f"{k}={v}", {k: types[k](v)}) for v in vals.split(",") if v]
    return cells


def contact_sheet(images: list, labels: list[str], cols: int | None = None, label_h: int = 18):
    from PIL import Image, ImageDraw

    cols = cols or min(len(images), 4)
    rows = -(-len(images) // cols)
    w, h = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("RGB", (cols * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (img, label) in enumerate(zip(images, labels)):
        x, y = (n % cols) * w, (n // cols) * (h + label_h)
        draw.text((x + 4, y + 3), label, fill="black")
        sheet.paste(img, (x, y + label_h))
    return sheet


def cmd_ablate(args) -> int:
    params = {k: v for k, v in vars(args).items() if k in _pipe_kwargs(vars(args))}
    _check_size(params["height"], params["width"])
    names = [n.strip() for n in args.grid.split(",") if n.strip()]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise CLIError(f"--grid: unknown cell(s) {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
    cells = [(n, ABLATIONS[n]) for n in names] + _parse_sweeps(args.sweep)
    pipe = load_pipeline(args.model, args.device, args.dtype, args.compile)
    if args.model == "tiny":
        print(TINY_NOTE)
    params["stride"] = params.get("stride") or pipe.base_size // 16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"base": {**params, "model": args.model, "model_hash": model_fingerprint(pipe, args.model)}, "cells": []}
    finals = []
    for name, change in cells:
        cell = {**params, **change}
        folder = out / name.replace("=", "_")
        folder.mkdir(exist_ok=True)
        try:
            res = pipe(**cell, preview_dir=folder)
        except ValueError as e:
            raise CLIError(f"cell {name}: {str(e).splitlines()[0]}") from e
        except RuntimeError as e:
            if _is_oom(e):
                raise CLIError(f"cell {name}: {_oom_message(e)}") from e
            raise
        finals.append(res.images[-1])
        record["cells"].append({"name": name, "changes": change, "settings": cell,
                                "images": [str(folder / f"phase_{k + 1}.png") for k in range(len(res.images))]})
        print(f"{name}: {folder}")
    sheet = contact_sheet(finals, [n for n, _ in cells])
    save_png(sheet, out / "contact_sheet.png", record["base"])
    (out / "ablation.json").write_text(json.dumps(record, indent=2))
    print(f"contact sheet: {out / 'contact_sheet.png'}; settings: {out / 'ablation.json'}")
    return 0


# ---- download / inspect ---------------------------------------------------------------------
def cmd_download(args) -> int:
    from .hub import DownloadError, download

    try:
        path = download(args.model, args.dir, args.variant, args.single_file)
    except DownloadError as e:
        raise CLIError(str(e)) from e
    print(f"downloaded to {path}; use it with `demofusion generate --model {path}`")
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect
    from .weights import WeightsError

    try:
        print(inspect(args.path).text())
    except WeightsError as e:
        raise CLIError(str(e).splitlines()[0]) from e
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = {"generate": cmd_generate, "ablate": cmd_ablate, "download": cmd_download, "inspect": cmd_inspect}[args.command]
    try:
        return cmd(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished phases are saved — continue with `demofusion generate --resume OUT`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
