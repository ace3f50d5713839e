"""`demofusion generate` and `demofusion upscale`: one run into its own folder (docs/cli.md).

Order: settle the parameters (flags, --from-image, --resume, --image), check them all and the
output folder, then load the weights, then run, writing every phase atomically as it ends.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

from .. import __version__
from ..config import config_defaults, knob_names, run_id_items
from . import ranks
from ..errors import InputError
from ..outputs import (RUN_FILE, check_output_folder, load_latents, new_run_folder, read_png_params, save_latents,
                       save_png, write_json)
from .args import CONTROL_KEYS, MODEL_KEYS, PLACEMENT_KEYS, RUN_KEYS
from .preflight import check_files, check_replayed, warn_settings
from .control import control_hashes, control_kwargs, control_maps, net_hashes
from .common import (CLIError, _as_flag, base_size_of, check_compile, check_device, check_dtype, defaults, is_oom,
                     load_pipeline, memory_plan, model_fingerprint, oom_message, parse_loras, peak_memory, report_work,
                     run_settings, sampler_name, warn_long_prompt)

SETUP_KEYS = ("model", "dtype", "image", "fp8", *CONTROL_KEYS, *MODEL_KEYS)  # beyond RUN_KEYS: a resume keeps them
DERIVED = ("phase", "run_id", "version", "sampler", "model_hash", "image_sha256", "control_sha256",
           "controlnet_hash", "vae_hash", "lora_hash")  # recomputed by each run


class _Stop(Exception):
    pass


# ---- parameters ---------------------------------------------------------------------------------
def run_id(params: dict, config_cls=None) -> str:
    """What makes a run's pixels, hashed: the phase files of a run carry it (resume checks it).
    The knobs are the fields of ``config_cls`` (default DemoFusionConfig): :func:`run_id_items`."""
    keys = [*(k for k in RUN_KEYS if k not in knob_names()), "model", "model_hash", "dtype", "image_sha256",
            *(["fp8"] if params.get("fp8") else []),
            *([*CONTROL_KEYS, "control_sha256", "controlnet_hash"] if params.get("controlnet") else []),
            *(k for k in (*MODEL_KEYS, "vae_hash", "lora_hash") if params.get(k))]  # (only when set: older ids stay)
    values = {k: params.get(k) for k in keys} | run_id_items(params, config_cls)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _given(args) -> dict:
    keys = (*RUN_KEYS, *PLACEMENT_KEYS, *CONTROL_KEYS, *MODEL_KEYS, "model", "device", "dtype", "force", "fp8")
    return {k: v for k, v in vars(args).items() if v is not None and k in keys}


def _resumed_params(args) -> tuple[dict, Path]:
    out = Path(args.resume)
    if not (out / RUN_FILE).is_file():
        raise CLIError(f"--resume {out}: no {RUN_FILE} there (not a demofusion output folder)")
    try:
        params = json.loads((out / RUN_FILE).read_text())
        assert isinstance(params, dict)
        params = config_defaults() | params  # a knob added since the run started: its default
        assert all(k in params for k in RUN_KEYS)
    except (ValueError, AssertionError):
        raise CLIError(f"--resume {out}: {RUN_FILE} is damaged (not the JSON a run writes); start a new run") from None
    for k, v in {**_given(args), **({"image": args.image} if args.image else {})}.items():
        if k in (*RUN_KEYS, *SETUP_KEYS) and v != params.get(k):
            raise CLIError(f"--{k.replace('_', '-')} {v} conflicts with the run being resumed ({k} {params.get(k)!r}); "
                           "drop it to resume, or start a new run with another --out")
    if args.out is not None and Path(args.out).resolve() != out.resolve():
        raise CLIError(f"--out {args.out} conflicts with --resume {out}: a run resumes in its own folder; drop --out")
    if params.get("image") and _sha256(params["image"]) != params.get("image_sha256"):
        raise CLIError(f"--resume {out}: the picture {params['image']} changed since the run started; start a new run")
    if control_hashes(params) != params.get("control_sha256"):
        raise CLIError(f"--resume {out}: a control map's file changed since the run started; start a new run")
    params.update({k: v for k, v in _given(args).items() if k in ("device", *PLACEMENT_KEYS)})
    return params, out


def _sha256(path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _image_size(image, args, params) -> None:
    """With an image and no --height/--width: the image's size × --scale (default 2), multiples of 8."""
    scale = args.scale if args.scale is not None else 2.0
    if not 0 < scale <= 64:
        raise CLIError(f"--scale {scale}: must be in (0, 64]; e.g. --scale 2 doubles the picture's size")
    w, h = image.size
    if args.height is None and args.width is None:
        params["height"], params["width"] = round(h * scale / 8) * 8, round(w * scale / 8) * 8
    elif args.height is None:
        params["height"] = round(params["width"] * h / w / 8) * 8
    elif args.width is None:
        params["width"] = round(params["height"] * w / h / 8) * 8


