"""What `generate`, `upscale` and `ablate` share beyond what the UI shares too (frontend/): the
model's base size, the run's settings through the pipeline's own validation, the work line, the
memory plan and its --max-memory words, and the run's last lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..controlnet import ControlNetConfig
from ..errors import InputError
from ..fp8 import to_fp8_
from ..frontend.errors import CLIError
from ..frontend.runs import PLACEMENT_KEYS, RUN_KEYS, as_flag
from ..memory.fake import fake_controlnet
from ..memory.plan import BudgetError, Model, fmt, plan_run, preset_model
from ..pipeline.settings import check_int, validate
from ..presets import PRESETS, base_size, tiny_components, tiny_controlnet_config
from ..schedulers import SDXL_BASE_CONFIG
from ..schedulers.names import sampler_options
from ..tensors import weight_bytes
from ..weights import parse_dtype

# FLOPs of one SDXL UNet forward at batch 1 by latent window (docs/benchmarks.md)
SDXL_UNET_FLOPS = {128: 6.76e12, 64: 1.59e12, 32: 4.28e11}
WORK_WARNING = 2_000  # single-view UNet evaluations above which a CPU run of a real model is called out


def base_size_of(model: str, planning: bool = False) -> int:
    """The model's base size in px, read cheaply (preset, unet/config.json, or the file name).
    ``planning`` (a dry run): the SDXL presets need no weights."""
    if model == "tiny":
        return base_size("tiny")
    path = Path(model).expanduser()
    if planning and model in PRESETS and not path.exists():
        return base_size(model)
    if model in PRESETS and not path.exists():
        raise CLIError(f"'{model}' needs its weights: run `demofusion download {model} --dir weights/` and pass "
                       f"--model weights/{model} (only 'tiny' is built without downloads)")
    if not path.exists():
        raise CLIError(f"--model {model}: weights not found (no such file or folder); download them with "
                       "`demofusion download sdxl-base --dir weights/`")
    for cfg in (path / "unet" / "config.json", path / "config.json"):
        if cfg.is_file():
            try:
                return int(json.loads(cfg.read_text())["sample_size"]) * 8
            except (ValueError, KeyError, TypeError):
                raise CLIError(f"{cfg}: not a valid UNet config.json (no integer sample_size); re-download it") from None
    return base_size("sdxl-turbo" if "turbo" in path.name.lower() else "sdxl-base")


def run_settings(params: dict, base: int, stop_after: int | None = None, **extra):
    """The pipeline's validation of a run's parameters (before any weights are loaded)."""
    kw = {k: params.get(k) for k in RUN_KEYS}  # (a knob added later is missing from older records: its default)
    try:
        kw |= {k: params.get(k) for k in PLACEMENT_KEYS}
        check_sampler(params)
        s = validate(base, prompt=kw.pop("prompt"), **kw, force=bool(params.get("force")),
                     truncate_prompts=bool(params.get("truncate_prompts")), pipeline_sampler=params.get("scheduler"),
                     **extra)
        if stop_after is not None:
            check_int("--stop-after-phase", stop_after, 1, s.phases)
    except InputError as e:
        raise CLIError(as_flag(str(e))) from None
    return s


def report_work(s, device: str, model: str, layout=None, paper=None, preset: str | None = None) -> None:
    """First lines of a run: where it runs and how much work it is (warned above a threshold), the
    views counted on ``layout`` (a pipeline's ``mechanisms.view_layout``; default the algorithm's);
    with ``paper`` (the same run's Settings as the paper runs it), that work beside this one's."""
    evals = s.unet_evaluations(layout)
    sizes = " → ".join(f"{w}×{h}" for h, w in s.sizes)
    flops = lambda n: "" if model == "tiny" or s.window not in SDXL_UNET_FLOPS else \
        f" ≈ {n * SDXL_UNET_FLOPS[s.window]:.2e} FLOPs"  # noqa: E731 (SDXL's UNet; tiny's is another net)
    print(f"{s.phases} phase(s) {sizes}; {sum(evals):,} UNet evaluations of a {s.window}² latent view "
          f"({', '.join(f'{e:,}' for e in evals)}){flops(sum(evals))}")
    if paper is not None:
        ref = sum(paper.unet_evaluations(layout))
        what = f"preset {preset or s.preset}" if preset or s.preset else "these settings"
        print(f"work of {what}: {sum(evals):,} UNet evaluations{flops(sum(evals))}; the paper's default (50 steps, "
              f"guidance 7.5, every phase from pure noise): {ref:,}{flops(ref)} — {_times(ref, sum(evals))}")
    if device == "cpu" and model != "tiny" and sum(evals) > WORK_WARNING:
        print(f"warning: {sum(evals):,} SDXL UNet evaluations on the CPU take many hours (seconds to minutes "
              "each); use --device cuda if you have a GPU", file=sys.stderr)


def _times(ref: int, n: int) -> str:
    return f"{ref / n:.1f}× fewer" if n <= ref else f"{n / ref:.1f}× more"


def check_sampler(params: dict) -> None:
    """--scheduler, --sigmas and --timestep-spacing build a sampler (checked on SDXL's schedule
    before any weights load; the model's own config is applied when it does)."""
    if params.get("scheduler") or params.get("sigmas"):
        try:
            sampler_options(params.get("scheduler") or "euler", SDXL_BASE_CONFIG, params.get("timestep_spacing"),
                            params.get("sigmas"))
        except InputError as e:
            raise CLIError(f"--{e}" if str(e).startswith(("scheduler", "sigmas")) else str(e)) from None


def warn_long_prompt(pipe, params: dict) -> None:
    """With --truncate-prompts: say what CLIP's 77 tokens cut off (otherwise long prompts are chunked)."""
    if not params.get("truncate_prompts"):
        return
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


def peak_memory(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    try:
        import resource

        return f"peak process RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    except ImportError:
        return "peak memory unknown"


def memory_plan(s, params: dict):
    """The memory plan of settings ``s`` for ``params['model']`` without loading its weights (the
    tiny preset is built; files and folders are planned as the SDXL architecture of their base size)."""
    from types import SimpleNamespace

    import torch

    dt, fp8 = parse_dtype(params["dtype"]), bool(params.get("fp8"))
    if params["model"] == "tiny":
        unet, vae, text, _ = tiny_components()
        unet.to(dt), vae.to(dt), text.to(dtype=dt)
        if fp8:
            to_fp8_(unet)
        model = Model.of(SimpleNamespace(unet=unet, vae=vae, text=text))
    else:
        model = preset_model("sdxl-turbo" if s.base_size == 512 else "sdxl-base", dt, fp8)
    if params.get("controlnet"):
        model = _with_controlnets(model, params["controlnet"], dt)
    return plan_run(SimpleNamespace(device=torch.device(params["device"])), s, model=model)


def _with_controlnets(model, paths: list, dtype):
    """The plan's model with the ControlNets of ``paths``: their config.json, else (a single file)
    the released full SDXL ControlNet's shapes; 'tiny' fits the tiny UNet."""
    import dataclasses

    cfgs = []
    for p in paths:
        cfg_file = Path(p) / "config.json"
        if p == "tiny":
            cfgs.append(tiny_controlnet_config(model.unet_config))
        elif cfg_file.is_file():
            cfgs.append(ControlNetConfig.from_diffusers(json.loads(cfg_file.read_text())))
        else:
            cfgs.append(ControlNetConfig(model.unet_config))
    return dataclasses.replace(model, control_configs=tuple(cfgs),
                               control_bytes=sum(weight_bytes(fake_controlnet(c, dtype)) for c in cfgs))


def budget_message(e: InputError, device: str) -> str:
    """An impossible --max-memory (or another settings error) in the command line's words: its
    flags, and only the ways this run has (no CPU advice on the CPU, no latent-only output)."""
    if not isinstance(e, BudgetError):
        return as_flag(str(e))
    words = {"fp8": "--fp8", "size": "a smaller --height/--width", "cpu": "--device cpu"}
    ways = [words[w] for w in e.ways if w in words and not (w == "cpu" and device == "cpu")]
    return (f"--max-memory {fmt(e.budget)} is too small for this run: it needs at least {fmt(e.need)} "
            f"(--offload {e.policy}, --view-batch-size {e.view_batch}, at phase {e.worst.phase} {e.worst.name}); "
            f"below that: {', '.join(ways[:-1]) + ' or ' if len(ways) > 1 else ''}{ways[-1]}")

