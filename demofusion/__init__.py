"""demofusion — DemoFusion (Du et al., CVPR 2024) for SDXL / SDXL-Turbo in plain PyTorch.

Public API (see docs/api.md)::

    import demofusion as df
    unet = df.load_unet(path, dtype=torch.float16, device="cuda")
    vae = df.load_vae(path)
    text = df.load_text_encoders(path)
    sched = df.schedulers.EulerDiscreteScheduler.from_config(cfg)
    pipe = df.DemoFusionPipeline.from_pretrained(path_or_preset, device="cuda", dtype=torch.float16)
    out = pipe(prompt, height=2048, width=2048, config=df.DemoFusionConfig(sigma=0.6), stride=32)

Attributes are imported lazily so that ``import demofusion`` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "load_unet": ("demofusion.unet", "load_unet"),
    "UNet": ("demofusion.unet", "UNet"),
    "UNetConfig": ("demofusion.unet", "UNetConfig"),
    "load_vae": ("demofusion.vae", "load_vae"),
    "AutoencoderKL": ("demofusion.vae", "AutoencoderKL"),
    "load_text_encoders": ("demofusion.text", "load_text_encoders"),
    "DemoFusionPipeline": ("demofusion.pipeline", "DemoFusionPipeline"),
    "DemoFusionConfig": ("demofusion.config", "DemoFusionConfig"),
    "load_controlnet": ("demofusion.controlnet", "load_controlnet"),
    "ControlNet": ("demofusion.controlnet", "ControlNet"),
    "WeightsError": ("demofusion.weights", "WeightsError"),
    "schedulers": ("demofusion.schedulers", None),
    "PRESETS": ("demofusion.run_presets", "PRESETS"),
    "ops": ("demofusion.ops", None),
    "evaluate": ("demofusion.evaluate", "evaluate"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'demofusion' has no attribute {name!r}") from None
    mod = import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