def settle_params(args) -> tuple[dict, Path | None, bool]:
    """(parameters, output folder or None for a new one, resuming?) from the flags."""
    from ..images import load_image

    if args.resume:
        if args.from_image:
            raise CLIError("--resume and --from-image exclude each other: resume a folder, or replay a PNG")
        params, out = _resumed_params(args)
        return params, out, True
    params = defaults()
    if args.from_image:
        source = read_png_params(args.from_image)
        check_replayed(source, args.from_image)  # untrusted input: each field typed as its flag
        params.update({k: v for k, v in source.items() if k not in (*DERIVED, "device")})
    params.update(_given(args))
    if args.image:
        params["image"] = args.image
    params["control_sha256"] = control_hashes(params)
    if args.scale is not None and not params.get("image"):
        raise CLIError(f"--scale {args.scale} needs a picture: give --image PATH (or use `demofusion upscale PATH`)")
    if params.get("image"):
        image = load_image(params["image"], "--image")
        params["image_sha256"] = _sha256(params["image"])
        if not args.from_image:
            _image_size(image, args, params)
    return params, None if args.out is None else Path(args.out), False


# ---- the output folder and finished phases ------------------------------------------------------
def _prepare_folder(out: Path | None, args, params: dict, check_only: bool = False) -> Path:
    if out is None:
        return new_run_folder("out", params["seed"])
    for source in (getattr(args, "from_image", None), params.get("image")):
        if source and Path(source).resolve().parent == out.resolve():
            raise CLIError(f"--out {out} holds the source picture {source}; write the new run to another --out")
    check_output_folder(out, args.overwrite, create=not check_only)
    if args.overwrite and not check_only:  # replace only what a run writes, so no stale later phase stays behind
        for f in [*out.glob("phase_*.png"), *out.glob("phase_*.safetensors"), out / RUN_FILE]:
            f.unlink(missing_ok=True)
    return out


