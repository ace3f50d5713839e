"""Safetensors file integrity from the header alone: a truncated or corrupt file is caught
before any tensor is read."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from ..errors import first_line
from .common import WeightsError, _is_int, _json_type

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
        return None, [f"{p}: cannot be read ({first_line(e)}); check its permissions or re-download it"]

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
