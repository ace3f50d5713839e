"""Building a pipeline's components from a model folder, a single file or the ``tiny`` preset,
and writing them back in the diffusers layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_components(path_or_preset, device="cpu", dtype=torch.float32, kind: str | None = None, scheduler=None,
                    variant: str | None = None, vae_dtype=None, seed: int = 0, allow_pickle: bool = False,
                    tokenizer_path=None):
    """``(unet, vae, text, scheduler, name)``; see :meth:`DemoFusionPipeline.from_pretrained`."""
    from ..schedulers import SDXL_BASE_CONFIG, SDXL_TURBO_CONFIG, from_config

    as_scheduler = lambda s: from_config(s) if isinstance(s, (dict, str, Path)) else s
    if str(path_or_preset) == "tiny":
        from ..presets import tiny_components

        unet, vae, text, sched = tiny_components(seed=seed, device=device, dtype=dtype)
        return unet, vae, text, as_scheduler(scheduler) if scheduler is not None else sched, "tiny"
    if str(path_or_preset) in ("sdxl-base", "sdxl-turbo"):
        raise FileNotFoundError(
            f"'{path_or_preset}' needs its weights: run `demofusion download {path_or_preset} --dir weights/` "
            f"and pass weights/{path_or_preset} (only 'tiny' is built without downloads)")
    from ..text import load_text_encoders
    from ..unet import load_unet
    from ..vae import load_vae
    from ..weights import WeightsError

    path = Path(path_or_preset).expanduser()
    if not path.exists():
        raise WeightsError(f"weights not found: {path} does not exist. Download them with "
                           "`demofusion download sdxl-base --dir weights/` (or sdxl-turbo).")
    if kind is None:
        kind = "sdxl-turbo" if "turbo" in path.name.lower() else None
    unet = load_unet(path, dtype=dtype, device=device, kind=kind, variant=variant, allow_pickle=allow_pickle)
    vae = load_vae(path, dtype=vae_dtype or dtype, device=device, variant=variant, allow_pickle=allow_pickle)
    text = load_text_encoders(path, dtype=dtype, device=device, variant=variant, allow_pickle=allow_pickle,
                              tokenizer_path=tokenizer_path)
    if scheduler is None:
        cfg = path / "scheduler" / "scheduler_config.json"
        scheduler = cfg if cfg.is_file() else (SDXL_TURBO_CONFIG if kind == "sdxl-turbo" else SDXL_BASE_CONFIG)
    return unet, vae, text, as_scheduler(scheduler), str(path)


def save_components(pipe, folder) -> Path:
    """Write the diffusers folder layout (safetensors + config.json per component, tokenizers,
    scheduler config, model_index.json) — loadable by ``from_pretrained`` and by diffusers."""
    from safetensors.torch import save_file

    from ..vae.loading import save_vae

    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "UNet2DConditionModel", **pipe.unet.config.to_diffusers()}
    (folder / "unet" / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in pipe.unet.state_dict().items()},
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    save_vae(pipe.vae, folder / "vae")
    pipe.text.save(folder)
    (folder / "scheduler").mkdir(exist_ok=True)
    sched_cfg = {"_class_name": type(pipe.scheduler).__name__, **pipe.scheduler.config}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2))
    index = {"_class_name": "StableDiffusionXLPipeline",
             "force_zeros_for_empty_prompt": pipe.text.force_zeros_for_empty_prompt}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
