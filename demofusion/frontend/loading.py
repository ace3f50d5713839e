"""Loading a run's model as both front ends do, with the checks made before any weights load:
the device and dtype (present here, known), the compile mode, the LoRA specs; then the pipeline with
its VAE, LoRAs, ControlNets and sampler, and the fingerprint a run records of each weights file."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ..devices import default_dtype, resolve_device
from ..errors import InputError, first_line
from ..lora import check_scale
from ..pipeline.pipeline import DemoFusionPipeline
from ..schedulers import sampler_key
from ..weights import WeightsError, parse_dtype, resolve_component
from .errors import CLIError
from .runs import as_flag

TINY_NOTE = ("note: 'tiny' is an UNTRAINED model with random weights — the pictures are structured noise, "
             "not art. For real images: `demofusion download sdxl-base --dir weights/` then "
             "`--model weights/sdxl-base` (see weights/README.md).")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---- checks that need no weights --------------------------------------------------------------
def check_device(device: str, present: bool = True) -> str:
    """The device a run uses (``auto`` resolved), checked to be present here (unless ``present``
    is False: a dry run may plan for a device this machine lacks)."""
    import torch

    try:
        dev = resolve_device(device)  # parses and names the supported kinds (one place for both API and CLI)
    except InputError as e:
        raise CLIError(f"--device {device}: {str(e).split(': ', 1)[-1]}") from None
    if device == "auto" or not present:
        return str(dev)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device} was requested but CUDA is not available here; use --device cpu "
                       "(or install a CUDA build of torch)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device} was requested but MPS is not available here; use --device cpu")
    return device


def check_dtype(dtype: str, device: str = "cpu") -> str:
    """The dtype's name (``auto``: float16 on cuda/mps, float32 on cpu), checked."""
    if dtype == "auto":
        return str(default_dtype(device)).replace("torch.", "")
    try:
        parse_dtype(dtype)
        return dtype
    except (ValueError, TypeError):
        raise CLIError(f"--dtype {dtype}: unknown; use float32, float16 or bfloat16") from None


def check_compile(mode: str | None) -> str | None:
    if mode is not None and mode not in COMPILE_MODES:
        raise CLIError(f"--compile {mode}: unknown mode; use one of {', '.join(COMPILE_MODES)}")
    return mode

def cpu_dtype_warning(dtype: str) -> str:
    """Half precision on the CPU: most CPUs have no fast float16 kernels (runs reported 10–40× slower)."""
    if dtype == "float16":
        return ("warning: float16 on the CPU is 10–40× slower than float32 (no fast float16 kernels on most CPUs); "
                "leave out --dtype (float32 is the CPU default)")
    return f"note: {dtype} on the CPU is slower than float32 on most CPUs; float32 is the CPU default"


# ---- loading ----------------------------------------------------------------------------------
def load_pipeline(params: dict, compile_mode: str | None = None):
    """The run's pipeline: ``params``' model, device, dtype, fp8, VAE, LoRAs, ControlNets and sampler."""
    import torch

    model, device, dtype = params["model"], params["device"], params["dtype"]
    check_device(device)
    dt = parse_dtype(check_dtype(dtype, device))
    check_compile(compile_mode)
    if dt != torch.float32 and device == "cpu":
        print(cpu_dtype_warning(check_dtype(dtype, device)), file=sys.stderr)
    try:
        pipe = DemoFusionPipeline.from_pretrained(model, device=device, dtype=dt, fp8=bool(params.get("fp8")),
                                                  controlnet=params.get("controlnet"), vae=params.get("vae"),
                                                  lora=parse_loras(params.get("lora")))
        if params.get("scheduler") or params.get("timestep_spacing") or params.get("sigmas"):
            pipe.set_scheduler(params.get("scheduler") or sampler_key(pipe.scheduler), params.get("timestep_spacing"),
                               params.get("sigmas"))
    except InputError as e:  # a ControlNet, VAE or LoRA that does not fit the model
        raise CLIError(as_flag(str(e))) from None
    except (WeightsError, FileNotFoundError) as e:
        msg = first_line(e)
        if "demofusion download" not in msg and "inspect" not in msg:
            msg += f" — check it with `demofusion inspect {model}`"
        raise CLIError(msg) from None
    if compile_mode is not None:
        pipe.compile(mode=None if compile_mode == "default" else compile_mode)
    if model == "tiny":
        print(TINY_NOTE)
    return pipe


def model_fingerprint(pipe, model: str, component: str = "unet") -> str:
    """sha256 (first 16 hex) of the UNet's (``component``'s) weights file (first 64 MiB + size), or
    of the tiny preset's state; ``pipe``: the pipeline, or the module itself."""
    path = Path(model)
    if path.exists():
        f = Path(resolve_component(path, component, ["diffusion_pytorch_model"])[0]) if path.is_dir() else path
        h = hashlib.sha256(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(64 << 20))
        return h.hexdigest()[:16]
    h = hashlib.sha256()
    for k, v in getattr(pipe, "unet", pipe).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def parse_loras(specs) -> list | None:
    """``["a.safetensors:0.8", "b.safetensors"]`` → [(path, scale), …] (scale default 1); checked."""
    if not specs:
        return None
    out = []
    for spec in specs:
        path, _, scale = str(spec).rpartition(":") if ":" in str(spec) else (spec, "", "1")
        try:
            value = float(scale)
        except ValueError:
            if Path(path).expanduser().is_file() and not Path(str(spec)).expanduser().is_file():
                raise CLIError(f"--lora {spec}: the scale {scale!r} is not a number; give FILE:SCALE "
                               "(e.g. style.safetensors:0.8)") from None
            path, value = str(spec), 1.0  # a ':' inside the path (Windows drive), no scale
        if not path or not Path(path).expanduser().is_file():
            raise CLIError(f"--lora {spec}: no such file; give FILE or FILE:SCALE (e.g. style.safetensors:0.8)")
        out.append((path, _lora_scale(value, spec)))
    return out


def _lora_scale(value: float, spec) -> float:
    return check_scale(value, f"--lora {spec}: scale")
