"""Finding, reading and loading official weight files (safetensors only by default).

One place for what every component loader needs:

* :func:`resolve_component` turns a user's path (a diffusers model folder, its component
  subfolder, or a single ``.safetensors`` file) into the weights file and its ``config.json``;
* :func:`read_tensors` reads a safetensors file, optionally only the keys under one prefix
  (so a 7 GB single-file checkpoint is never read whole to get its VAE);
* :func:`build_and_load` builds a module on the meta device and assigns the tensors into it,
  after checking that every expected key is present with the expected shape — so loading
  never needs twice the model's size in RAM and never silently leaves random weights.

Every check here is shared with ``demofusion inspect`` so both say the same thing in the same
words: :func:`safetensors_header` (file integrity from the header alone: a truncated or corrupt
file is caught before any tensor is read), :func:`read_config` (config.json readable, an
object, known fields of the right type), :func:`config_errors` (a config.json that does not
describe a buildable model), :func:`fit_problems` + :func:`word_fit_problems` (missing,
unexpected and mis-shaped keys). Each problem is one line that starts with the file it is
about and ends with the fix.

Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) are refused unless the caller
passes ``allow_pickle=True`` (and even then they are read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from demofusion.errors import InputError

__all__ = [
    "WeightsError",
    "PICKLE_SUFFIXES",
    "SINGLE_FILE_PREFIXES",
    "resolve_component",
    "read_tensors",
    "read_keys",
    "read_config",
    "build_and_load",
    "read_json",
    "check_state_dict",
    "fit_problems",
    "word_fit_problems",
    "FitProblems",
    "safetensors_header",
    "config_errors",
    "build_meta",
    "COMPONENT_NAMES",
    "SAFETENSORS_DTYPE_SIZES",
    "is_single_file",
    "parse_dtype",
]

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")

# Key prefixes of the original (SGM / "single-file") SDXL checkpoints.
SINGLE_FILE_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}


# How loaders and `demofusion inspect` name each component in their messages.
COMPONENT_NAMES = {
    "unet": "UNet",
    "vae": "VAE",
    "text_encoder": "text encoder 1",
    "text_encoder_2": "text encoder 2",
}


class WeightsError(InputError):
    """A weight file is missing, unreadable, of the wrong layout, or does not fit the model.

    An :class:`~demofusion.errors.InputError` (so a ``ValueError``); the first line of the
    message names the file and the fix.
    """


def parse_dtype(dtype) -> torch.dtype:
    """Accept a torch dtype or a name such as ``"fp16"``, ``"bfloat16"``, ``"float32"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    }
    try:
        return names[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def _refuse_pickle(path: Path) -> None:
    raise WeightsError(
        f"{path} is a pickle checkpoint ({path.suffix}); pickles can run arbitrary code and are "
        "refused by default. Use the .safetensors release of these weights "
        "(`demofusion download …` fetches only safetensors), or pass allow_pickle=True if you "
        "trust this file."
    )


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; anything else is a one-line :class:`WeightsError`."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory, not a JSON file; remove it or re-download it")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({_one_line(e)}); fix it or re-download it") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({_one_line(e)}); check its permissions or re-download it") from None
    if not isinstance(data, dict):
        raise WeightsError(
            f"{path}: holds a JSON {_json_type(data)}, not an object; fix it or re-download it")
    return data


def read_config(folder: Path) -> dict | None:
    """``folder/config.json`` (checked: valid JSON, an object, known fields well typed), or None."""
    cfg = Path(folder) / "config.json"
    if not cfg.exists():
        return None
    data = read_json(cfg)
    _check_config_types(data, cfg)
    return data


def _one_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _json_type(v) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_int(x) for x in v)


_INT = (lambda v: _is_int(v), "an integer")
_INT_OR_LIST = (lambda v: _is_int(v) or _int_list(v), "an integer or a list of integers")
_INT_LIST = (_int_list, "a non-empty list of integers")
_NUM = (_is_num, "a number")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_STR = (lambda v: isinstance(v, str), "a string")
_STR_LIST = (lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
             "a non-empty list of strings")

