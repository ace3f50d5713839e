"""`demofusion inspect`: what a checkpoint is, from its safetensors headers, then its values (one
tensor at a time: finite, within float16's range; :mod:`demofusion.inspection.kinds`).

Inspecting runs the loaders' own checks, through the same functions of
:mod:`demofusion.weights`, so a report is clean exactly when loading would succeed, and
otherwise lists the loaders' errors in their words (:meth:`Report.problems`):

* file integrity from the header alone (:func:`~demofusion.weights.safetensors_header`):
  zero-byte, truncated, non-safetensors files, corrupt headers;
* each component's ``config.json`` (:func:`~demofusion.weights.read_config`, and the model
  built from it on the meta device, :func:`~demofusion.weights.build_meta`);
* missing, unexpected and mis-shaped keys against that model
  (:func:`~demofusion.weights.fit_problems`, worded by
  :func:`~demofusion.weights.word_fit_problems`).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from ..errors import first_line
from ..text.clip import CLIPTextModel
from ..text.convert import from_open_clip, from_transformers, is_open_clip_layout
from ..text.encoders import pick_config as pick_text_config
from ..unet import UNet
from ..unet.convert import convert_sgm_unet
from ..unet.loading import pick_config as pick_unet_config
from ..vae import AutoencoderKL
from ..vae.convert import from_diffusers, from_ldm, is_ldm_layout
from ..vae.loading import pick_config as pick_vae_config
from ..weights import (
    COMPONENT_NAMES,
    SINGLE_FILE_PREFIXES,
    WeightsError,
    build_meta,
    fit_problems,
    read_config,
    safetensors_header,
    word_fit_problems,
)
from ..weights.kinds import kind_of_keys
from .kinds import USAGE, check_values, controlnet_report, file_tensors, lora_report, tiny_report
from .report import ComponentReport, Report, _meta  # the report types live below kinds

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def read_header(path) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` from a safetensors header (the first 8 + n bytes of the file).

    Raises :class:`WeightsError` when the header cannot be read; a readable header of a damaged
    file (e.g. truncated data) is returned — :func:`inspect` reports such damage.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: only .safetensors files are inspected (pickles are never opened)")
    header, problems = safetensors_header(path)
    if header is None:
        raise WeightsError(problems[0])
    return {k: (v["dtype"], v["shape"]) for k, v in header.items()}


def _expected(component: str, file: Path, sd: dict, single: bool, config: dict | None,
              config_file: Path | None, kind: str) -> tuple[dict, dict]:
    """(our-named file tensors, {key: shape} of the model the loader would build for them).

    Mirrors the loaders' choices (which config they trust, how they convert) and uses the
    same shared checks, so the errors are the loaders' own.
    """
    what = COMPONENT_NAMES[component]
    if component == "unet":
        if single:
            try:
                sd = convert_sgm_unet(sd)
            except ValueError as e:
                raise WeightsError(f"{file}: {e}") from None
            config = None
        cfg, config_file = pick_unet_config(sd, config, config_file, kind=kind)
        module = build_meta(lambda: UNet(cfg), what, config_file)
    elif component == "vae":
        sd = from_ldm(sd) if is_ldm_layout(sd) else from_diffusers(sd)
        cfg, config_file = pick_vae_config(sd, config, config_file, single)
        module = build_meta(lambda: AutoencoderKL(cfg), what, config_file)
    else:
        sd = from_open_clip(sd) if is_open_clip_layout(sd) else from_transformers(sd)
        cfg, config_file = pick_text_config(sd, 1 if component == "text_encoder" else 2, config, config_file, single)
        module = build_meta(lambda: CLIPTextModel(cfg), what, config_file)
    return sd, {k: v.shape for k, v in module.state_dict().items()}


def _component(name: str, file: Path, header: dict, file_problems: list[str], prefix: str = "",
               kind: str = "sdxl-base") -> ComponentReport:
    """One component's report: sizes from the header, then the loader's checks in its order
    (config.json, file integrity, then keys and shapes against the model)."""
    sub = {k: v for k, v in header.items() if k.startswith(prefix)}
    params = sum(math.prod(v["shape"]) for v in sub.values())
    rep = ComponentReport(name, str(file), params, dict(Counter(v["dtype"] for v in sub.values())))
    folder = file.parent
    try:
        config = read_config(folder)
    except WeightsError as e:
        rep.problems += [first_line(e), *file_problems]
        return rep  # the loader stops at an unreadable config.json: no key check against a guess
    rep.problems += file_problems
    try:
        sd, want = _expected(name, file, _meta(header, prefix), bool(prefix), config,
                             folder / "config.json" if config is not None else None, kind)
        fit = fit_problems(want, sd)
        rep.missing, rep.unexpected = fit.missing, fit.unexpected
        rep.mismatched = [f"{k}: file {f} vs model {m}" for k, f, m in fit.mismatched]
        if fit:
            rep.problems.append(first_line(word_fit_problems(fit, COMPONENT_NAMES[name], file)))
    except WeightsError as e:
        rep.problems.append(first_line(e))
    except Exception as e:  # a file too far from any known model: say so, keep the rest of the report
        rep.note = f"key check not possible: {type(e).__name__}: {first_line(e)}"
    if not file_problems:
        check_values(rep, file_tensors(file, prefix))
    return rep


def _unreadable(path: Path, file: Path, problems: list[str]) -> Report:
    """The report of a weights file whose header cannot be read at all."""
    guess = next((d for d in (file.parent.name, file.parent.parent.name) if d in COMPONENTS), "weights")
    return Report(str(path), "unreadable file", "unknown",
                  [ComponentReport(guess, str(file), 0, {}, problems=list(problems))])


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
    """The folder's config.json for guessing the model kind; None when absent or unreadable."""
    try:
        return read_config(folder)
    except WeightsError:
        return None


