"""Estimated peak GPU memory of every stage and phase of a DemoFusion run (demofusion/memory/),
and the max_memory plans (demofusion/memory/plan.py) for a range of budgets, with fp8 off and on.

    python benchmarks/memory.py
    python benchmarks/memory.py --sizes 2048x2048 4096x4096 --vbs 16 4 1 --budgets 24 12 8 6 --dtype fp16 --write

Our real SDXL modules run on fake CUDA tensors under an allocation tracker (no GPU needed, no
arithmetic done): each cell is weights resident on the GPU + the measured activation peak + the
latent working set + the stated reserve (CUDA context, workspaces, 10 % fragmentation), in GiB.
Budget table: the plan ``max_memory`` picks (offload policy, view batch, VAE tiles) and its peak.
Stage tables: ours at each ``--vbs`` (view_batch_size; UNet batch = views × 2 with CFG), then the
PRIS-CV reference as it runs at the same view_batch_size (text encoders kept on the GPU, its VAE
upcast to fp32 for decoding, 16×-redundant 1024-px decode tiles, path-by-path batches).
``--write`` replaces the ``## Memory`` section of docs/benchmarks.md with the output.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from docsection import DOC, write_section

from demofusion import memory as M
from demofusion.errors import InputError
from demofusion.memory.plan import plan, preset_model
from demofusion.pipeline.settings import validate
from demofusion.weights import parse_dtype

def gib(n: int) -> str:
    return f"{n / M.GiB:.2f}"


def rows(stages: list[M.Stage]) -> dict[str, str]:
    """Stage label → cell: the largest total of the stages with that label (UNet: with its batch)."""
    out: dict[str, tuple[int, str]] = {}
    for st in stages:
        label = "text encoders" if st.phase == 0 else f"phase {st.phase} {'UNet' if st.name == 'unet' else 'decode'}"
        cell = gib(st.total) + (f" (b{st.batch})" if st.name == "unet" else "")
        if label not in out or st.total > out[label][0]:
            out[label] = (st.total, cell)
    worst = M.peak(stages)
    out["**peak**"] = (worst.total, f"**{gib(worst.total)}**")
    return {k: v[1] for k, v in out.items()}


def settings(h: int, w: int, vbs: int | None = None):
    return validate(1024, prompt="a prompt", height=h, width=w, view_batch_size=vbs)


def ours(h: int, w: int, vbs: int, dtype) -> list[M.Stage]:
    """Our run without a budget (offload "none"): the plan's stages at this view_batch_size."""
    return list(plan(preset_model("sdxl-base", dtype), settings(h, w, vbs)).stages)


def budget_cell(h: int, w: int, budget_gib: float | None, dtype, fp8: bool) -> str:
    try:
        p = plan(preset_model("sdxl-base", dtype, fp8), settings(h, w), budget_gib and int(budget_gib * M.GiB),
                 auto_batch=True)
    except InputError:
        return "does not fit"
    c = p.choice
    how = f"{c.offload}, vbs {c.view_batch_size}{' apart' if c.cfg_apart else ''}" + \
        (f", tiles {c.decode_tile}" if c.decode_tile else "") + (f" ×{c.decode_batch}" if c.decode_batch != 1 else "")
    return f"{gib(p.peak_bytes)} ({how})"