# Field types of the diffusers / transformers config.json files that the loaders read
# (null is accepted everywhere: it means "the default"). A wrong type is reported here, naming
# the field, instead of failing somewhere inside the model's constructor.
_CONFIG_TYPES = {
    "_class_name": _STR, "model_type": _STR, "act_fn": _STR, "hidden_act": _STR,
    "in_channels": _INT, "out_channels": _INT, "latent_channels": _INT, "norm_num_groups": _INT,
    "addition_time_embed_dim": _INT, "projection_class_embeddings_input_dim": _INT,
    "vocab_size": _INT, "hidden_size": _INT, "intermediate_size": _INT, "num_hidden_layers": _INT,
    "max_position_embeddings": _INT, "projection_dim": _INT, "freq_shift": _INT,
    "block_out_channels": _INT_LIST,
    "layers_per_block": _INT_OR_LIST, "transformer_layers_per_block": _INT_OR_LIST,
    "attention_head_dim": _INT_OR_LIST, "num_attention_heads": _INT_OR_LIST,
    "cross_attention_dim": _INT_OR_LIST, "sample_size": _INT_OR_LIST,
    "norm_eps": _NUM, "layer_norm_eps": _NUM, "scaling_factor": _NUM,
    "use_linear_projection": _BOOL, "flip_sin_to_cos": _BOOL, "force_upcast": _BOOL,
    "mid_block_add_attention": _BOOL, "use_quant_conv": _BOOL, "use_post_quant_conv": _BOOL,
    "down_block_types": _STR_LIST, "up_block_types": _STR_LIST, "architectures": _STR_LIST,
}


def _check_config_types(cfg: dict, path: Path) -> None:
    for key, (ok, want) in _CONFIG_TYPES.items():
        v = cfg.get(key)
        if v is not None and not ok(v):
            shown = json.dumps(v)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise WeightsError(f"{path}: {key!r} is {shown}, expected {want}; fix it or re-download it")


@contextmanager
def config_errors(config_file: str | os.PathLike | None, what: str) -> Iterator[None]:
    """Turn an error raised while reading ``config_file`` into a model (or building the model
    from it) into a one-line :class:`WeightsError` naming the file; no-op for ``None``."""
    if config_file is None:
        yield
        return
    try:
        yield
    except WeightsError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        why = f"missing field {e}" if isinstance(e, KeyError) else _one_line(e)
        raise WeightsError(
            f"{config_file}: does not describe a loadable {what} ({why}); fix it or re-download it"
        ) from None


