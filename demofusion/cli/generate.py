"""`demofusion generate` and `demofusion upscale`: one run into its own folder (docs/cli.md).

Order: settle the parameters (flags, --from-image, --resume, --image), check them all and the
output folder, then load the weights, then run, writing every phase atomically as it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path

from .. import __version__
from ..config import config_defaults
from . import ranks
from ..errors import InputError
from ..frontend.control import control_hashes
from ..frontend.errors import CLIError, is_oom, oom_message
from ..frontend.loading import check_compile, check_device, check_dtype, load_pipeline, parse_loras
from ..frontend.runs import CONTROL_KEYS, MODEL_KEYS, PLACEMENT_KEYS, RUN_KEYS, defaults, image_size, run_id
from ..frontend.sampling import normalise_sampler, sampler_name
from ..images import load_image
from ..outputs import (RUN_FILE, check_output_folder, json_writer, latents_writer, load_latents, new_run_folder,
                       png_writer, read_png_params)
from .preflight import check_files, check_replayed, warn_settings
from .control import control_kwargs, control_maps
from .common import (base_size_of, budget_message, memory_plan, peak_memory, report_work, run_settings,
                     warn_long_prompt)
from .sampling import paper_settings, with_preset
from .batch import cmd_prompts
from .folder import RunFolder
from .hashes import check_replay, check_resume, current_hashes, sha256 as _sha256

SETUP_KEYS = ("model", "dtype", "image", "fp8", *CONTROL_KEYS, *MODEL_KEYS)  # beyond RUN_KEYS: a resume keeps them
DERIVED = ("phase", "run_id", "version", "sampler", "model_hash", "image_sha256", "control_sha256",
           "controlnet_hash", "vae_hash", "lora_hash")  # recomputed by each run


class _Stop(Exception):
    pass


# ---- parameters ---------------------------------------------------------------------------------
def _given(args) -> dict:
    """The flags on the command line (the sampler in one spelling: sampling.normalise_sampler)."""
    keys = (*RUN_KEYS, *PLACEMENT_KEYS, *CONTROL_KEYS, *MODEL_KEYS, "model", "device", "dtype", "force", "fp8")
    return normalise_sampler({k: v for k, v in vars(args).items() if v is not None and k in keys})


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
    if run_id(params) != params.get("run_id"):  # the settings that make the pixels, against the phases' id
        raise CLIError(f"--resume {out}: {RUN_FILE} was edited since the run started (its settings do not give "
                       f"its run id {params.get('run_id')}); restore it, or start a new run")
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


def settle_params(args) -> tuple[dict, Path | None, bool]:
    """(parameters, output folder or None for a new one, resuming?) from the flags."""
    if getattr(args, "ignore_hashes", False) and not args.from_image:
        raise CLIError("--ignore-hashes is for --from-image (a replay with other files); drop it")
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
    params.update(with_preset(_given(args)))  # a --preset given now fills the flags not given
    if args.image:
        params["image"] = args.image
    params["control_sha256"] = control_hashes(params)
    if args.scale is not None and not params.get("image"):
        raise CLIError(f"--scale {args.scale} needs a picture: give --image PATH (or use `demofusion upscale PATH`)")
    if params.get("image"):
        image = load_image(params["image"], "--image")
        params["image_sha256"] = _sha256(params["image"])
        if not args.from_image:
            image_size(image, args, params)
    return params, None if args.out is None else Path(args.out), False


# ---- the output folder and finished phases ------------------------------------------------------
def _check_folder(out: Path, args, params: dict) -> None:
    """``--out`` may take this run (nothing is written: the first phase replaces old files, folder.py)."""
    for source in (getattr(args, "from_image", None), params.get("image")):
        if source and Path(source).resolve().parent == out.resolve():
            raise CLIError(f"--out {out} holds the source picture {source}; write the new run to another --out")
    check_output_folder(out, args.overwrite, create=False)


def _held_folder(args, dry: bool) -> RunFolder | None:
    """The folder named by --out / --resume, to lock for the whole run before anything in it is
    read or checked (rank 0 of a real run; a new out/<date> folder is locked when it is made)."""
    if dry or int(os.environ.get("RANK", "0")) != 0:
        return None
    target = getattr(args, "resume", None) or args.out
    if target is None or (Path(target).exists() and not Path(target).is_dir()):
        return None  # nothing to lock (the checks say what is wrong)
    if getattr(args, "resume", None):
        return RunFolder(Path(target), "--resume", committed=True) if Path(target).is_dir() else None
    check_output_folder(target, args.overwrite, create=False)  # a folder that cannot be made is said first
    return RunFolder(Path(target))


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
    if getattr(args, "prompts", None):
        params = defaults() | with_preset(_given(args))
        params["device"] = check_device(params["device"])
        params["dtype"] = check_dtype(params["dtype"], params["device"])
        check_compile(args.compile)
        print(f"demofusion {__version__}: {params['model']} on {params['device']} in {params['dtype']}")
        return cmd_prompts(args, params, run_id)
    dry = getattr(args, "dry_run", False)
    with contextlib.ExitStack() as stack:  # the output folder's lock, released (and cleaned) however the run ends
        held = _held_folder(args, dry)
        return _generate(args, dry, stack, held and stack.enter_context(held))


def _check_all(args, params: dict, out, resuming: bool, dry: bool):
    """Every check that needs no weights (settings, files, the memory budget): (settings, image, control)."""
    image = load_image(params["image"], "--image") if params.get("image") else None
    control = control_kwargs(params, control_maps(params))  # the maps are read and checked before any weights
    base = base_size_of(params["model"], planning=dry)
    check_files(params)  # model, VAE, LoRAs, ControlNets: there, readable, of the right kind (headers only)
    settings = run_settings(params, base, args.stop_after_phase, image=image,
                            controlnets=len(params.get("controlnet") or []), **control)
    params["stride"] = settings.stride
    warn_settings(params)
    parse_loras(params.get("lora"))  # files and scales
    if out is not None and not resuming:
        _check_folder(out, args, params)  # a bad --out is said before the weights load
    paper = paper_settings(params, base, image=image, controlnets=len(params.get("controlnet") or []), **control) \
        if dry else None
    report_work(settings, params["device"], params["model"], paper=paper, preset=params.get("preset"))
    if dry or params.get("max_memory") not in (None, "auto"):  # a pure settings check: before anything is written
        try:
            plan = memory_plan(settings, params)
        except InputError as e:
            raise CLIError(budget_message(e, params["device"])) from None
        if dry:
            print(plan.describe())
    return settings, image, control


def _check_hashes(args, pipe, params: dict, out, resuming: bool) -> None:
    """The files at hand against the hashes the run (or the replayed picture) recorded; then recorded."""
    now = current_hashes(pipe, params)
    if resuming:
        check_resume(out, params, now, params)
    elif args.from_image:
        given = {*_given(args), *(["image"] if args.image else [])}
        check_replay(args.from_image, read_png_params(args.from_image), now, params, given,
                     getattr(args, "ignore_hashes", False))
    params.update({k: v for k, v in now.items() if v is not None or k in params})  # (no image: no image_sha256)


def _generate(args, dry: bool, stack, folder: RunFolder | None) -> int:
    import torch

    params, out, resuming = settle_params(args)
    params["device"] = check_device(params["device"], present=not dry)  # a plan for another machine
    if not dry:
        params["device"] = ranks.join(params["device"])  # under torchrun: this rank's device
        if params.get("view_ranks") is None and ranks.world_size() > 1:  # recorded: one process replays its bits
            params["view_ranks"] = ranks.world_size()
    writer = ranks.is_writer()
    params["dtype"] = check_dtype(params["dtype"], params["device"])
    check_compile(args.compile)
    print(f"demofusion {__version__}: {params['model']} on {params['device']} in {params['dtype']}")
    settings, image, control = _check_all(args, params, out, resuming, dry)
    if dry:
        print("dry run: settings and output folder are valid; no weights loaded, nothing written")
        return 0
    t0 = time.perf_counter()
    pipe = load_pipeline(params, args.compile)
    _check_hashes(args, pipe, params, out, resuming)
    if resuming and params.get("sampler") not in (None, sampler_name(pipe.scheduler)):
        raise CLIError(f"--resume {out}: the run sampled with {params['sampler']!r}, this model's scheduler now gives "
                       f"{sampler_name(pipe.scheduler)!r} (its scheduler config changed); restore it, or start a new run")
    params.update(sampler=sampler_name(pipe.scheduler), version=__version__)
    params["run_id"] = run_id(params) if not resuming else params["run_id"]
    done = finished_phases(out, params, settings) if resuming else []
    if out is None and writer:  # a new out/<date>-<time>-seed<seed>: made now, removed if nothing is written
        out = new_run_folder("out", params["seed"])
        folder = stack.enter_context(RunFolder(out, made=out))
    if writer:
        warn_long_prompt(pipe, params)
    kwargs = {k: params.get(k) for k in (*RUN_KEYS, *PLACEMENT_KEYS)} | {"image": image, "force": bool(params.get("force"))}
    kwargs |= control | {"truncate_prompts": bool(params.get("truncate_prompts"))}
    _redecode(pipe, done, out, folder, params, kwargs)
    print(f"resuming {out}: phases 1–{len(done)} already finished" if done else f"writing to {out}")

    def on_phase_end(k, image, latents):
        if writer and image is not None:  # every rank holds the same phase; rank 0 writes it
            folder.write(_phase_files(out, k, image, latents, params, settings, new=not folder.committed), k)
            print(f"phase {k}: {image.width}×{image.height} → {out / f'phase_{k}.png'}")
        if args.stop_after_phase is not None and k >= args.stop_after_phase:
            raise _Stop(k)

    try:
        with warnings.catch_warnings():  # said once above, in the CLI's words
            warnings.filterwarnings("ignore", message="prompt is longer")
            result = pipe(**kwargs, on_phase_end=on_phase_end, resume_latents=done or None, progress=args.progress)
    except InputError as e:  # an impossible --max-memory (the plan needs the loaded model's sizes)
        raise CLIError(budget_message(e, params["device"])) from None
    except _Stop as s:
        print(f"stopped after phase {s.args[0]} as asked; continue with `demofusion generate --resume {out}`")
        return 0
    except KeyboardInterrupt:
        return ranks.fail(130, f"interrupted; finished phases are saved in {out} — continue with "
                          f"`demofusion generate --resume {out}`" if folder is None or folder.committed else
                          f"interrupted before the first phase ended; nothing was written to {out}")  # said once, by rank 0
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if is_oom(e):
            raise CLIError(oom_message(e)) from e
        raise
    total = time.perf_counter() - t0
    phases = ", ".join(f"{w}×{h}: {t:.1f}s" for (h, w), t in zip(result.phase_sizes, result.timings))
    final = out / f"phase_{len(result.phase_sizes)}.png"
    if writer and not final.is_file():  # never name a picture that is not there
        raise CLIError(f"{final} is missing after the run; run `demofusion generate --resume {out}` to write it")
    print(f"done in {total:.1f}s ({phases}); {peak_memory(params['device'])}; final image {final}")
    return 0


def _phase_files(out: Path, k: int, image, latents, params: dict, settings, new: bool) -> list:
    """(path, write) of phase k's latents and picture, and run.json with a new run's first phase."""
    h, w = settings.sizes[k - 1]
    files = [(out / RUN_FILE, json_writer(out / RUN_FILE, params))] if new else []
    return files + [
        (out / f"phase_{k}.safetensors", latents_writer(out / f"phase_{k}.safetensors", latents.detach(),
                                                         {"run_id": params["run_id"], "phase": str(k), "size": f"{h}x{w}"})),
        (out / f"phase_{k}.png", png_writer(image, out / f"phase_{k}.png", {**params, "phase": k}))]


def _redecode(pipe, done: list, out, folder, params: dict, kwargs: dict) -> None:
    """A resume: the picture of every finished phase whose latents were saved but not its picture
    (a full disk, a deleted file) is decoded again from them (every rank decodes; rank 0 writes)."""
    for k, z in enumerate(done, start=1):
        path = out / f"phase_{k}.png"
        if path.is_file():
            continue
        img = pipe.decode(z, k, **kwargs)
        if folder is not None:
            folder.write([(path, png_writer(img, path, {**params, "phase": k}))], k)
        print(f"phase {k}: its picture was missing; decoded again from its latents → {path}")


def cmd_upscale(args) -> int:
    """`demofusion upscale IMAGE`: generate --image IMAGE."""
    args.from_image = args.resume = None
    return cmd_generate(args)
