"""The files a run's pixels come from, by hash: recorded with every run (run.json, the PNG
metadata) and compared with the files at hand when a run is replayed (``--from-image``: refused
unless ``--ignore-hashes``, then a warning) or resumed (always refused) — docs/images.md."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ..frontend.control import control_files, control_hashes, net_hashes
from ..frontend.errors import CLIError
from ..frontend.loading import model_fingerprint, parse_loras

# recorded key → (what the file is, the flags that name it: given on the command line, no comparison).
# The model last: the `tiny` preset's hash is of its weights as loaded, LoRAs fused, so a changed
# LoRA changes it too, and the LoRA is the file to name.
HASHED = {
    "image_sha256": ("the picture", ("image",)),
    "control_sha256": ("the control map's file", ("control_image", "control", "control_source")),
    "lora_hash": ("the LoRA file", ("lora",)),
    "vae_hash": ("the VAE", ("vae",)),
    "controlnet_hash": ("the ControlNet", ("controlnet",)),
    "model_hash": ("the model", ("model",)),
}


def sha256(path) -> str | None:
    """sha256 (first 16 hex) of a file's bytes, or None if it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def current_hashes(pipe, params: dict) -> dict:
    """The hashes of the files a run of ``params`` uses, as they are now (the model loaded in ``pipe``)."""
    loras = parse_loras(params.get("lora")) or []
    return {"model_hash": model_fingerprint(pipe, params["model"]),
            "vae_hash": model_fingerprint(pipe.vae, params["vae"], "vae") if params.get("vae") else None,
            "lora_hash": [model_fingerprint(None, f) for f, _ in loras] if loras else None,
            "controlnet_hash": net_hashes(pipe, params),
            "image_sha256": sha256(params["image"]) if params.get("image") else None,
            "control_sha256": control_hashes(params)}


def _files(key: str, params: dict) -> list:
    if key == "lora_hash":
        return [f for f, _ in parse_loras(params.get("lora")) or []]
    if key == "control_sha256":
        return control_files(params)
    value = params.get({"model_hash": "model", "vae_hash": "vae", "controlnet_hash": "controlnet",
                        "image_sha256": "image"}[key])
    return value if isinstance(value, list) else [value]


def differences(recorded: dict, now: dict, params: dict, given=()) -> list[str]:
    """'<what> <file> (hash <now>, recorded <then>)' for every recorded hash the file at hand does
    not have; keys whose flags are in ``given`` (the user named other files) are not compared."""
    out = []
    for key, (what, flags) in HASHED.items():
        if key == "model_hash" and not Path(str(params.get("model"))).exists():
            flags = (*flags, "lora")  # a preset's hash is of its loaded weights: another --lora changes it
        if recorded.get(key) is None or any(f in given for f in flags):
            continue
        then, cur = recorded[key], now.get(key)
        then, cur = (then, cur) if isinstance(then, list) else ([then], [cur])
        cur, files = list(cur or []), _files(key, params)
        for i, h in enumerate(then):
            c = cur[i] if i < len(cur) else None
            if h is not None and c != h:
                out.append(f"{what} {files[i] if i < len(files) else '?'} (hash {c}, recorded {h})")
    return out


def check_replay(png, recorded: dict, now: dict, params: dict, given, ignore: bool) -> None:
    """``--from-image``: the files at hand must be the ones the picture was made with."""
    found = differences(recorded, now, params, given)
    if found and not ignore:
        raise CLIError(f"--from-image {png}: {found[0]} is not the file the picture was made with; give the "
                       "original, or pass --ignore-hashes to replay with this one (the picture will differ)")
    for d in found:
        print(f"warning: {d} is not the file the picture was made with; replaying anyway (--ignore-hashes): "
              "the picture will differ", file=sys.stderr)


def check_resume(out, recorded: dict, now: dict, params: dict) -> None:
    """``--resume``: the files must be the ones the run started with (else its phases would mix)."""
    found = differences(recorded, now, params)
    if found:
        raise CLIError(f"--resume {out}: {found[0]} changed since the run started; give the original file, "
                       "or start a new run")