def _weights_in(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.safetensors"))
    return (min(files, key=lambda f: (".fp16." in f.name, f.name)) if files else None)


def _component_file(path: Path, file: Path, layout: str) -> Report:
    """A component's weights file (diffusers keys) or a single-file checkpoint."""
    header, problems = safetensors_header(file)
    if header is None:
        return _unreadable(path, file, problems)
    kind = kind_of_keys(header)
    if kind in ("lora", "controlnet"):
        return (lora_report if kind == "lora" else controlnet_report)(path, file, header, problems)
    single = [c for c in COMPONENTS if any(k.startswith(SINGLE_FILE_PREFIXES[c]) for k in header)]
    if single:
        reps = [_component(c, file, header, problems, SINGLE_FILE_PREFIXES[c]) for c in single]
        reps += [ComponentReport(c, str(file), 0, {}, problems=[f"{file}: no {COMPONENT_NAMES[c]} in this checkpoint "
                 f"(no {SINGLE_FILE_PREFIXES[c]}… keys); generate needs all four components"])
                 for c in COMPONENTS if c not in single]
        unet = next((r for r in reps if r.name == "unet"), None)
        return Report(str(path), "single-file (SGM) checkpoint", _guess_kind(unet, None, path), reps,
                      USAGE["checkpoint"].format(path=path) if len(single) == len(COMPONENTS) else "")
    comp = _guess_component(header)
    rep = _component(comp, file, header, problems)
    cfg = _config(file.parent)
    return Report(str(path), f"{layout} ({comp}" + (", diffusers keys)" if layout == "component file" else ")"),
                  _guess_kind(rep if comp == "unet" else None, cfg, path), [rep], USAGE[comp].format(path=path))


def inspect(path) -> Report:
    """Describe a model folder, component folder or safetensors file without loading tensors.

    Damaged or ill-fitting weights give a report that is not :attr:`~Report.ok` and lists
    :meth:`~Report.problems`; :class:`WeightsError` is raised only when there is nothing to
    inspect (no such path, a pickle file, a folder without weights).
    """
    if str(path) == "tiny" and not Path(path).exists():
        return tiny_report()
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{path} does not exist (download weights with `demofusion download sdxl-base --dir weights/`)")
    if path.is_file() or path.suffix == ".safetensors":
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: only .safetensors files are inspected (pickles are never opened)")
        return _component_file(path, path, "component file")
    subs = [c for c in COMPONENTS if (path / c).is_dir()]
    if subs:
        reps = []
        for c in subs:
            f = _weights_in(path / c)
            if f is None:
                reps.append(ComponentReport(c, str(path / c), 0, {}, note="no .safetensors file in this folder"))
                continue
            header, problems = safetensors_header(f)
            reps.append(_component(c, f, header, problems) if header is not None
                        else ComponentReport(c, str(f), 0, {}, problems=list(problems)))
        reps += [ComponentReport(c, str(path / c), 0, {}, problems=[
            f"{path}: no {c}/ folder; a model folder holds unet/, vae/, text_encoder/ and text_encoder_2/ "
            "(generate cannot load it without)"]) for c in COMPONENTS if c not in subs]
        unet = next((r for r in reps if r.name == "unet"), None)
        layout = "diffusers folder" + ("" if (path / "model_index.json").is_file() else " (no model_index.json)")
        return Report(str(path), layout, _guess_kind(unet, _config(path / "unet") if "unet" in subs else None, path), reps,
                      USAGE["model"].format(path=path) if len(subs) == len(COMPONENTS) else "")
    f = _weights_in(path)
    if f is None:
        raise WeightsError(f"{path} holds no .safetensors file and no unet/ vae/ text_encoder/ folders")
    return _component_file(path, f, "component folder")


def _guess_component(header: dict) -> str:
    keys = set(header)
    if any(k.startswith(("down_blocks.", "input_blocks.", "time_embedding.")) and "attentions" in k or k.startswith("add_embedding") for k in keys):
        return "unet"
    if any(k.startswith(("encoder.down", "decoder.up", "quant_conv")) for k in keys):
        return "vae"
    if any("text_projection" in k for k in keys):
        return "text_encoder_2"
    return "text_encoder"
