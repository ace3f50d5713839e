"""One-shot GPU check: what a lent GPU does with our code, in one run of a few minutes.

    python benchmarks/gpu_check.py                     # one CUDA GPU, SDXL shapes, random weights (< 5 min on an H100)
    python benchmarks/gpu_check.py --smoke             # the same script on the CPU, tiny model (seconds)
    python benchmarks/gpu_check.py --skip compile      # leave out sections (names below)

Random weights at the real shapes, made on the device (nothing to download); values do not
change the cost. Sections, in order (each timed; a failing one is recorded, the rest still run):

* ``env``: torch / CUDA / cuDNN versions, the device, and the SDPA kernel torch actually picks
  for SDXL's largest self-attention (the ``aten::_scaled_dot_product_*`` op a profiler sees);
* ``ceilings``: dense matmul TFLOP/s (fp16 and bf16), device copy GB/s, host→device GB/s from
  pinned and from pageable memory;
* ``unet``: UNet calls per second per batch size, contiguous vs ``channels_last``;
* ``compile``: eager vs ``torch.compile`` at batch 2 (and the compile time);
* ``memory``: our plan's estimate vs ``torch.cuda.max_memory_reserved`` for 2 steps per phase at
  2048² and 4096² with no budget, and at 2048² under an 8 GiB plan;
* ``run``: a 2048² 50-step run (jitter on, decoded) with seconds per phase;
* ``repeat``: the same short run twice: bitwise equal latents (same seed → same bits).

Writes ``gpu_check.json`` (every figure) and ``gpu_check.md`` (one Markdown table) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

GiB = 2**30
SECTIONS = ("env", "ceilings", "unet", "compile", "memory", "run", "repeat")


# ---- settings: the real check and its CPU smoke test ----------------------------------------------
def settings(smoke: bool) -> dict:
    if smoke:
        return dict(device="cpu", kind="tiny", dtype=torch.float32, vae_dtype=torch.float32, latent=32,
                    batches=(1, 2), reps=2, matmul=256, copy_mib=16, compile_backend="eager",
                        memory_sizes=(512,), budget=None, run_size=512, run_steps=2, repeat_size=384,
                    repeat_steps=2, attention=(2, 64, 32))
    return dict(device="cuda", kind="sdxl-base", dtype=torch.float16, vae_dtype=torch.float32, latent=128,
                batches=(1, 2, 4, 8), reps=5, matmul=8192, copy_mib=1024, compile_backend="inductor",
                memory_sizes=(2048, 4096), budget="8GiB", run_size=2048, run_steps=50, repeat_size=2048,
                repeat_steps=4, attention=(10, 4096, 64))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---- env -------------------------------------------------------------------------------------------
def sdpa_kernel(device, dtype, heads: int, tokens: int, head_dim: int) -> str:
    """The aten op SDPA dispatches to for a [2, heads, tokens, head_dim] self-attention."""
    q = torch.randn(2, heads, tokens, head_dim, device=device, dtype=dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, q, q)
    names = sorted({e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")
                    or e.name.startswith("aten::_efficient_attention") or e.name.startswith("aten::_flash_attention")})
    return ", ".join(names) or "math (no fused kernel)"


def env(cfg) -> dict:
    d = cfg["device"]
    out = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": torch.cuda.get_device_name(d) if d == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads()}
    if d == "cuda":
        p = torch.cuda.get_device_properties(d)
        out.update(capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / GiB, 1))
    out["sdpa"] = sdpa_kernel(d, cfg["dtype"], *cfg["attention"])
    return out


# ---- ceilings --------------------------------------------------------------------------------------
def ceilings(cfg) -> dict:
    d, n, reps = cfg["device"], cfg["matmul"], cfg["reps"]
    out = {}
    for dt in (torch.float16, torch.bfloat16) if d == "cuda" else (torch.float32,):
        a, b = (torch.randn(n, n, device=d, dtype=dt) for _ in range(2))
        out[f"matmul_{str(dt)[6:]}_tflops"] = float(f"{2 * n**3 / timed(lambda: a @ b, d, reps) / 1e12:.3g}")
    nbytes = cfg["copy_mib"] * 2**20
    x, y = (torch.empty(nbytes, dtype=torch.uint8, device=d) for _ in range(2))
    out["copy_gbps"] = round(2 * nbytes / timed(lambda: y.copy_(x), d, reps) / 1e9, 1)  # read + write
    if d == "cuda":
        for pinned in (True, False):
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            key = "h2d_pinned_gbps" if pinned else "h2d_pageable_gbps"
            out[key] = round(nbytes / timed(lambda: y.copy_(host, non_blocking=pinned), d, reps) / 1e9, 1)
    return out


# ---- the models, made on the device ----------------------------------------------------------------
def init_on_device_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """demofusion.presets.random_init_'s recipe drawn on the module's device (fast for 2.6 B weights)."""
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            r = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
            if p.ndim >= 2:
                r /= p[0].numel() ** 0.5
            else:
                r = 1 + 0.1 * r if name.endswith("weight") else 0.1 * r
            p.copy_(r)
    return module


def components(cfg):
    from demofusion.presets import random_components

    unet, vae, text, sched = random_components(cfg["kind"], device="meta", dtype=cfg["dtype"])
    mods = [(unet, cfg["dtype"]), (vae, cfg["vae_dtype"]), (text.text_encoder, cfg["dtype"]),
            (text.text_encoder_2, cfg["dtype"])]
    for k, (m, dt) in enumerate(mods):
        init_on_device_(m.to_empty(device=cfg["device"]).to(dt), k)
    return unet, vae, text, sched


def unet_inputs(unet, batch: int, latent: int, device, dtype, memory_format=torch.contiguous_format):
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)
    x = r(batch, c.in_channels, latent, latent).contiguous(memory_format=memory_format)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device=device).expand(batch, 6)
    return x, torch.tensor(500.0, device=device), r(batch, 77, c.cross_attention_dim), r(batch, pooled), ids


# ---- unet, compile ---------------------------------------------------------------------------------
def unet_rates(cfg, unet) -> list[dict]:
    rows = []
    for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        unet.to(memory_format=fmt)
        for b in cfg["batches"]:
            args = unet_inputs(unet, b, cfg["latent"], cfg["device"], cfg["dtype"], fmt)
            with torch.no_grad():
                s = timed(lambda: unet(*args), cfg["device"], cfg["reps"])
            rows.append({"batch": b, "format": fmt_name, "calls_per_s": round(1 / s, 2),
                         "samples_per_s": round(b / s, 2)})
    unet.to(memory_format=torch.contiguous_format)
    return rows


def compiled(cfg, unet) -> dict:
    args = unet_inputs(unet, 2, cfg["latent"], cfg["device"], cfg["dtype"])
    with torch.no_grad():
        eager = timed(lambda: unet(*args), cfg["device"], cfg["reps"])
        fn = torch.compile(unet, backend=cfg["compile_backend"])
        t = time.perf_counter()
        fn(*args)
        sync(cfg["device"])
        first = time.perf_counter() - t
        comp = timed(lambda: fn(*args), cfg["device"], cfg["reps"])
        same = torch.equal(fn(*args), fn(*args))
    return {"backend": cfg["compile_backend"], "batch": 2, "eager_calls_per_s": round(1 / eager, 2),
            "compiled_calls_per_s": round(1 / comp, 2), "compile_s": round(first, 1), "compiled_repeat_bitwise": same}


# ---- whole runs ------------------------------------------------------------------------------------
def pipeline(cfg, parts):
    from demofusion.pipeline import DemoFusionPipeline

    return DemoFusionPipeline(*parts, device=cfg["device"], name=f"random {cfg['kind']}")


def reset_peak(device) -> None:
    if device == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_rows(cfg, parts) -> list[dict]:
    pipe, d, rows = pipeline(cfg, parts), cfg["device"], []
    jobs = [(s, None) for s in cfg["memory_sizes"]] + ([(cfg["memory_sizes"][0], cfg["budget"])] if cfg["budget"] else [])
    for size, budget in jobs:
        kw = dict(height=size, width=size, num_inference_steps=2, max_memory=budget, seed=0, output_type="latent")
        plan = pipe.memory_plan(**kw)
        reset_peak(d)
        t = time.perf_counter()
        pipe("a lighthouse at dawn", **kw)
        sync(d)
        rows.append({"size": size, "budget": budget or "none", "policy": plan.offload,
                     "view_batch": plan.view_batch_size, "estimate_gib": round(plan.peak_bytes / GiB, 2),
                     "reserved_gib": round(torch.cuda.max_memory_reserved(d) / GiB, 2) if d == "cuda" else None,
                     "allocated_gib": round(torch.cuda.max_memory_allocated(d) / GiB, 2) if d == "cuda" else None,
                     "seconds": round(time.perf_counter() - t, 1)})
    return rows


def full_run(cfg, parts) -> dict:
    pipe = pipeline(cfg, parts)
    t = time.perf_counter()
    out = pipe("a lighthouse at dawn", height=cfg["run_size"], width=cfg["run_size"],
               num_inference_steps=cfg["run_steps"], seed=0, output_type="pt")
    sync(cfg["device"])
    return {"size": cfg["run_size"], "steps": cfg["run_steps"], "seconds": round(time.perf_counter() - t, 1),
            "phase_seconds": [round(x, 1) for x in out.timings], "unet_calls": list(out.unet_calls)}


def repeat(cfg, parts) -> dict:
    pipe = pipeline(cfg, parts)
    kw = dict(height=cfg["repeat_size"], width=cfg["repeat_size"], num_inference_steps=cfg["repeat_steps"],
              seed=7, output_type="latent")
    a, b = (pipe("a lighthouse at dawn", **kw).latents for _ in range(2))
    return {"size": cfg["repeat_size"], "steps": cfg["repeat_steps"],
            "bitwise_equal": all(torch.equal(x, y) for x, y in zip(a, b)),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


# ---- report ----------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    """One table: section | figure | value."""
    lines = ["| section | figure | value |", "|---|---|---|"]
    for section, value in report.items():
        if isinstance(value, dict):
            lines += [f"| {section} | {k} | {v} |" for k, v in value.items()]
        elif isinstance(value, list):
            for row in value:
                key = ", ".join(f"{k} {v}" for k, v in list(row.items())[:2])
                rest = ", ".join(f"{k} {v}" for k, v in list(row.items())[2:])
                lines.append(f"| {section} | {key} | {rest} |")
        else:
            lines.append(f"| {section} | | {value} |")
    return "\n".join(lines) + "\n"


def run_sections(cfg, skip) -> dict:
    report, parts = {}, None
    steps = {"env": lambda: env(cfg), "ceilings": lambda: ceilings(cfg),
             "unet": lambda: unet_rates(cfg, parts[0]), "compile": lambda: compiled(cfg, parts[0]),
             "memory": lambda: memory_rows(cfg, parts), "run": lambda: full_run(cfg, parts),
             "repeat": lambda: repeat(cfg, parts)}
    for name in SECTIONS:
        if name in skip:
            continue
        if parts is None and name not in ("env", "ceilings"):
            parts = components(cfg)
        t = time.perf_counter()
        try:
            report[name] = steps[name]()
        except Exception as e:  # one failing section (e.g. out of memory) must not lose the others
            traceback.print_exc()
            report[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)
        print(f"{name}: {json.dumps(report[name])}", flush=True)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, small sizes: checks the script itself")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_check.json and gpu_check.md")
    args = ap.parse_args(argv)
    cfg = settings(args.smoke)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    report = {"mode": "smoke (CPU, tiny)" if args.smoke else f"gpu ({cfg['kind']})", **run_sections(cfg, set(args.skip))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