def resolve_component(
    path: str | os.PathLike,
    subfolder: str,
    stems: Iterable[str],
    variant: str | None = None,
    allow_pickle: bool = False,
) -> tuple[Path, dict | None]:
    """Find the weights file (and config) of one component.

    ``path`` may be: a diffusers model folder (``path/subfolder/stem[.variant].safetensors``),
    the component folder itself, or a weights file. ``stems`` are the file names without
    suffix that the component uses (``diffusion_pytorch_model`` or ``model``). Without an
    explicit ``variant`` the full-precision file is preferred, then ``.fp16``.
    Returns ``(weights_file, config_or_None)``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(
            f"weights not found: {p} does not exist. Download them with "
            "`demofusion download sdxl-base --dir weights/` (or sdxl-turbo), or pass the path "
            "of a diffusers model folder or a .safetensors checkpoint."
        )
    if p.is_dir() and p.suffix == ".safetensors":
        raise WeightsError(_directory_problem(p))
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES and not allow_pickle:
            _refuse_pickle(p)
        return p, read_config(p.parent)

    folder = p / subfolder if (p / subfolder).is_dir() else p
    stems = list(stems)
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        for stem in stems:
            name = f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors"
            if (folder / name).exists():  # a directory of that name is reported when read
                return folder / name, read_config(folder)
    # Sharded safetensors (index json) are not used by SDXL's released components.
    pickles = sorted(q.name for q in folder.glob("*") if q.suffix in PICKLE_SUFFIXES)
    if pickles:
        if allow_pickle:
            return folder / pickles[0], read_config(folder)
        _refuse_pickle(folder / pickles[0])
    wanted = ", ".join(
        (f"{s}.{v}.safetensors" if v else f"{s}.safetensors") for v in variants for s in stems
    )
    raise WeightsError(
        f"no weights for '{subfolder}' in {p}: looked for {wanted} in {folder}. "
        "Point at a diffusers model folder (with a "
        f"'{subfolder}/' subfolder), the '{subfolder}/' folder itself, or a .safetensors file; "
        "`demofusion download` fetches the official files."
    )


# Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


def _directory_problem(path: Path) -> str:
    return (f"{path}: is a directory, not a .safetensors file; point at the weights file "
            "(or its model folder) or re-download it")


def safetensors_header(path: str | os.PathLike) -> tuple[dict | None, list[str]]:
    """Read and check the header of a safetensors file, without reading any tensor.

    Returns ``(header, problems)``: ``header`` maps each tensor name to its entry
    (``dtype``, ``shape``, ``data_offsets``; ``__metadata__`` left out), or is ``None`` when
    the header cannot be read. ``problems`` are one-line messages (each starting with the
    path, ending with the fix): a zero-byte, truncated or non-safetensors file, a corrupt
    header (malformed entries, a tensor whose byte length is not numel × dtype size, offsets
    that overlap or leave gaps), or a file whose size is not ``8 + header length + last
    offset``. A file with no problems is one the safetensors library will open.
    """
    p = Path(path)
    if p.is_dir():
        return None, [_directory_problem(p)]
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            first = f.read(1)
            raw = first + f.read(n - 1) if len(head) == 8 and 0 < n <= min(size - 8, _MAX_HEADER) else b""
    except OSError as e:
        return None, [f"{p}: cannot be read ({_one_line(e)}); check its permissions or re-download it"]

    def unreadable(why: str) -> tuple[None, list[str]]:
        return None, [f"{p}: not a safetensors file (header unreadable: {why}); re-download it"]

    def truncated(need: int) -> str:
        return f"{p}: truncated: the file has {size} bytes, its header needs {need} (re-download it)"

    if size == 0:
        return None, [f"{p}: empty file (0 bytes); re-download it"]
    if size < 8:
        return None, [f"{p}: truncated: the file has {size} bytes, its header needs at least 8 (re-download it)"]
    if n > size - 8:
        if n > _MAX_HEADER or (first and first != b"{"):
            return unreadable(f"it declares a {n}-byte header but the file has {size} bytes")
        return None, [truncated(8 + n)]
    if n > _MAX_HEADER:
        return unreadable(f"a {n}-byte header is larger than the format allows")
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return unreadable("not UTF-8 text")
    except json.JSONDecodeError as e:
        return unreadable(f"invalid JSON: {e}")
    if not isinstance(header, dict):
        return unreadable(f"a JSON {_json_type(header)}, not an object")

    def corrupt(why: str) -> tuple[None, list[str]]:
        return None, [f"{p}: corrupt header: {why}; re-download it"]

    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        return corrupt("__metadata__ is not a map of strings")
    spans = []
    for k, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            return corrupt(f"tensor {k!r} lacks dtype, shape or data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in SAFETENSORS_DTYPE_SIZES:
            return corrupt(f"tensor {k!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            return corrupt(f"tensor {k!r} has shape {shape!r}, not a list of sizes")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)
                and offs[0] <= offs[1]):
            return corrupt(f"tensor {k!r} has data_offsets {offs!r}, not [begin, end]")
        need = math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]
        if offs[1] - offs[0] != need:
            return corrupt(f"tensor {k!r} ({dtype} {shape}) needs {need} bytes but its data_offsets "
                           f"span {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], k))
    end = 0
    for begin, stop, k in sorted(spans):
        if begin != end:
            return corrupt(f"tensor {k!r} starts at byte {begin} of the data, expected {end} "
                           "(tensors overlap or leave gaps)")
        end = stop
    if 8 + n + end > size:
        return header, [truncated(8 + n + end)]
    if 8 + n + end < size:
        return header, [f"{p}: corrupt: the file has {size} bytes, its header describes "
                        f"{8 + n + end} ({size - 8 - n - end} bytes too many); re-download it"]
    return header, []


def _checked_header(path: Path) -> dict:
    header, problems = safetensors_header(path)
    if problems:
        raise WeightsError("\n".join(problems))
    return header


def read_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file (its header checked), without reading any tensor."""
    return list(_checked_header(Path(path)))


