"""Reading LoRA files and mapping their keys to our modules.

Two layouts are read, both as ``.safetensors``:

* **kohya / A1111** (also LoCon): ``lora_unet_<path>.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha``; ``lora_te1_…`` is text encoder 1 (CLIP ViT-L), ``lora_te2_…`` text encoder 2
  (OpenCLIP bigG). ``<path>`` is a module path with every ``.`` written ``_``, in diffusers
  names (``down_blocks_1_attentions_0_…``) or, as kohya's SDXL trainer writes, in the original
  SGM names (``input_blocks_4_1_…``, ``middle_block_…``, ``output_blocks_…``).
* **diffusers / PEFT**: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (also the older
  ``.lora.down.weight`` / ``.lora.up.weight``, ``.lora_linear_layer.down/up.weight``, the
  attention-processor names ``….processor.to_q_lora.down.weight`` and an optional ``.alpha``),
  ``text_encoder.…``, ``text_encoder_2.…``; a file with none of those prefixes is UNet-only
  (``base_model.model.`` before the path, as PEFT saves, is dropped).
  Alphas written by diffusers into the file's metadata (``lora_adapter_metadata``) are read.

Underscore-joined kohya paths are ambiguous (``to_q``, ``proj_in``, ``transformer_blocks``…):
they are split into the words that our own modules' names are made of (read from the module
classes themselves), the split with the fewest words winning; SGM names are then renamed with
the UNet's own single-file map (:mod:`demofusion.unet.convert`) for SDXL's block structure.
Whether each module exists, and has the right shape, is checked when the LoRA is fused.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from demofusion.errors import InputError, first_line
from demofusion.text.clip import CLIPTextConfig, CLIPTextModel
from demofusion.unet import UNet
from demofusion.unet.convert import RESNET_RENAMES, _rename, sgm_key_map
from demofusion.weights import PICKLE_SUFFIXES, WeightsError, read_tensors

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
SD15_TEXT_PREFIX = "lora_te_"
# SDXL's block structure (levels, layers per block, attention per level): what SGM names index.
SDXL_SGM_STRUCTURE = (3, 2, (False, True, True))
_SHOWN = 3  # offending keys named in one message


class LoraError(InputError):
    """A LoRA file that cannot be used as given; the one-line message names the file and the fix."""


@dataclass
class LoraTarget:
    """One low-rank update: ``W += scale · (alpha / rank) · up @ down`` on one module's weight.

    ``down`` is ``[rank, in]`` (``[rank, in, kh, kw]`` for a convolution), ``up`` is
    ``[out, rank]`` (``[out, rank, 1, 1]``); ``alpha`` None means ``alpha = rank``.
    ``keys`` are the file's keys it came from (for messages).
    """

    component: str
    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    keys: tuple = ()

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def factor(self) -> float:
        """``alpha / rank`` (1 when the file gives no alpha)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoRA:
    """The updates of one LoRA file, per target module (in our module names)."""

    targets: list[LoraTarget]
    source: str = "<LoRA>"
    layout: str = "diffusers"
    name: str = "lora"

    @property
    def components(self) -> set[str]:
        return {t.component for t in self.targets}

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        counts = {c: sum(t.component == c for t in self.targets) for c in COMPONENTS}
        what = ", ".join(f"{c}: {n}" for c, n in counts.items() if n)
        return f"LoRA({self.name!r}, {self.layout} layout, {len(self)} targets ({what}))"


