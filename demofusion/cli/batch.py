"""`demofusion generate --prompts FILE --out DIR`: one image per prompt, for scoring methods on many.

Line i (0-based, counting prompts: blank lines and lines starting with ``#`` are skipped) is
generated with seed ``--seed + i`` and every other flag as given, exactly as ``demofusion generate
--prompt LINE --seed S`` would make its last phase, and written to ``DIR/<i:04d>.png`` with its
metadata (replayable with ``--from-image``). Under torchrun the prompts are sharded (image i on rank
i mod N; each image on one rank, views unshared). Running the same command again resumes: an
image already there with the same run id is kept, one made with other settings is an error (never
overwritten without ``--overwrite``). ``DIR/manifest.json`` lists every line, its seed, file and
run id.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import first_line
from ..frontend.control import control_hashes, net_hashes
from ..frontend.errors import CLIError
from ..frontend.loading import load_pipeline, model_fingerprint, parse_loras
from ..frontend.runs import PLACEMENT_KEYS, RUN_KEYS
from ..frontend.sampling import sampler_name
from ..outputs import check_output_folder, read_png_params, save_png, write_json
from ..parallel import rank as this_rank
from . import ranks
from .control import control_kwargs, control_maps
from .common import base_size_of, run_settings
from .folder import RunFolder
from .preflight import check_files

MANIFEST = "manifest.json"


def read_prompts(path) -> list[tuple[int, str]]:
    """(line number in the file, prompt) of every prompt line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--prompts {path}: cannot read it ({first_line(e)})") from None
    prompts = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), start=1)
               if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise CLIError(f"--prompts {path}: no prompts in it (one per line; # starts a comment)")
    return prompts


def _check_lines(args, params: dict, lines: list, base: int, control: dict):
    """Every line's run (its prompt, seed --seed + i) checked before the first image: the settings
    of the first; a bad line is named by its number in the file."""
    first = None
    for i, (n, prompt) in enumerate(lines):
        try:
            s = run_settings({**params, "prompt": prompt, "seed": params["seed"] + i}, base,
                             controlnets=len(params.get("controlnet") or []), **control)
        except CLIError as e:
            raise CLIError(f"--prompts {args.prompts} line {n} (prompt {i}, seed --seed + {i} = "
                           f"{params['seed'] + i}): {e}") from None
        first = first or s
    return first


def _check(args) -> None:
    for flag, given in (("--prompt", args.prompt), ("--resume", args.resume), ("--from-image", args.from_image),
                        ("--image", args.image), ("--stop-after-phase", args.stop_after_phase)):
        if given is not None:
            raise CLIError(f"--prompts and {flag} exclude each other: the file gives the prompts, "
                           "and running the command again resumes")
    if args.out is None:
        raise CLIError("--prompts needs --out DIR (run the same command again to resume there)")


def cmd_prompts(args, params: dict, run_id) -> int:
    """Generate every prompt of ``args.prompts`` (``params``: the settled flags; ``run_id``: its hash)."""
    _check(args)
    lines, out = read_prompts(args.prompts), Path(args.out)
    prompts = [p for _, p in lines]
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: is a file; give a folder")
    base = base_size_of(params["model"])
    check_files(params)  # model, VAE, LoRAs, ControlNets: there, readable, of the right kind (headers only)
    control = control_kwargs(params, control_maps(params))  # the same ControlNets for every prompt
    params["control_sha256"] = control_hashes(params)
    settings = _check_lines(args, params, lines, base, control)  # every line and flag checked before loading
    parse_loras(params.get("lora"))
    params["stride"] = settings.stride
    params["device"] = ranks.join(params["device"])
    rank, world = this_rank(), ranks.world_size()
    with contextlib.ExitStack() as stack:  # rank 0 holds the folder's lock for the whole batch
        if rank == 0:
            check_output_folder(out, overwrite=True, create=False)
            stack.enter_context(RunFolder(out, committed=True))
        return _run_batch(args, params, prompts, out, run_id, control, rank, world)


def _run_batch(args, params: dict, prompts: list, out: Path, run_id, control: dict, rank: int, world: int) -> int:
    pipe = load_pipeline(params, args.compile)
    params.update(model_hash=model_fingerprint(pipe, params["model"]), sampler=sampler_name(pipe.scheduler))
    params["controlnet_hash"] = net_hashes(pipe, params)
    out.mkdir(parents=True, exist_ok=True)
    entries, made = [], 0
    for i, prompt in enumerate(prompts):
        p = {**params, "prompt": prompt, "seed": params["seed"] + i, "prompts_file": str(args.prompts), "line": i}
        p["run_id"] = run_id(p)
        path = out / f"{i:04d}.png"
        entries.append({"line": i, "prompt": prompt, "seed": p["seed"], "file": path.name, "run_id": p["run_id"]})
        if i % world != rank:
            continue
        if path.exists() and not args.overwrite:
            if read_png_params(path, "--out").get("run_id") == p["run_id"]:
                continue  # made before with these settings: kept
            raise CLIError(f"--out {out}: {path.name} was made with other settings; pass --overwrite to "
                           "replace it, or another --out")
        try:
            result = pipe(**{k: p[k] for k in (*RUN_KEYS, *PLACEMENT_KEYS)}, force=bool(p.get("force")),
                          distributed=False, progress=args.progress, **control,
                          truncate_prompts=bool(p.get("truncate_prompts")))
            save_png(result.images[-1], path, {**p, "phase": len(result.images)})  # atomic: whole or absent
        except KeyboardInterrupt:
            return ranks.fail(130, f"interrupted; the finished images are in {out} — run the same command again "
                              "to make the rest")  # said once, by rank 0
        made += 1
        print(f"{path} ({i + 1}/{len(prompts)}): {prompt[:60]}")  # rank 0's lines (the others are quiet)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        write_json(out / MANIFEST, {"prompts_file": str(args.prompts), "settings": params, "images": entries})
        print(f"done: {len(prompts)} images in {out} ({made} made by rank 0 now); manifest {out / MANIFEST}")
    return 0
