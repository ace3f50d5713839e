"""Everything a run writes to disk, written so that a crash or Ctrl-C never leaves a half-written file.

Rules:
1. Every file is written atomically: into a hidden temp file beside it (``.{name}.tmp-{pid}-{random}{suffix}``,
   keeping the suffix for PIL/safetensors), fsynced, then ``os.replace``-d over the target. An interrupted
   write leaves the previous complete file, or none, and no temp file. Every file gets a new file's
   mode (0666 less the umask), whatever the writing library chose. ``atomic_replace`` writes several
   files as one step (all complete before any old file is removed or replaced).
2. Nothing non-finite is ever saved: NaN/Inf in JSON → ``InputError``, in latents → ``NonFiniteError``.
3. Reading never modifies a file; a file we cannot use raises a one-line ``InputError`` naming it and the fix.
4. A PNG carries two text chunks: ``demofusion`` (our parameters as JSON, the one read back) and
   ``parameters`` (AUTOMATIC1111's format, for other tools; written, never read).
5. Output folders are never reused silently: ``new_run_folder`` makes a fresh one; ``check_output_folder``
   refuses a folder that already holds files unless told to overwrite.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import tempfile
from datetime import datetime
from itertools import count
from pathlib import Path
from typing import Callable

from . import __version__
from .config import knob_names
from .errors import InputError, NonFiniteError, first_line

META_KEY = "demofusion"  # PNG text chunk holding the generation parameters as JSON
A1111_KEY = "parameters"  # PNG text chunk in AUTOMATIC1111's format
RUN_FILE = "run.json"


# ---- atomic writes ----------------------------------------------------------------------------
def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; best effort (not every OS/file system can fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_file_mode(tmp: Path) -> int:
    """Create ``tmp`` empty as any new file is created (0666 less the umask, as the folder's ACL
    allows) and return its mode: writers that make their own file (safetensors: 0600) get it back."""
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return os.stat(tmp).st_mode & 0o777


def _stage(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temp file beside ``path``, with a new file's mode, fsynced; the temp
    file's path (no temp file is left behind if this fails)."""
    tmp = _temp_path(path)
    try:
        mode = _new_file_mode(tmp)
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:  # KeyboardInterrupt and a full disk too: never leave the temp file behind
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    os.replace(_stage(path, write), path)
    _fsync_dir(path.parent)


def atomic_replace(writes: list, remove=()) -> None:
    """Several files as one step: every ``(path, write)`` is written to its temp file first; only
    when all are complete are the ``remove`` files deleted and the temp files renamed into place.
    A failure while writing (a full disk, Ctrl-C) leaves the folder as it was."""
    staged = []
    try:
        for path, write in writes:
            staged.append((_stage(Path(path), write), Path(path)))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    targets = {path for _, path in staged}
    for f in remove:
        if Path(f) not in targets:
            Path(f).unlink(missing_ok=True)
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:  # a rename that failed: its temp file and the ones after it go
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for folder in {path.parent for _, path in staged}:
        _fsync_dir(folder)


def _reason(e: BaseException) -> str:
    # an OSError's reason without its errno and path (the message around it names the path); cut at
    # 160 characters: a library's message (PIL, json, safetensors) may quote its whole input
    return first_line(getattr(e, "strerror", None) or e)[:160]