# ---------------------------------------------------------------- messages -------------------
def listing(keys) -> str:
    """``'a', 'b', 'c' and 4 more`` — the first few of ``keys``."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    more = len(keys) - _SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def sd15_error(source: str, why: str) -> LoraError:
    return LoraError(f"{source}: this is an SD 1.5/2.x LoRA ({why}); this pipeline runs SDXL, "
                     "so SDXL LoRAs are needed: use the SDXL version of this LoRA")


# ---------------------------------------------------------------- reading the file -----------
def read_lora(path: str | os.PathLike, allow_pickle: bool = False) -> LoRA:
    """Read a LoRA (``.safetensors``; a folder holding one file, such as diffusers'
    ``pytorch_lora_weights.safetensors``) and map every key to one of our modules.

    Pickles (``.ckpt``, ``.pt``, ``.bin``…) are refused unless ``allow_pickle=True``.
    Raises :class:`LoraError` (one line) for a missing, truncated or corrupt file, a pickle,
    an SD 1.5 LoRA, or keys that cannot be used.
    """
    p = _lora_file(Path(path).expanduser())
    if p.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise LoraError(f"{p} is a pickle file ({p.suffix}); pickles can run arbitrary code and are refused: "
                        "use the .safetensors release of this LoRA, or pass allow_pickle=True if you trust it")
    try:
        tensors = read_tensors(p, allow_pickle=allow_pickle)
    except WeightsError as e:
        raise LoraError(first_line(e)) from None
    metadata = _metadata(p) if p.suffix not in PICKLE_SUFFIXES else {}
    return parse_lora(tensors, metadata, source=str(p), name=p.stem)


def _lora_file(p: Path) -> Path:
    if not p.exists():
        raise LoraError(f"LoRA not found: {p} does not exist; pass the path of a .safetensors LoRA file")
    if not p.is_dir():
        return p
    files = sorted(p.glob("*.safetensors"))
    if len(files) != 1:
        found = "no .safetensors file" if not files else f"{len(files)} .safetensors files"
        raise LoraError(f"{p}: a folder with {found}; pass the path of the LoRA's .safetensors file itself")
    return files[0]


def _metadata(p: Path) -> dict:
    """diffusers' LoRA adapter metadata (flat ``"<component>.<LoraConfig field>"`` keys), or {}."""
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"{p}: its lora_adapter_metadata is not valid JSON ({e}); re-download the file") from None
    return meta if isinstance(meta, dict) else {}


def parse_lora(tensors: dict, metadata: dict | None = None, source: str = "<LoRA>", name: str = "lora") -> LoRA:
    """A :class:`LoRA` from a file's tensors (any of the two layouts)."""
    if not tensors:
        raise LoraError(f"{source}: holds no tensors; is it a LoRA file? Re-download it")
    if any(k.startswith(SD15_TEXT_PREFIX) for k in tensors):
        raise sd15_error(source, "kohya keys 'lora_te_…' for a single text encoder")
    kohya = any(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors)
    groups, bad = (_kohya_groups if kohya else _diffusers_groups)(tensors)
    if bad:
        raise LoraError(f"{source}: {len(bad)} of {len(tensors)} keys cannot be used ({bad[0][1]}): "
                        f"{listing(k for k, _ in bad)}; use an SDXL LoRA in the kohya or diffusers layout "
                        "(LoHa, LoKr, DoRA and other LyCORIS variants are not supported)")
    _check_pairs(source, groups)
    _check_finite(source, groups)
    alphas = _metadata_alphas(metadata or {}, source)
    targets = [_target(comp, module, parts, alphas) for (comp, module), parts in groups.items()]
    return LoRA(targets, source, "kohya" if kohya else "diffusers", name)


def _check_pairs(source: str, groups: dict) -> None:
    """Every module has a down and an up weight that form a low-rank pair, and alphas are scalars."""
    def refuse(keys: list, what: str, fix: str = "re-download the file"):
        if keys:
            raise LoraError(f"{source}: {len(keys)} {what}: {listing(keys)}; {fix}")

    refuse([next(iter(p.values()))[0] for p in groups.values() if not {"down", "up"} <= set(p)],
           "modules have only part of a down/up pair", "the file is incomplete: re-download it")
    refuse([p["down"][0] for p in groups.values() if not _pair_fits(p["down"][1], p["up"][1])],
           "down/up pairs are not [rank, in(, kh, kw)] and [out, rank(, 1, 1)]")
    refuse([p["alpha"][0] for p in groups.values() if "alpha" in p and p["alpha"][1].numel() != 1],
           "alphas are not single numbers")


def _check_finite(source: str, groups: dict) -> None:
    """Every value of the file is finite: a NaN/Inf in a LoRA would turn every picture into NaN."""
    if bad := [key for parts in groups.values() for key, t in parts.values() if not bool(torch.isfinite(t).all())]:
        raise LoraError(f"{source}: {len(bad)} tensors hold NaN/Inf values: {listing(bad)}; the file is damaged "
                        "(or was trained into NaN): re-download it or use another LoRA")