def budget_table(sizes, budgets, dtype) -> list[str]:
    cols = [None, *budgets]
    head = [f"{'none' if b is None else f'{b:g} GiB'}{' fp8' if f else ''}" for f in (False, True) for b in cols]
    lines = ["| size | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for h, w in sizes:
        lines.append(f"| {h} × {w} | " + " | ".join(budget_cell(h, w, b, dtype, f) for f in (False, True)
                                                   for b in cols) + " |")
    return lines + [""]


def size_table(h: int, w: int, vbs: list[int], dtype) -> tuple[list[str], list[str]]:
    """Markdown lines of one size's table and the one-line summary cells."""
    runs = [(f"ours {v}", ours(h, w, v, dtype)) for v in vbs]
    runs += [(f"ref. {v}", M.stage_table(h, w, v, True, dtype, reference=True)) for v in vbs]
    cols = [rows(st) for _, st in runs]
    lines = [f"**{h} × {w}**", "", "| stage | " + " | ".join(n for n, _ in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for label in cols[-1]:
        lines.append(f"| {label} | " + " | ".join(c.get(label, "–") for c in cols) + " |")
    summary = [f"{gib(M.peak(st).total)} ({_stage_name(M.peak(st))})" for _, st in runs]
    return lines + [""], summary


def _stage_name(st: M.Stage) -> str:
    return "text" if st.phase == 0 else f"P{st.phase} {'UNet' if st.name == 'unet' else 'decode'}"


def report(sizes, vbs, dtype, command: str, budgets=(24, 12, 8, 6)) -> str:
    unet_row = M.unet_call_peak("sdxl-base", dtype, (128, 128), 32).activation_bytes // 32
    w = {"UNet": M.unet_call_peak("sdxl-base", dtype).weights_bytes,
         "VAE": M.vae_decode_tile_peak(dtype=dtype).weights_bytes,
         "text encoders": M.text_encode_peak(dtype).weights_bytes}
    head = [
        f"Estimated peak GPU memory of each stage and phase, GiB: SDXL base, {str(dtype)[6:]}, classifier-free",
        "guidance, 1 prompt, 50 steps, stride 64. **Estimates, not GPU measurements**: our real modules run at",
        "SDXL shapes on fake CUDA tensors (`demofusion/memory/`; attention routed to the flash /",
        "memory-efficient kernels CUDA uses) while an allocation tracker sums the live CUDA storages.",
        "A cell = weights on the GPU + measured activation peak + latent working set + reserve (CUDA",
        "context 0.5 GiB, workspaces 0.31 GiB, 10 % of the activations for fragmentation: assumptions",
        "until checked on a GPU). (bN): the UNet batch (views × 2). Weights: "
        + ", ".join(f"{k} {gib(v)}" for k, v in w.items()) + " GiB.",
        "",
        "*ours N*: view_batch_size N, no budget (offload none); text encoders on the GPU only while",
        "encoding; decode tiles of ≤ 1024 px, 1 per call, sized for fp32 (the released SDXL VAE overflows in",
        "fp16 and is upcast). *ref. N*: the PRIS-CV pipeline as it runs, same view_batch_size (text encoders",
        "stay on the GPU; its VAE upcast to fp32 to decode 1024-px windows around 256-px cores, one per",
        "call; local and global views in separate batches).",
        "",
        f"Measured units: a UNet call on 128² latents holds {gib(unet_row)} GiB of activations per batch row "
        f"({gib(M.unet_call_peak('sdxl-base', dtype, (128, 128), 2).activation_bytes)} GiB at b2, "
        f"{gib(M.unet_call_peak('sdxl-base', dtype, (128, 128), 32).activation_bytes)} GiB at b32); a VAE decode "
        f"of two 1024-px tiles {gib(M.vae_decode_tile_peak((128, 128), dtype, 2).activation_bytes)} GiB, of one "
        f"fp32 window {gib(M.vae_decode_tile_peak((128, 128), torch.float32, 1).activation_bytes)} GiB.",
        "", "```", command, "```", "",
    ]
    summary, tables = [], []
    for h, wd in sizes:
        lines, cells = size_table(h, wd, vbs, dtype)
        tables += lines
        summary.append(f"| {h} × {wd} | " + " | ".join(cells) + " |")
    names = [f"ours {v}" for v in vbs] + [f"ref. {v}" for v in vbs]
    plans = ["### max_memory plans", "",
             "Peak of the run under `max_memory` (GiB budgets; *none*: no budget, view_batch_size 16) with the",
             "plan it picks: offload policy, views per UNet call (*apart*: the CFG halves in two calls), VAE",
             "tiles of fewer latents when nothing else fits; *fp8*: the UNet's weights stored as fp8 (`fp8=True`).", "",
             *budget_table(sizes, budgets, dtype)]
    summary = ["### Stages", "", "Peak of the run (its largest stage), by view_batch_size:", "",
               "| size | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)] + summary + [""]
    return "\n".join(head + plans + summary + tables).rstrip() + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["2048x2048", "3072x3072", "4096x4096", "2048x4096"],
                    help="HEIGHTxWIDTH in pixels")
    ap.add_argument("--vbs", nargs="+", type=int, default=[16, 4, 1], help="view_batch_size values")
    ap.add_argument("--budgets", nargs="+", type=float, default=[24, 12, 8, 6], help="max_memory budgets, GiB")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--write", action="store_true", help="update the ## Memory section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    flags = ["--sizes", *args.sizes, "--vbs", *map(str, args.vbs), "--budgets", *(f"{b:g}" for b in args.budgets),
             "--dtype", args.dtype]
    command = "python benchmarks/memory.py " + " ".join(flags + (["--write"] if args.write else []))
    t0 = time.perf_counter()
    text = report(sizes, args.vbs, parse_dtype(args.dtype), command, args.budgets)
    print(text)
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.write:
        write_section("Memory", text)
        print(f"wrote the ## Memory section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
