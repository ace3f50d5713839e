"""`demofusion evaluate` and `ablate --metrics` (docs/evaluate.md): the protocol is in
demofusion/evaluate/; this file is the command line around it. Everything is checked before the
first picture is read, and nothing is written on an error."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluate import BACKENDS, DEFAULT_BACKEND, evaluate
from ..evaluate.inception import _library, check_weights
from ..evaluate.report import ablation_plot, is_default_cell, markdown_table, result_markdown
from ..frontend.errors import CLIError
from ..frontend.runs import DEFAULTS
from ..outputs import write_json

METRICS = ("fid", "kid", "is", "clip")


def _metrics_arg(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(METRICS)} (comma list)")
    return names


def _add_protocol_args(p, crop_size_help: str) -> None:
    p.add_argument("--crops", type=int, default=10, help="seeded random crops per picture for FID_c/KID_c/IS_c "
                   "(default 10, the paper's; 0: none)")
    p.add_argument("--crop-size", dest="crop_size", type=int, default=None, help=crop_size_help)
    p.add_argument("--crop-seed", dest="crop_seed", type=int, default=0, help="the crops' seed (default 0)")
    p.add_argument("--inception-weights", dest="inception_weights", metavar="FILE",
                   help="the FID Inception-v3 weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); "
                        "default: the library's download")
    p.add_argument("--clip-model", dest="clip_model", metavar="PATH",
                   help="a transformers CLIP folder (or hub name) for the CLIP score; default: no CLIP score")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help=f"whose resize and statistics (default {DEFAULT_BACKEND}: comparable with the published "
                        "DemoFusion/AccDiffusion tables; docs/evaluate.md)")
    p.add_argument("--eval-device", dest="eval_device", default="auto", help="where the networks run (default auto)")


def add_evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="FID, KID, IS, their crop variants and CLIP score (docs/evaluate.md)")
    e.add_argument("images", help="a folder of pictures, one picture, or one `generate` run folder (per phase)")
    e.add_argument("--reference", metavar="REF", help="real pictures (folder) for FID/KID; without it IS and CLIP only")
    e.add_argument("--json", metavar="OUT", help="write the result and its protocol here (a new file)")
    e.add_argument("--markdown", action="store_true", help="print a Markdown table")
    e.add_argument("--save-crops", dest="save_crops", metavar="DIR", help="write the crops (new or empty folder)")
    e.add_argument("--prompts", metavar="FILE", help="one prompt a line in picture order (default: our PNG metadata)")
    e.add_argument("--metrics", type=_metrics_arg, default=list(METRICS), help="comma list (default fid,kid,is,clip)")
    _add_protocol_args(e, "crop size in px (default 1024, SDXL's base size)")
    e.add_argument("--debug", action="store_true", help="show the traceback of internal errors")


def add_ablate_flags(a) -> None:
    a.add_argument("--metrics", nargs="?", const=list(METRICS), default=None, type=_metrics_arg,
                   metavar="LIST", help="score every cell (default all of fid,kid,is,clip): metrics.md, metrics.json, "
                   "metrics.png beside the contact sheet")
    a.add_argument("--reference", metavar="REF", help="real pictures for --metrics' FID/KID")
    _add_protocol_args(a, "crop size in px (default the model's base size)")


def register(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `evaluate` and ablate's --metrics to the parser cli/args.py builds (kept apart from it)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    add_evaluate_parser(sub)
    add_ablate_flags(sub.choices["ablate"])
    return parser


def _new_file(path, flag: str) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        raise CLIError(f"{flag} {p}: already exists; choose a new file (nothing is overwritten)")
    if not p.parent.is_dir():
        raise CLIError(f"{flag} {p}: no folder {p.parent}")
    return p


def _kwargs(args, crop_size: int) -> dict:
    return {"crops": args.crops, "crop_size": crop_size, "crop_seed": args.crop_seed,
            "inception_weights": args.inception_weights, "clip_model": args.clip_model, "backend": args.backend,
            "device": args.eval_device}


def cmd_evaluate(args) -> int:
    out = None if args.json is None else _new_file(args.json, "--json")
    result = evaluate(args.images, args.reference, args.prompts, save_crops=args.save_crops, metrics=args.metrics,
                      **_kwargs(args, 1024 if args.crop_size is None else args.crop_size))
    if out is not None:
        write_json(out, result)
    if args.markdown:
        print(result_markdown(result))
    else:
        shown = {k: v for k, v in result.items() if k != "protocol"}
        print(json.dumps(shown, indent=1))
    if out is not None:
        print(f"result and protocol: {out}")
    return 0


def check_ablate_metrics(args, base: int) -> None:
    """Before the first cell runs: the reference and the weights are there, the libraries installed."""
    if args.metrics is None:
        return
    if args.reference is None and {"fid", "kid"} & set(args.metrics):
        raise CLIError("--metrics fid/kid need --reference REF (real pictures); or pass --metrics is,clip")
    if args.reference is not None and not Path(args.reference).expanduser().exists():
        raise CLIError(f"--reference {args.reference}: no such file or folder")
    if args.inception_weights is not None:
        check_weights(args.inception_weights)
    _library(args.backend)
    args.crop_size = base if args.crop_size is None else args.crop_size


def ablate_metrics(out: Path, record: dict, args) -> None:
    """Score each cell's final picture (the one in the contact sheet) → metrics.{md,json,png}."""
    names, rows, defaults = [], [], []
    for cell in record["cells"]:
        image = cell["images"][-1]
        r = evaluate([image], args.reference, metrics=args.metrics, **_kwargs(args, args.crop_size))
        names.append(cell["name"])
        rows.append({k: v for k, v in r.items() if k != "protocol"} | {"image": image})
        defaults.append(is_default_cell(cell["name"], cell["changes"], DEFAULTS))
        protocol = r["protocol"]
    cells = [{"name": n, "default": d, **r} for n, d, r in zip(names, defaults, rows)]
    write_json(out / "metrics.json", {"cells": cells, "protocol": protocol})
    table = markdown_table([n + (" *" if d else "") for n, d in zip(names, defaults)], rows, "cell")
    (out / "metrics.md").write_text(table + "\n\n* the paper's default\n", encoding="utf-8")
    ablation_plot(out / "metrics.png", names, rows, defaults)
    print(f"metrics: {out / 'metrics.md'}, {out / 'metrics.json'}, {out / 'metrics.png'}")