# ---- JSON ---------------------------------------------------------------------------------------
def _nonfinite_at(obj, where: str = ""):
    """(key path, value) of the first NaN/Inf float in ``obj``, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value", obj
    items = []
    if isinstance(obj, dict):
        items = [(f"{where}.{k}" if where else str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
    return next((found for sub, v in items if (found := _nonfinite_at(v, sub))), None)


def _json_text(obj, path, **kwargs) -> str:
    """``json.dumps`` that refuses NaN/Inf with a one-line InputError naming the key."""
    found = _nonfinite_at(obj)
    if found:
        raise InputError(f"{path}: {found[0]} = {found[1]} is not a finite number; refusing to save it "
                         "(give a finite value)")
    return json.dumps(obj, sort_keys=True, allow_nan=False, **kwargs)


def write_json(path, obj) -> None:
    atomic_write(path, json_writer(path, obj))


def json_writer(path, obj) -> Callable[[Path], None]:
    """What ``write_json`` writes, as a ``write(tmp)`` for :func:`atomic_replace` (checked finite now)."""
    text = _json_text(obj, path, indent=2) + "\n"
    return lambda tmp: tmp.write_text(text, encoding="utf-8")


# ---- latents ------------------------------------------------------------------------------------
def save_latents(path, latents, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, latents_writer(path, latents, metadata))


def latents_writer(path, latents, metadata: dict[str, str] | None = None) -> Callable[[Path], None]:
    """What ``save_latents`` writes, as a ``write(tmp)`` for :func:`atomic_replace` (checked finite now)."""
    import torch
    from safetensors.torch import save_file

    t = latents.detach().contiguous().cpu()
    n_bad = int((~torch.isfinite(t)).sum())
    if n_bad:
        raise NonFiniteError(f"refusing to save {path}: {n_bad} of {t.numel()} latent values are NaN/Inf "
                             "(the run diverged; try --dtype float32)")
    return lambda tmp: save_file({"latents": t}, str(tmp), metadata=metadata)


def load_latents(path):
    """(latents tensor, metadata dict) from a file written by ``save_latents``."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such latents file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            latents = f.get_tensor("latents")
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise InputError(f"{path} is not a readable latents file ({_reason(e)}); "
                         "delete it or start a new run") from None
    if latents.is_floating_point() and not torch.isfinite(latents).all():
        raise InputError(f"{path} holds NaN/Inf latents; delete it or start a new run")
    return latents, metadata


# ---- PNG metadata -------------------------------------------------------------------------------
_A1111_FIELDS = [  # (params key, A1111 label), in the order AUTOMATIC1111 writes them
    ("num_inference_steps", "Steps"), ("sampler", "Sampler"), ("guidance_scale", "CFG scale"), ("seed", "Seed"),
    ("size", "Size"), ("model_hash", "Model hash"), ("model", "Model"), ("strength", "Denoising strength"),
]
_RUN_FIELDS = ["image", "max_memory", "offload", "fp8"]  # after the phase and the DemoFusionConfig knobs


def demofusion_fields(config_cls=None) -> list[str]:
    """The keys written as "DemoFusion <key with spaces>" (or the label in _LABELS): the phase, every
    field of ``config_cls`` (default DemoFusionConfig), then the run's picture and placement."""
    return ["phase", *knob_names(config_cls), *_RUN_FIELDS]


_LABELS = {"image": "init image"}