def read_tensors(
    path: str | os.PathLike,
    prefix: str | None = None,
    strip_prefix: bool = True,
    allow_pickle: bool = False,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file; with ``prefix`` only those keys (prefix stripped)."""
    p = Path(path)
    if p.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            _refuse_pickle(p)
        if p.is_dir():
            raise WeightsError(f"{p}: is a directory, not a checkpoint file; re-download it")
        try:
            sd = torch.load(p, map_location=device, weights_only=True)
        except Exception as e:  # any unpickling failure: a damaged or foreign file
            raise WeightsError(
                f"{p}: cannot be read as a pickle checkpoint ({type(e).__name__}: {_one_line(e)}); "
                "re-download it") from None
        if isinstance(sd, Mapping):
            sd = sd.get("state_dict", sd)
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise WeightsError(f"{p}: holds no state dict of tensors; re-download it")
        items = sd.items()
    else:
        from safetensors import SafetensorError, safe_open

        _checked_header(p)  # cheap, and catches truncation even where safetensors maps lazily
        try:
            with safe_open(str(p), framework="pt", device=device) as f:
                keys = [k for k in f.keys() if prefix is None or k.startswith(prefix)]
                items = [(k, f.get_tensor(k)) for k in keys]
        except (SafetensorError, OSError) as e:
            raise WeightsError(
                f"{p}: not a safetensors file (unreadable: {_one_line(e)}); re-download it") from None
    out = {}
    for k, v in items:
        if prefix is not None:
            if not k.startswith(prefix):
                continue
            if strip_prefix:
                k = k[len(prefix):]
        out[k] = v
    return out


def is_single_file(keys: Iterable[str], component: str) -> bool:
    """Whether ``keys`` are in the original single-file layout for ``component``."""
    prefix = SINGLE_FILE_PREFIXES[component]
    return any(k.startswith(prefix) for k in keys)


def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


@dataclass
class FitProblems:
    """How a state dict differs from a model's: key names, and (key, file shape, model shape)."""

    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def fit_problems(
    expected: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    ignore: Callable[[str], bool] = lambda k: False,
) -> FitProblems:
    """Missing, unexpected and mis-shaped keys of ``state_dict`` against ``expected``.

    Values on both sides may be tensors (real or meta) or shapes; used by the loaders (via
    :func:`check_state_dict`) and by ``demofusion inspect`` (with shapes from the header).
    """
    got = {k for k in state_dict if not ignore(k)}
    return FitProblems(
        missing=sorted(set(expected) - got),
        unexpected=sorted(got - set(expected)),
        mismatched=sorted(
            (k, _shape(state_dict[k]), _shape(expected[k]))
            for k in set(expected) & got
            if _shape(state_dict[k]) != _shape(expected[k])
        ),
    )


def word_fit_problems(problems: FitProblems, what: str, file: str | os.PathLike | None = None) -> str:
    """The message for ``problems``: a one-line summary (naming ``file``), then the key lists."""

    def count(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    def few(items: list, n: int = 3) -> str:
        return ", ".join(items[:n]) + (f", … (+{len(items) - n} more)" if len(items) > n else "")

    def show(items: list, n: int = 12) -> str:
        more = f" … (+{len(items) - n} more)" if len(items) > n else ""
        return "\n    " + "\n    ".join(items[:n]) + more

    wrong = [f"{k}: file {f} vs model {m}" for k, f, m in problems.mismatched]
    summary = []
    if problems.missing:
        summary.append(f"{count(len(problems.missing), 'missing key', 'missing keys')} ({few(problems.missing)})")
    if problems.unexpected:
        summary.append(f"{count(len(problems.unexpected), 'unexpected key', 'unexpected keys')} "
                       f"({few(problems.unexpected)})")
    if wrong:
        summary.append(f"{count(len(wrong), 'shape mismatch', 'shape mismatches')} ({few(wrong)})")
    where = f"{file}: " if file is not None else ""
    msg = [f"{where}the weights do not fit the {what}: " + "; ".join(summary)]
    if problems.missing:
        msg.append(f"  {len(problems.missing)} missing key(s):{show(problems.missing)}")
    if problems.unexpected:
        msg.append(f"  {len(problems.unexpected)} unexpected key(s):{show(problems.unexpected)}")
    if wrong:
        msg.append(f"  {len(wrong)} shape mismatch(es):{show(wrong)}")
    msg.append(
        "  Check that the file is the right component and model kind (SDXL base / Turbo) "
        "and that its config.json matches it; re-download it if it was damaged."
    )
    return "\n".join(msg)


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple],
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    ignore: Callable[[str], bool] = lambda k: False,
    file: str | os.PathLike | None = None,
) -> None:
    """Raise a :class:`WeightsError` naming every missing, unexpected and mis-shaped key."""
    problems = fit_problems(expected, state_dict, ignore)
    if problems:
        raise WeightsError(word_fit_problems(problems, what, file))


def build_meta(
    factory: Callable[[], nn.Module], what: str, config_file: str | os.PathLike | None = None
) -> nn.Module:
    """``factory()`` on the meta device; errors blamed on ``config_file`` when it is given."""
    with config_errors(config_file, what), torch.device("meta"):
        return factory()


def build_and_load(
    factory: Callable[[], nn.Module],
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    ignore: Callable[[str], bool] = lambda k: False,
    file: str | os.PathLike | None = None,
    config_file: str | os.PathLike | None = None,
) -> nn.Module:
    """Build ``factory()`` on the meta device, check ``state_dict`` against it, assign it.

    ``file`` (the weights file) starts the message of a mismatch; errors while building the
    module are blamed on ``config_file`` (the config.json it was built from) when given.

    Tensors are cast to ``dtype`` (default: keep the file's dtype) and moved to ``device``
    one at a time, so peak memory stays near one copy of the weights. Modules must keep all
    their state in the state dict (no non-persistent buffers), since meta tensors are never
    materialised.
    """
    module = build_meta(factory, what, config_file)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, what, ignore, file)
    dtype = parse_dtype(dtype) if dtype is not None else None
    sd = {}
    for k in expected:
        t = state_dict[k]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        sd[k] = t.to(device)
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left unset after loading: {left[:5]}")
    return module.eval().requires_grad_(False)
