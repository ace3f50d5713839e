"""LoRAs for SDXL: read kohya / A1111 and diffusers / PEFT files, fuse them into our modules,
unload them exactly (docs/components.md, LoRAs).

    from demofusion.lora import LoraStack, read_lora, fuse_lora
    modules = {"unet": pipe.unet, "text_encoder": pipe.text.text_encoder,
               "text_encoder_2": pipe.text.text_encoder_2}
    stack = LoraStack()
    name = stack.load(modules, "style.safetensors", scale=0.8)
    stack.unload(modules, name)            # weights restored bit for bit
"""

from .checks import MAX_SCALE, check_scale
from .formats import LoRA, LoraError, LoraTarget, parse_lora, read_lora
from .fuse import LoraStack, fuse_lora

__all__ = ["MAX_SCALE", "check_scale", "LoRA", "LoraError", "LoraTarget", "LoraStack", "fuse_lora", "parse_lora", "read_lora"]