def _a1111_value(value) -> str:
    """A value as A1111 writes it: lists of sizes as HxW,HxW; JSON-quoted if it holds , : " or a newline."""
    if isinstance(value, (list, tuple)):
        value = ",".join("x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in value)
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def _a1111_pairs(params: dict, config_cls=None) -> list[tuple[str, object]]:
    fields = dict(params)
    if params.get("width") is not None and params.get("height") is not None:
        fields["size"] = f"{params['width']}x{params['height']}"  # A1111 writes width first
    if fields.get("image") is not None:
        fields["image"] = os.path.basename(str(fields["image"]))
    if not fields.get("fp8"):
        fields.pop("fp8", None)  # said only when on
    pairs = [(label, fields[k]) for k, label in _A1111_FIELDS if fields.get(k) is not None]
    pairs += [("DemoFusion " + _LABELS.get(k, k.replace("_", " ")), fields[k])
              for k in demofusion_fields(config_cls) if fields.get(k) is not None]
    return pairs + [("Version", f"demofusion {params.get('version') or __version__}")]


def a1111_parameters(params: dict, config_cls=None) -> str:
    """The AUTOMATIC1111 ``parameters`` text: prompt lines, ``Negative prompt: …``, then ``Key: value, …``."""
    text = params.get("prompt") or ""
    if params.get("negative_prompt"):
        text += f"\nNegative prompt: {params['negative_prompt']}"
    return text + "\n" + ", ".join(f"{k}: {_a1111_value(v)}" for k, v in _a1111_pairs(params, config_cls))


def save_png(img, path, params: dict) -> None:
    atomic_write(path, png_writer(img, path, params))


def png_writer(img, path, params: dict) -> Callable[[Path], None]:
    """What ``save_png`` writes, as a ``write(tmp)`` for :func:`atomic_replace` (metadata checked now)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(META_KEY, _json_text(params, path))
    info.add_text(A1111_KEY, a1111_parameters(params))  # PIL writes iTXt when the text is not Latin-1
    return lambda tmp: img.save(tmp, format="PNG", pnginfo=info)


def read_png_params(path, option: str = "--from-image") -> dict:
    """The parameters a PNG written by ``save_png`` carries. Opens the file read-only."""
    from PIL import Image

    path, where = Path(path), f"{option} {path}"
    if path.is_dir():
        raise InputError(f"{where}: is a folder; give a PNG written by `demofusion generate`")
    if not path.is_file():
        raise InputError(f"{where}: no such file")
    try:
        with Image.open(path) as im:
            fmt = im.format
            text = im.text.get(META_KEY) if fmt == "PNG" else None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError… for damaged files
        raise InputError(f"{where}: not a readable image ({_reason(e)})") from None
    if fmt != "PNG":
        raise InputError(f"{where}: is a {fmt} image, not a PNG written by `demofusion generate`")
    if text is None:
        raise InputError(f"{where}: carries no demofusion metadata (was it written by `demofusion generate`?)")
    try:
        params = json.loads(text)
    except ValueError as e:
        raise InputError(f"{where}: its demofusion metadata is not valid JSON ({_reason(e)})") from None
    if not isinstance(params, dict) or _nonfinite_at(params):
        raise InputError(f"{where}: its demofusion metadata is not a JSON object of finite values")
    return params


# ---- output folders -----------------------------------------------------------------------------
def new_run_folder(root="out", seed=None, now: datetime | None = None) -> Path:
    """Create and return a fresh ``root/<YYYYmmdd-HHMMSS>-seed<seed>`` (``-2``, ``-3``… if taken)."""
    root = Path(root)
    base = (now or datetime.now()).strftime("%Y%m%d-%H%M%S") + ("" if seed is None else f"-seed{seed}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in count(1):
            folder = root / (base if n == 1 else f"{base}-{n}")
            try:
                folder.mkdir()  # exist_ok=False: two runs starting in the same second get different folders
                return folder
            except FileExistsError:
                continue
    except OSError as e:
        raise InputError(f"cannot create a run folder under {root} ({_reason(e)}); "
                         "give another --out") from None


def _listing(names: list[str], show: int = 3) -> str:
    return ", ".join(names[:show] + (["…"] if len(names) > show else []))


def check_output_folder(out, overwrite: bool, option: str = "--out", create: bool = True,
                        resumable: bool = True) -> None:
    """Make sure ``out`` is a writable folder we may write into; create it if missing (with
    ``create=False`` only check that it could be: nothing is written). Hidden files
    (``.DS_Store``, a leftover ``.x.tmp-…``) do not count as files. ``resumable``: the command has
    ``--resume`` (so the refusal may advise it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out}: is a file; give a folder")
    if out.is_dir():
        names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if names and not overwrite:
            resume = f", --resume {out} to continue that run," if resumable else ""
            raise InputError(f"{option} {out} already holds files ({_listing(names)}); pass --overwrite to "
                             f"replace them{resume} or another {option}")
    problem = "is not writable" if out.is_dir() else "cannot create it"
    if not create and not out.exists():
        parent = next(p for p in out.absolute().parents if p.exists())
        if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            raise InputError(f"{option} {out}: {problem} ({parent} is not a writable folder); give another {option}")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out, prefix=".write-probe-").close()  # can we create files there?
    except OSError as e:
        raise InputError(f"{option} {out}: {problem} ({_reason(e)}); give another {option}") from None