def _target(component: str, module: str, parts: dict, meta_alpha) -> LoraTarget:
    down, up = parts["down"][1], parts["up"][1]
    if "alpha" in parts:
        alpha = float(parts["alpha"][1].float().item())  # finite: _check_finite
    else:
        alpha = meta_alpha(component, module, down.shape[0])
    keys = tuple(parts[r][0] for r in ("down", "up", "alpha") if r in parts)
    return LoraTarget(component, module, down, up, alpha, keys)


def _pair_fits(down: torch.Tensor, up: torch.Tensor) -> bool:
    if down.ndim != up.ndim or down.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
        return False
    return down.ndim == 2 or tuple(up.shape[2:]) == (1, 1)


def _add(groups: dict, bad: list, key: str, tensor, where: tuple | None, role: str, why: str = "") -> None:
    """Record ``key`` as the ``role`` (down/up/alpha) of module ``where`` = (component, path),
    or, where it is None, as a problem (``why``)."""
    if where is None:
        bad.append((key, why))
    elif role in groups.setdefault(where, {}):
        bad.append((key, f"a second {role} for {where[0]} module {where[1]}"))
    else:
        groups[where][role] = (key, tensor)


# ---------------------------------------------------------------- kohya layout --------------
_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def _kohya_groups(tensors: dict):
    groups, bad = {}, []
    for key, tensor in tensors.items():
        flat, _, suffix = key.partition(".")
        prefix = next((p for p in KOHYA_PREFIXES if flat.startswith(p)), None)
        role = _KOHYA_SUFFIXES.get(suffix)
        if prefix is None or role is None:
            why = "not a kohya LoRA key" if prefix is None else f"unsupported kind '.{suffix}'"
            _add(groups, bad, key, tensor, None, "", why)
            continue
        component = KOHYA_PREFIXES[prefix]
        module, why = kohya_module(component, flat[len(prefix):])
        _add(groups, bad, key, tensor, module and (component, module), role, why)
    return groups, bad


def kohya_module(component: str, flat: str) -> tuple[str | None, str]:
    """Our module path for a kohya underscore-joined name (``"down_blocks_1_…_to_q"``), or
    ``(None, reason)``."""
    split = segment(flat, _vocabulary(component))
    if split is None:
        return None, f"'{flat}' is not made of {component} module names"
    words, unique = split
    if not unique:
        return None, f"'{flat}' splits into {component} module names in more than one way"
    path = ".".join(words)
    if component != "unet":
        return path.removeprefix("text_model."), ""
    if words[0] in {k.split(".")[0] for k in _sdxl_sgm_map()}:
        ours = sgm_to_ours(path)
        return (ours, "") if ours else (None, f"SGM name '{path}' is not an SDXL UNet module")
    return path, ""


def segment(flat: str, words: frozenset) -> tuple[list[str], bool] | None:
    """Split ``a_b_c`` into known words and integers, with as few pieces as possible.

    Returns ``(pieces, unique)`` (``unique`` False when another split has as few pieces),
    or None when no split exists.
    """
    parts = flat.split("_")

    @functools.lru_cache(maxsize=None)
    def best(i: int):  # (pieces, number of splits with that many pieces, one such split) of parts[i:]
        if i == len(parts):
            return 0, 1, ()
        found = None
        for j in range(i + 1, len(parts) + 1):
            word = "_".join(parts[i:j])
            rest = best(j) if word in words or (j == i + 1 and word.isdigit()) else None
            if rest is None:
                continue
            if found is None or rest[0] + 1 < found[0]:
                found = (rest[0] + 1, rest[1], (word,) + rest[2])
            elif rest[0] + 1 == found[0]:
                found = (found[0], found[1] + rest[1], found[2])
        return found

    result = best(0)
    return None if result is None else (list(result[2]), result[1] == 1)


@functools.lru_cache(maxsize=None)
def _vocabulary(component: str) -> frozenset:
    """The words our module names are made of, read from small instances of the module classes
    (built on the meta device: no memory); the UNet's also has the SGM names' words."""
    with torch.device("meta"):
        model = UNet("tiny") if component == "unet" else CLIPTextModel(CLIPTextConfig.preset("tiny-g"))
    names = [n for n, _ in model.named_modules()]
    if component == "unet":
        names += list(_sdxl_sgm_map()) + list(RESNET_RENAMES)
    else:
        names.append("text_model")
    return frozenset(w for n in names for w in n.split(".") if w and not w.isdigit())


