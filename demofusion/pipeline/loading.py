"""Building a pipeline's components from a model folder, a single file or the ``tiny`` preset,
and writing them back in the diffusers layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import parse_budget
from ..controlnet import load_controlnet
from ..devices import default_dtype, resolve_device
from ..errors import InputError
from ..fp8 import to_fp8_
from ..presets import tiny_components, tiny_controlnet
from ..schedulers import SDXL_BASE_CONFIG, SDXL_TURBO_CONFIG, by_name, from_config, is_sampler_name
from ..text import load_text_encoders
from ..unet import load_unet
from ..vae import load_vae
from ..vae.loading import save_vae
from ..weights import WeightsError
from .settings import _check_offload


def load_components(path_or_preset, device="cpu", dtype=torch.float32, kind: str | None = None, scheduler=None,
                    variant: str | None = None, vae_dtype=None, seed: int = 0, allow_pickle: bool = False,
                    tokenizer_path=None):
    """``(unet, vae, text, scheduler, name)``; see :meth:`DemoFusionPipeline.from_pretrained`."""
    as_scheduler = lambda s: from_config(s) if isinstance(s, (dict, str, Path)) else s
    if str(path_or_preset) == "tiny":
        unet, vae, text, sched = tiny_components(seed=seed, device=device, dtype=dtype)
        return unet, vae, text, as_scheduler(scheduler) if scheduler is not None else sched, "tiny"
    if str(path_or_preset) in ("sdxl-base", "sdxl-turbo"):
        raise FileNotFoundError(
            f"'{path_or_preset}' needs its weights: run `demofusion download {path_or_preset} --dir weights/` "
            f"and pass weights/{path_or_preset} (only 'tiny' is built without downloads)")
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


def pretrained(cls, path_or_preset, device, dtype, kind, scheduler, variant, vae_dtype, seed, allow_pickle,
               tokenizer_path, max_memory, offload, fp8, controlnet, vae, lora):
    """``cls.from_pretrained``: the components loaded (into CPU memory when a budget, an offload
    policy or fp8 will place them), the VAE swapped, fp8 applied, the ControlNets loaded."""
    device = resolve_device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    max_memory, offload = parse_budget(max_memory), _check_offload(offload)
    at_home = max_memory is not None or offload not in (None, "none") or fp8
    sampler = scheduler if is_sampler_name(scheduler) else None
    unet, old_vae, text, sched, name = load_components(path_or_preset, "cpu" if at_home else device, dtype, kind,
                                                       None if sampler else scheduler, variant, vae_dtype, seed,
                                                       allow_pickle, tokenizer_path)
    sched = by_name(sampler, sched) if sampler else sched  # another sampler on the model's own schedule
    if vae is not None:
        old_vae = swap_vae(vae, unet, vae_dtype or dtype, allow_pickle)
    pipe = cls(unet, old_vae, text, sched, name=name + (" (fp8)" if fp8 else ""), device=device,
               controlnet=load_controlnets(controlnet, unet, dtype, seed) or None)
    for path, scale in lora or []:  # fused into the weights, before any fp8 storage
        pipe.load_lora(path, scale)
    if fp8:
        to_fp8_(unet)
    pipe.max_memory, pipe.offload = max_memory, offload
    return pipe


def load_controlnets(controlnet, unet, dtype, seed: int = 0) -> list:
    """Paths, modules or ``"tiny"`` (random, fitting ``unet``) → ControlNets beside the UNet, in ``dtype``."""
    items = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet] if controlnet is not None else []
    return [n if isinstance(n, torch.nn.Module) else
            tiny_controlnet(unet.config, seed + k + 1, unet.device, dtype) if str(n) == "tiny" else
            load_controlnet(n, dtype=dtype, device=unet.device) for k, n in enumerate(items)]


def swap_vae(path, unet, dtype, allow_pickle: bool = False):
    """Another VAE (a diffusers VAE folder, one safetensors file in diffusers or LDM names), where the
    UNet is; its latent channels must fit the UNet's."""
    vae = load_vae(path, dtype=dtype, device=unet.device, allow_pickle=allow_pickle)
    if vae.config.latent_channels != unet.config.in_channels:
        raise InputError(f"vae {path}: its latents have {vae.config.latent_channels} channels, the UNet takes "
                         f"{unet.config.in_channels}; use an SDXL VAE (e.g. madebyollin/sdxl-vae-fp16-fix)")
    return vae


def save_components(pipe, folder) -> Path:
    """Write the diffusers folder layout (safetensors + config.json per component, tokenizers,
    scheduler config, model_index.json) — loadable by ``from_pretrained`` and by diffusers."""
    from safetensors.torch import save_file

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
