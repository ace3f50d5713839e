"""`demofusion ablate`: the same seed across mechanism switches and knob sweeps → contact sheet.

Every cell is checked before the first one runs; each cell's phases are PNGs with metadata."""

from __future__ import annotations

from pathlib import Path

from ..outputs import check_output_folder, new_run_folder, save_png, write_json
from ..config import knobs
from ..frontend.errors import CLIError, is_oom, oom_message
from ..frontend.loading import check_compile, check_device, check_dtype, load_pipeline, model_fingerprint
from ..frontend.runs import PLACEMENT_KEYS, RUN_KEYS, defaults
from ..frontend.sampling import normalise_sampler, sampler_name
from . import ranks
from .args import ABLATIONS
from .control import control_kwargs, control_maps
from .preflight import check_files
from .evaluate import ablate_metrics, check_ablate_metrics
from .common import base_size_of, run_settings
from .sampling import with_preset

# every numeric DemoFusionConfig knob, and the run's steps and guidance
SWEEPABLE = {k.name: int if k.kind == "int" else float for k in knobs() if k.kind in ("int", "float")} | \
    {"num_inference_steps": int, "guidance_scale": float}


def parse_sweeps(sweeps: list[str]) -> list[tuple[str, dict]]:
    """``["sigma=0,0.8"]`` → [("sigma=0", {"sigma": 0.0}), ("sigma=0.8", {"sigma": 0.8})]."""
    cells = []
    for s in sweeps:
        if "=" not in s:
            raise CLIError(f"--sweep {s!r}: write KNOB=V1,V2 (knobs: {', '.join(SWEEPABLE)})")
        k, vals = s.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in SWEEPABLE:
            raise CLIError(f"--sweep: unknown knob {k!r}; choose from {', '.join(SWEEPABLE)}")
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not values:
            raise CLIError(f"--sweep {s!r}: no values; write {k}=V1,V2")
        for v in values:
            try:
                cells.append((f"{k}={v}", {k: SWEEPABLE[k](v)}))
            except ValueError:
                raise CLIError(f"--sweep {k}={v}: {v!r} is not a{'n integer' if SWEEPABLE[k] is int else ' number'}") from None
    return cells


def ablation_cells(grid: str, sweeps: list[str]) -> list[tuple[str, dict]]:
    names = [n.strip() for n in grid.split(",") if n.strip()]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown or not names:
        raise CLIError(f"--grid: unknown cell(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ABLATIONS)}")
    return [(n, ABLATIONS[n]) for n in names] + parse_sweeps(sweeps)


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
    if ranks.world_size() > 1:
        raise CLIError("ablate runs as one process (its cells are short); under torchrun use `generate`")
    params = defaults() | with_preset(normalise_sampler({k: v for k, v in vars(args).items()
                                                         if v is not None and k in defaults()}))
    params["device"] = check_device(params["device"])
    params["dtype"] = check_dtype(params["dtype"], params["device"])
    print(f"demofusion: {params['model']} on {params['device']} in {params['dtype']}")
    check_compile(args.compile)
    base = base_size_of(params["model"])
    check_files(params)  # model, VAE, LoRAs, ControlNets by kind, before any weights load
    cells = ablation_cells(args.grid, args.sweep)
    control = control_kwargs(params, control_maps(params))  # the same ControlNets in every cell
    nets = len(params.get("controlnet") or [])
    for name, change in cells:  # every cell, before the first runs
        try:
            run_settings({**params, **change}, base, controlnets=nets, **control)
        except CLIError as e:
            raise CLIError(f"cell {name}: {e}") from None
    check_ablate_metrics(args, base)
    params["stride"] = run_settings(params, base, controlnets=nets, **control).stride  # recorded as resolved
    if args.out is not None:
        check_output_folder(args.out, args.overwrite, create=False, resumable=False)  # said before the weights load
    pipe = load_pipeline(params, args.compile)
    out = new_run_folder("out", params["seed"]) if args.out is None else Path(args.out)
    check_output_folder(out, args.overwrite, resumable=False)
    base_params = {**params, "model_hash": model_fingerprint(pipe, params["model"]),
                   "sampler": sampler_name(pipe.scheduler)}
    record = {"base": base_params, "cells": []}
    finals = []
    for name, change in cells:
        cell = {**base_params, **change, "ablation": name}
        folder = out / name.replace("=", "_")
        folder.mkdir(exist_ok=True)
        save = lambda k, image, z, folder=folder, cell=cell: save_png(image, folder / f"phase_{k}.png", {**cell, "phase": k})
        try:
            res = pipe(**{k: cell[k] for k in (*RUN_KEYS, *PLACEMENT_KEYS)}, on_phase_end=save, **control,
                       truncate_prompts=bool(cell.get("truncate_prompts")))
        except RuntimeError as e:
            if is_oom(e):
                raise CLIError(f"cell {name}: {oom_message(e)}") from e
            raise
        finals.append(res.images[-1])
        record["cells"].append({"name": name, "changes": change, "settings": {k: cell[k] for k in RUN_KEYS},
                                "images": [str(folder / f"phase_{k + 1}.png") for k in range(len(res.images))]})
        print(f"{name}: {folder}")
    save_png(contact_sheet(finals, [n for n, _ in cells]), out / "contact_sheet.png", base_params)
    write_json(out / "ablation.json", record)
    print(f"contact sheet: {out / 'contact_sheet.png'}; settings: {out / 'ablation.json'}")
    if getattr(args, "metrics", None):
        ablate_metrics(out, record, args)
    return 0