@functools.lru_cache(maxsize=None)
def _sdxl_sgm_map() -> dict:
    return sgm_key_map(*SDXL_SGM_STRUCTURE)


def sgm_to_ours(path: str) -> str | None:
    """An SGM module path (``input_blocks.1.0.in_layers.2``) → ours (``down_blocks.0.resnets.0.conv1``),
    by the single-file converter's own renaming of the module's weight."""
    key = _rename(path + ".weight", _sdxl_sgm_map())
    return None if key is None else key.removesuffix(".weight")


# ---------------------------------------------------------------- diffusers / PEFT layout ---
_DIFFUSERS_KEY = re.compile(
    r"(?P<path>.+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|(?:lora|lora_linear_layer)\.(?:down|up)\.weight|alpha)")
_PROCESSOR_KEY = re.compile(r"(?P<path>.+?)\.(?:processor\.)?to_(?P<which>q|k|v|out)_lora\.(?P<dir>down|up)\.weight")
_PROCESSOR_MODULES = {"unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
                      "text": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}


def _diffusers_groups(tensors: dict):
    prefixed = any(k.split(".", 1)[0] in COMPONENTS for k in tensors)
    groups, bad = {}, []
    for key, tensor in tensors.items():
        head, _, rest = key.partition(".")
        if prefixed:
            component = head if head in COMPONENTS else None
        else:  # a UNet-only file; PEFT's own save may prefix its keys with base_model.model.
            component, rest = "unet", key.removeprefix("base_model.model.")
        if component is None:
            _add(groups, bad, key, tensor, None, "", "no unet./text_encoder./text_encoder_2. prefix")
            continue
        module, role, why = diffusers_module(component, rest)
        _add(groups, bad, key, tensor, module and (component, module), role, why)
    return groups, bad


def diffusers_module(component: str, rest: str) -> tuple[str | None, str, str]:
    """``(our module path, role, "")`` for a diffusers key without its component prefix,
    or ``(None, "", reason)``."""
    if m := _PROCESSOR_KEY.fullmatch(rest):
        table = _PROCESSOR_MODULES["unet" if component == "unet" else "text"]
        path, role = f"{m['path']}.{table[m['which']]}", m["dir"]
    elif m := _DIFFUSERS_KEY.fullmatch(rest):
        path, kind = m["path"], m["kind"]
        role = "alpha" if kind == "alpha" else "down" if kind == "lora_A.weight" or ".down." in kind else "up"
    else:
        return None, "", "not a LoRA weight (lora_A/lora_B, lora.down/lora.up or alpha)"
    if component != "unet":
        path = path.removeprefix("text_model.")
    return path, role, ""


def _metadata_alphas(meta: dict, source: str):
    """A function ``(component, module, rank) → alpha or None`` from diffusers' adapter metadata
    (PEFT ``LoraConfig`` fields per component: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``)."""
    configs = {c: {k[len(c) + 1:]: v for k, v in meta.items() if k.startswith(c + ".")} for c in COMPONENTS}
    if meta and not any(configs.values()):
        configs["unet"] = dict(meta)  # a UNet-only file: fields without a prefix
    for comp, cfg in configs.items():
        if cfg.get("use_dora"):
            raise LoraError(f"{source}: a DoRA adapter ({comp}.use_dora in its metadata); DoRA is not "
                            "supported: use a plain LoRA")

    def alpha(component: str, module: str, rank: int) -> float | None:
        cfg = configs.get(component) or {}
        if cfg.get("lora_alpha") is None:
            return None
        a = float(cfg["lora_alpha"])
        names = (module, f"text_model.{module}") if component != "unet" else (module,)
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            if any(re.fullmatch(rf"(.*\.)?(?:{pattern})", n) for n in names):
                a = float(value)
                break
        if not math.isfinite(a):
            raise LoraError(f"{source}: its metadata gives {component} alpha {a}; re-download the file")
        return a * math.sqrt(rank) if cfg.get("use_rslora") else a  # rsLoRA scales by alpha/√rank

    return alpha
