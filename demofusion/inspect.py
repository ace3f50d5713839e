"""`demofusion inspect`: what a checkpoint is, from safetensors headers only (no tensor is read)."""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .weights import SINGLE_FILE_PREFIXES, WeightsError

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_header(path) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` from a safetensors header (the first 8 + n bytes of the file)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: only .safetensors files are inspected (pickles are never opened)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


@dataclass
class ComponentReport:
    name: str
    file: str
    params: int
    dtypes: dict
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    note: str = ""


@dataclass
class Report:
    path: str
    layout: str  # "diffusers folder" | "component folder" | "component file" | "single-file"
    kind: str
    components: list

    def text(self) -> str:
        lines = [f"{self.path}", f"  layout: {self.layout}", f"  model:  {self.kind}"]
        for c in self.components:
            dt = ", ".join(f"{k} ({v} tensors)" for k, v in c.dtypes.items())
            lines.append(f"  {c.name}: {c.params / 1e6:.2f} M parameters, {dt}  [{c.file}]")
            if c.note:
                lines.append(f"    {c.note}")
            for what, keys in (("missing", c.missing), ("unexpected", c.unexpected)):
                if keys:
                    more = f" … (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                    lines.append(f"    {len(keys)} {what} keys: {', '.join(keys[:8])}{more}")
            if not (c.missing or c.unexpected or c.note):
                lines.append("    keys match the model exactly")
        return "\n".join(lines)


def _meta(header: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Meta-device stand-ins for the file's tensors (shape and dtype only)."""
    return {k[len(prefix):]: torch.empty(s, dtype=_DTYPES.get(d, torch.float32), device="meta")
            for k, (d, s) in header.items() if k.startswith(prefix)}


def _expected(component: str, sd: dict, config: dict | None, kind: str) -> tuple[dict, set]:
    """(our-named file tensors, the key set of the model they describe), built on the meta device."""
    if component == "unet":
        from .unet import UNet, UNetConfig
        from .unet.convert import convert_sgm_unet
        from .unet.loading import infer_config

        if any(k.startswith("input_blocks.") for k in sd):
            sd = convert_sgm_unet(sd)
        cfg = UNetConfig.from_diffusers(config) if config else infer_config(sd, kind if kind in ("sdxl-base", "sdxl-turbo") else "sdxl-base")
        with torch.device("meta"):
            return sd, set(UNet(cfg).state_dict())
    if component == "vae":
        from .vae import AutoencoderKL, VAEConfig
        from .vae.convert import from_diffusers, from_ldm, infer_config, is_ldm_layout

        sd = from_ldm(sd) if is_ldm_layout(sd) else from_diffusers(sd)
        cfg = VAEConfig.from_diffusers(config) if config else infer_config(sd)
        with torch.device("meta"):
            return sd, set(AutoencoderKL(cfg).state_dict())
    from .text.clip import CLIPTextConfig, CLIPTextModel
    from .text.convert import from_open_clip, from_transformers, infer_config, is_open_clip_layout

    sd = from_open_clip(sd) if is_open_clip_layout(sd) else from_transformers(sd)
    enc = 1 if component == "text_encoder" else 2
    cfg = CLIPTextConfig.from_transformers(config) if config else infer_config(sd, enc)
    with torch.device("meta"):
        return sd, set(CLIPTextModel(cfg).state_dict())


def _component(name: str, file: Path, header: dict, prefix: str, config: dict | None, kind: str) -> ComponentReport:
    sub = {k: v for k, v in header.items() if k.startswith(prefix)}
    params = sum(int(torch.tensor(s).prod()) if s else 1 for _, s in sub.values())
    rep = ComponentReport(name, str(file), params, dict(Counter(d for d, _ in sub.values())))
    try:
        sd, want = _expected(name, _meta(header, prefix), config, kind)
        rep.missing = sorted(want - set(sd))
        rep.unexpected = sorted(set(sd) - want)
    except Exception as e:  # a file too far from any known model: say so, keep the rest of the report
        rep.note = f"key check not possible: {type(e).__name__}: {e}"
    return rep


def _guess_kind(unet: ComponentReport | None, config: dict | None, path: Path) -> str:
    if "turbo" in str(path).lower():
        return "sdxl-turbo"
    if config and config.get("sample_size") == 64:
        return "sdxl-turbo"
    if config and config.get("sample_size") == 128 and unet is not None and unet.params > 2e9:
        return "sdxl-base"
    if unet is None:
        return "unknown (no UNet)"
    if unet.params > 2e9:
        return "sdxl-base (or sdxl-turbo: same network; the weights alone cannot tell)"
    return "small / custom SDXL-like model (e.g. the tiny preset)"


def _config(folder: Path) -> dict | None:
    f = folder / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _weights_in(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.safetensors"))
    return (min(files, key=lambda f: (".fp16." in f.name, f.name)) if files else None)


def inspect(path) -> Report:
    """Describe a model folder, component folder or safetensors file without loading tensors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{path} does not exist (download weights with `demofusion download sdxl-base --dir weights/`)")
    if path.is_file():
        header = read_header(path)
        single = [c for c in COMPONENTS if any(k.startswith(SINGLE_FILE_PREFIXES[c]) for k in header)]
        if single:
            reps = [_component(c, path, header, SINGLE_FILE_PREFIXES[c], None, "sdxl-base") for c in single]
            unet = next((r for r in reps if r.name == "unet"), None)
            return Report(str(path), "single-file (SGM) checkpoint", _guess_kind(unet, None, path), reps)
        comp = _guess_component(header)
        rep = _component(comp, path, header, "", _config(path.parent), "sdxl-base")
        return Report(str(path), f"component file ({comp}, diffusers keys)", _guess_kind(rep if comp == "unet" else None, _config(path.parent), path), [rep])
    subs = [c for c in COMPONENTS if (path / c).is_dir()]
    if subs:
        reps, ucfg = [], _config(path / "unet") if "unet" in subs else None
        for c in subs:
            f = _weights_in(path / c)
            if f is None:
                reps.append(ComponentReport(c, str(path / c), 0, {}, note="no .safetensors file in this folder"))
                continue
            reps.append(_component(c, f, read_header(f), "", _config(path / c), "sdxl-base"))
        unet = next((r for r in reps if r.name == "unet"), None)
        layout = "diffusers folder" + ("" if (path / "model_index.json").is_file() else " (no model_index.json)")
        return Report(str(path), layout, _guess_kind(unet, ucfg, path), reps)
    f = _weights_in(path)
    if f is None:
        raise WeightsError(f"{path} holds no .safetensors file and no unet/ vae/ text_encoder/ folders")
    header = read_header(f)
    comp = _guess_component(header)
    rep = _component(comp, f, header, "", _config(path), "sdxl-base")
    return Report(str(path), f"component folder ({comp})", _guess_kind(rep if comp == "unet" else None, _config(path), path), [rep])


def _guess_component(header: dict) -> str:
    keys = set(header)
    if any(k.startswith(("down_blocks.", "input_blocks.", "time_embedding.")) and "attentions" in k or k.startswith("add_embedding") for k in keys):
        return "unet"
    if any(k.startswith(("encoder.down", "decoder.up", "quant_conv")) for k in keys):
        return "vae"
    if any("text_projection" in k for k in keys):
        return "text_encoder_2"
    return "text_encoder"