def finished_phases(out: Path, params: dict, settings) -> list:
    """Latents of the finished phases of the run in ``out``, each checked to belong to it."""
    done = []
    for k, (h, w) in enumerate(settings.sizes, start=1):
        f = out / f"phase_{k}.safetensors"
        if not f.is_file():
            if any((out / f"phase_{j}.safetensors").is_file() for j in range(k + 1, settings.phases + 1)):
                raise CLIError(f"--resume {out}: phase_{k}.safetensors is missing but later phases are there; "
                               "the folder is not one run's — start a new run")
            break
        z, meta = load_latents(f)
        why = None
        if meta.get("run_id") != params["run_id"]:
            why = f"it belongs to another run (run id {meta.get('run_id')}, this run {params['run_id']})"
        elif tuple(z.shape) != (settings.batch, 4, h // 8, w // 8):
            why = f"its latents are {list(z.shape)}, phase {k} needs {[settings.batch, 4, h // 8, w // 8]}"
        if why:
            raise CLIError(f"--resume {out}: {f.name} cannot be resumed: {why}; move it away or start a new run")
        done.append(z)
    return done


# ---- the command ------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    import torch

    from ..images import load_image

    if getattr(args, "prompts", None):
        from .batch import cmd_prompts

        params = defaults() | _given(args)
        params["device"] = check_device(params["device"])
        params["dtype"] = check_dtype(params["dtype"], params["device"])
        check_compile(args.compile)
        print(f"demofusion {__version__}: {params['model']} on {params['device']} in {params['dtype']}")
        return cmd_prompts(args, params, run_id)
    params, out, resuming = settle_params(args)
    params["device"] = check_device(params["device"], present=not getattr(args, "dry_run", False))  # a plan for another machine
    if not getattr(args, "dry_run", False):
        params["device"] = ranks.join(params["device"])  # under torchrun: this rank's device
    writer = ranks.is_writer()
    params["dtype"] = check_dtype(params["dtype"], params["device"])
    check_compile(args.compile)
    print(f"demofusion {__version__}: {params['model']} on {params['device']} in {params['dtype']}")
    image = load_image(params["image"], "--image") if params.get("image") else None
    dry = getattr(args, "dry_run", False)
    control = control_kwargs(params, control_maps(params))  # the maps are read and checked before any weights
    base = base_size_of(params["model"], planning=dry)
    check_files(params)  # model, VAE, LoRAs, ControlNets: there, readable, of the right kind (headers only)
    settings = run_settings(params, base, args.stop_after_phase, image=image,
                            controlnets=len(params.get("controlnet") or []), **control)
    params["stride"] = settings.stride
    warn_settings(params)
    if out is not None and not resuming:
        _prepare_folder(out, args, params, check_only=True)  # a bad --out is said before the weights load
    report_work(settings, params["device"], params["model"])
    if dry:
        try:
            print(memory_plan(settings, params).describe())
        except InputError as e:
            raise CLIError(_as_flag(str(e))) from None
        print("dry run: settings and output folder are valid; no weights loaded, nothing written")
        return 0
    t0 = time.perf_counter()
    pipe = load_pipeline(params, args.compile)
    out = out if resuming or not writer else _prepare_folder(out, args, params)
    fp = model_fingerprint(pipe, params["model"])
    if resuming and params.get("model_hash") not in (None, fp):
        raise CLIError(f"--resume {out}: the model differs from the one this run started with (hash {fp}, "
                       f"recorded {params['model_hash']}); pass the same --model")
    if params.get("model_hash") not in (None, fp):
        print(f"warning: model hash {fp} differs from the one recorded ({params['model_hash']}); "
              "the pictures will not match", file=sys.stderr)
    params.update(model_hash=fp, sampler=sampler_name(pipe.scheduler), version=__version__)
    params["controlnet_hash"] = net_hashes(pipe, params)
    params["vae_hash"] = model_fingerprint(pipe.vae, params["vae"], "vae") if params.get("vae") else None
    params["lora_hash"] = [model_fingerprint(None, f) for f, _ in parse_loras(params.get("lora"))] \
        if params.get("lora") else None
    params["run_id"] = run_id(params) if not resuming else params["run_id"]
    done = finished_phases(out, params, settings) if resuming else []
    if not resuming and writer:
        write_json(out / RUN_FILE, params)
    if writer:
        warn_long_prompt(pipe, params)
    print(f"resuming {out}: phases 1–{len(done)} already finished" if done else f"writing to {out}")

    def on_phase_end(k, image, latents):
        h, w = settings.sizes[k - 1]
        if writer:  # every rank holds the same phase; rank 0 writes it
            save_latents(out / f"phase_{k}.safetensors", latents.detach(),
                         {"run_id": params["run_id"], "phase": str(k), "size": f"{h}x{w}"})
        if image is not None and writer:
            save_png(image, out / f"phase_{k}.png", {**params, "phase": k})
            print(f"phase {k}: {image.width}×{image.height} → {out / f'phase_{k}.png'}")
        if args.stop_after_phase is not None and k >= args.stop_after_phase:
            raise _Stop(k)

    kwargs = {k: params[k] for k in (*RUN_KEYS, *PLACEMENT_KEYS)} | {"image": image, "force": bool(params.get("force"))}
    kwargs |= control | {"truncate_prompts": bool(params.get("truncate_prompts"))}
    try:
        with warnings.catch_warnings():  # said once above, in the CLI's words
            warnings.filterwarnings("ignore", message="prompt is longer")
            result = pipe(**kwargs, on_phase_end=on_phase_end, resume_latents=done or None, progress=args.progress)
    except InputError as e:  # an impossible --max-memory (the plan needs the loaded model's sizes)
        raise CLIError(_as_flag(str(e))) from None
    except _Stop as s:
        print(f"stopped after phase {s.args[0]} as asked; continue with `demofusion generate --resume {out}`")
        return 0
    except KeyboardInterrupt:
        return ranks.fail(130, f"interrupted; finished phases are saved in {out} — continue with "
                          f"`demofusion generate --resume {out}`")  # under torchrun said once, by rank 0
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if is_oom(e):
            raise CLIError(oom_message(e)) from e
        raise
    total = time.perf_counter() - t0
    phases = ", ".join(f"{w}×{h}: {t:.1f}s" for (h, w), t in zip(result.phase_sizes, result.timings))
    print(f"done in {total:.1f}s ({phases}); {peak_memory(params['device'])}; "
          f"final image {out / f'phase_{len(result.phase_sizes)}.png'}")
    return 0


def cmd_upscale(args) -> int:
    """`demofusion upscale IMAGE`: generate --image IMAGE."""
    args.from_image = args.resume = None
    return cmd_generate(args)
