"""Original single-file (SGM / LDM ``openaimodel``) UNet key names → ours (diffusers names).

SGM numbers the UNet's modules flat: ``input_blocks.k`` (conv_in, then per level ``layers``
× [ResBlock, SpatialTransformer?] and a downsampler), ``middle_block.{0,1,2}``, and
``output_blocks.k`` (per level ``layers + 1`` × [ResBlock, SpatialTransformer?] and an
upsampler in the last one). Transformer internals share the diffusers names; ResBlock
internals are renamed (``in_layers.0`` → ``norm1`` …).
"""

from __future__ import annotations

import re

PREFIX = "model.diffusion_model."

RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "middle_block.1": "mid_block.attentions.0",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def sgm_structure(keys) -> tuple[int, int, tuple]:
    """(levels, layers_per_block, cross_attention per level) read from SGM key names."""
    keys = list(keys)
    inputs = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    downs = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))}
    if not inputs:
        raise ValueError("not an SGM UNet state dict: no 'input_blocks.*' keys")
    levels = len(downs) + 1
    layers, rem = divmod(max(inputs) - (levels - 1), levels)
    if rem or layers < 1:
        raise ValueError(f"cannot read the UNet structure from SGM keys: {len(inputs)} input blocks, "
                         f"{levels} levels")
    starts = [1 + i * (layers + 1) for i in range(levels)]
    attn = tuple(any(k.startswith(f"input_blocks.{s}.1.") for k in keys) for s in starts)
    return levels, layers, attn


def sgm_key_map(levels: int, layers: int, cross_attention) -> dict[str, tuple[str, bool]]:
    """SGM module prefix → (our module prefix, is_resnet)."""
    m = {k: (v, False) for k, v in _FIXED.items()}
    m["middle_block.0"] = ("mid_block.resnets.0", True)
    m["middle_block.2"] = ("mid_block.resnets.1", True)
    for i in range(levels):
        base = 1 + i * (layers + 1)
        for j in range(layers):
            m[f"input_blocks.{base + j}.0"] = (f"down_blocks.{i}.resnets.{j}", True)
            m[f"input_blocks.{base + j}.1"] = (f"down_blocks.{i}.attentions.{j}", False)
        if i < levels - 1:
            m[f"input_blocks.{base + layers}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", False)
    for j in range(levels):  # up block j mirrors level levels-1-j
        level = levels - 1 - j
        for r in range(layers + 1):
            k = j * (layers + 1) + r
            m[f"output_blocks.{k}.0"] = (f"up_blocks.{j}.resnets.{r}", True)
            if cross_attention[level]:
                m[f"output_blocks.{k}.1"] = (f"up_blocks.{j}.attentions.{r}", False)
        if level > 0:
            k = j * (layers + 1) + layers
            up = 2 if cross_attention[level] else 1
            m[f"output_blocks.{k}.{up}.conv"] = (f"up_blocks.{j}.upsamplers.0.conv", False)
    return m


def _rename(key: str, table: dict) -> str | None:
    """Our name for one SGM key (longest matching module prefix), or None if it has none."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix not in table:
            continue
        ours, is_resnet = table[prefix]
        rest = ".".join(parts[n:])
        if is_resnet:
            sub = next((o for o in RESNET_RENAMES if rest.startswith(o + ".")), None)
            if sub is None:
                return None
            rest = RESNET_RENAMES[sub] + rest[len(sub):]
        return f"{ours}.{rest}"
    return None


def convert_sgm_unet(state_dict: dict) -> dict:
    """Rename an SGM UNet state dict (``model.diffusion_model.`` already stripped) to ours.

    Keys that match nothing keep their full file name (with the prefix), so a loader reports
    them as unexpected under the name the file uses.
    """
    levels, layers, attn = sgm_structure(state_dict)
    table = sgm_key_map(levels, layers, attn)
    out = {}
    for key, tensor in state_dict.items():
        out[_rename(key, table) or PREFIX + key] = tensor
    return out
