"""What `demofusion inspect` adds to the loaders' checks: every value read (finite; within
float16's range, where a GPU run would hold it in float16), and the files that are not an SDXL
model — a LoRA, a ControlNet, the ``tiny`` preset — each said for what it is and how to use it."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from ..controlnet import ControlNet
from ..controlnet.loading import pick_config
from ..errors import first_line
from ..lora import LoraError, read_lora
from ..lora.formats import listing
from ..presets import tiny_components
from ..weights import WeightsError, build_meta, fit_problems, read_config, word_fit_problems
from .report import ComponentReport, Report, _meta

FP16_MAX = 65504.0  # the largest finite float16
_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
USAGE = {
    "model": "use it with `demofusion generate --model {path}`",
    "checkpoint": "use it with `demofusion generate --model {path}`",
    "vae": "a VAE alone: use it with `demofusion generate --model MODEL --vae {path}` (it replaces the model's VAE)",
    "unet": "a UNet alone cannot run: --model needs a folder with unet/, vae/, text_encoder/, text_encoder_2/ "
            "(put this file in its unet/) or a single-file checkpoint",
    "text_encoder": "a text encoder alone cannot run: put it in the text_encoder/ folder of a model",
    "text_encoder_2": "a text encoder alone cannot run: put it in the text_encoder_2/ folder of a model",
    "lora": "use it with `demofusion generate --lora {path}[:SCALE]` (SCALE -10 … 10, default 1)",
    "controlnet": "use it with `demofusion generate --controlnet {path} --control-image MAP` (or --control canny)",
}


def value_problems(tensors) -> tuple[list[str], list[str]]:
    """(keys holding NaN/Inf, keys holding finite values beyond ±65504) of ``(key, tensor)`` pairs."""
    bad, big = [], []
    for key, t in tensors:
        if not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            bad.append(key)
        elif t.dtype != torch.float16 and t.numel() and float(t.abs().max()) > FP16_MAX:
            big.append(key)
    return bad, big


def file_tensors(file: Path, prefix: str = ""):
    """The file's tensors under ``prefix``, one at a time (never the whole file in memory)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefix):
                yield key, f.get_tensor(key)


def check_values(rep, tensors) -> None:
    """Add to a ComponentReport what its values say: NaN/Inf is a problem (every picture would be
    NaN), values beyond float16's range a warning (the GPU default dtype would overflow)."""
    bad, big = value_problems(tensors)
    if bad:
        rep.problems.append(f"{rep.file}: {len(bad)} tensors hold NaN/Inf values ({listing(bad)}); the file is "
                            "damaged: re-download it")
    if big:
        rep.warnings.append(f"{len(big)} tensors hold values beyond float16's ±65504 ({listing(big)}): in float16 "
                            "(the GPU default) they overflow to Inf; run with --dtype bfloat16 or float32")
    rep.values_checked = True


def lora_report(path: Path, file: Path, header: dict, problems: list[str]):
    """A LoRA file: its layout and targets (read and checked as loading reads it, values too)."""
    rep = ComponentReport("lora", str(file), sum(math.prod(v["shape"]) for v in header.values()),
                          dict(Counter(v["dtype"] for v in header.values())), problems=list(problems))
    kind = "LoRA"
    if not problems:
        try:
            lora = read_lora(file)
            counts = Counter(t.component for t in lora.targets)
            kind = f"LoRA ({lora.layout} layout): {len(lora)} targets ({', '.join(f'{c}: {n}' for c, n in counts.items())})"
            rep.values_checked = True  # read_lora refuses NaN/Inf
        except LoraError as e:
            rep.problems.append(first_line(e))
    return Report(str(path), "LoRA file", kind, [rep], usage=USAGE["lora"].format(path=path))


def controlnet_report(path: Path, file: Path, header: dict, problems: list[str]):
    """An SDXL ControlNet: keys and shapes against the ControlNet its config (or shapes) describes."""
    rep = ComponentReport("controlnet", str(file), sum(math.prod(v["shape"]) for v in header.values()),
                          dict(Counter(v["dtype"] for v in header.values())), problems=list(problems))
    try:
        sd, cfg_json = _meta(header), read_config(file.parent)
        cfg, cfg_file = pick_config(sd, cfg_json, file.parent / "config.json")
        want = {k: v.shape for k, v in build_meta(lambda: ControlNet(cfg), "ControlNet", cfg_file).state_dict().items()}
        fit = fit_problems(want, sd)
        rep.missing, rep.unexpected = fit.missing, fit.unexpected
        rep.mismatched = [f"{k}: file {f} vs model {m}" for k, f, m in fit.mismatched]
        if fit:
            rep.problems.append(first_line(word_fit_problems(fit, "ControlNet", file)))
    except WeightsError as e:
        rep.problems.append(first_line(e))
    except Exception as e:  # too far from an SDXL ControlNet to build one: say so
        rep.note = f"key check not possible: {type(e).__name__}: {first_line(e)}"
    if not rep.problems:
        check_values(rep, file_tensors(file))
    return Report(str(path), "ControlNet", "SDXL ControlNet", [rep], usage=USAGE["controlnet"].format(path=path))


def tiny_report():
    """The ``tiny`` preset: built in memory from a fixed seed, no files."""
    unet, vae, text, _ = tiny_components()
    modules = {"unet": unet, "vae": vae, "text_encoder": text.text_encoder, "text_encoder_2": text.text_encoder_2}
    reps = []
    for name, m in modules.items():
        sd = m.state_dict()
        rep = ComponentReport(name, "built in memory", sum(v.numel() for v in sd.values()),
                              dict(Counter(_NAMES.get(v.dtype, str(v.dtype)) for v in sd.values())))
        check_values(rep, sd.items())
        reps.append(rep)
    return Report("tiny", "preset (built in memory from a fixed seed; no files)",
                  "tiny: an UNTRAINED SDXL-shaped model with random weights (structured noise, not pictures)", reps,
                  usage="use it with `demofusion generate --model tiny` (the default): tests and trying the command; "
                        "for pictures `demofusion download sdxl-base --dir weights/`")
