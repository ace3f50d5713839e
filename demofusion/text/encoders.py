"""Loading SDXL's two text encoders and encoding prompts exactly as SDXL does.

``prompt_embeds = concat(penultimate hidden state of encoder 1, of encoder 2)`` ([B, 77, 2048]),
``pooled = text_projection(final_layer_norm(encoder 2)[eot])`` ([B, 1280]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from demofusion.weights import (
    COMPONENT_NAMES, SINGLE_FILE_PREFIXES, WeightsError, build_and_load, component_config, is_single_file, read_json,
    read_keys, read_tensors, resolve_component,
)
from demofusion.weights.seeded import random_init_

from . import prompts
from .clip import CLIPTextConfig, CLIPTextModel
from .convert import from_open_clip, from_transformers, infer_config, is_open_clip_layout
from .tokenizer import EOT, CLIPTokenizer

SUBFOLDERS = {1: "text_encoder", 2: "text_encoder_2"}
Prompt = str | Sequence[str]


def _read_state_dict(file: Path, encoder: int, allow_pickle: bool) -> tuple[dict, bool]:
    """Our-named tensors of one encoder from a component file or a single-file checkpoint."""
    component = SUBFOLDERS[encoder]
    prefix = SINGLE_FILE_PREFIXES[component]
    if file.suffix == ".safetensors":
        keys = read_keys(file)
        single = is_single_file(keys, component)
        sd = read_tensors(file, prefix=prefix if single else None)
    else:
        sd = read_tensors(file, allow_pickle=allow_pickle)
        single = is_single_file(sd, component)
        if single:
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if single and not sd:
        raise WeightsError(f"{file} has no tensors under {prefix!r}")
    if not single and any(k.startswith("conditioner.") or k.startswith("model.diffusion_model.") for k in sd):
        raise WeightsError(
            f"{file} is a single-file checkpoint without text encoder {encoder} "
            f"(no keys under {prefix!r})."
        )
    return (from_open_clip(sd) if is_open_clip_layout(sd) else from_transformers(sd)), single


def pick_config(sd: dict, encoder: int, cfg_json: dict | None, cfg_file, single: bool, config=None):
    """(CLIPTextConfig, the config.json it came from or None) as :func:`load_text_encoder` picks it
    (also ``demofusion inspect``): ``config``, else a CLIP text model's ``cfg_json`` beside a
    component file, else the shapes of ``sd`` (our names)."""
    if single or cfg_json is None or cfg_json.get("model_type", "clip_text_model") != "clip_text_model":
        cfg_json = None  # a config.json beside a whole-model file, or of another model, describes something else
    return component_config(
        CLIPTextConfig, config, cfg_json, cfg_file, COMPONENT_NAMES[SUBFOLDERS[encoder]],
        lambda: infer_config(sd, encoder),
        read=lambda d: CLIPTextConfig.from_transformers(d, with_projection="text_projection.weight" in sd))


def load_text_encoder(
    path,
    encoder: int = 1,
    dtype=None,
    device="cpu",
    variant: str | None = None,
    allow_pickle: bool = False,
    config: CLIPTextConfig | str | dict | None = None,
) -> CLIPTextModel:
    """One of SDXL's text encoders (``encoder`` 1: CLIP ViT-L, 2: OpenCLIP bigG).

    ``path``: a diffusers model folder, its ``text_encoder[_2]/`` folder, a component
    ``.safetensors`` file, or an SGM single-file checkpoint (both encoders inside).
    """
    if encoder not in SUBFOLDERS:
        raise ValueError(f"encoder must be 1 or 2, not {encoder!r}")
    file, cfg_json = resolve_component(path, SUBFOLDERS[encoder], ["model"], variant, allow_pickle)
    sd, single = _read_state_dict(file, encoder, allow_pickle)
    config, cfg_file = pick_config(sd, encoder, cfg_json, file.parent / "config.json", single, config)
    return build_and_load(lambda: CLIPTextModel(config), sd, COMPONENT_NAMES[SUBFOLDERS[encoder]], dtype=dtype,
                          device=device, file=file, config_file=cfg_file)


def _force_zeros(path) -> bool:
    p = Path(path)
    for folder in (p, p.parent) if p.is_dir() else (p.parent,):
        f = folder / "model_index.json"
        if f.is_file():
            return bool(read_json(f).get("force_zeros_for_empty_prompt", True))
    return True


def load_text_encoders(
    path,
    dtype=None,
    device="cpu",
    variant: str | None = None,
    allow_pickle: bool = False,
    tokenizer_path=None,
    force_zeros_for_empty_prompt: bool | None = None,
) -> "TextEncoders":
    """Both tokenizers and encoders of an SDXL model (diffusers folder or single file).

    Tokenizers come from ``tokenizer_path`` (or ``path``)'s ``tokenizer{,_2}/`` folders, else
    from the CLIP vocabulary open_clip_torch ships (single files carry no tokenizer).
    ``force_zeros_for_empty_prompt`` defaults to model_index.json's value, else True.
    """
    root = Path(path)
    tok_root = tokenizer_path if tokenizer_path is not None else (root if root.is_dir() else None)
    tok1 = CLIPTokenizer.load(tok_root, "tokenizer", default_pad=EOT)
    tok2 = CLIPTokenizer.load(tok_root, "tokenizer_2", default_pad="!")
    kw = dict(dtype=dtype, device=device, variant=variant, allow_pickle=allow_pickle)
    enc1, enc2 = load_text_encoder(path, 1, **kw), load_text_encoder(path, 2, **kw)
    if force_zeros_for_empty_prompt is None:
        force_zeros_for_empty_prompt = _force_zeros(path)
    return TextEncoders(tok1, enc1, tok2, enc2, force_zeros_for_empty_prompt)


def _as_list(prompt: Prompt, what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    prompt = list(prompt)
    if not prompt or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"{what} must be a str or a non-empty list of str, got {prompt!r}")
    return prompt


class TextEncoders:
    """SDXL's text conditioning: two tokenizers, two encoders, ``encode(prompt)``."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        tokenizer_2: CLIPTokenizer,
        text_encoder_2: CLIPTextModel,
        force_zeros_for_empty_prompt: bool = True,
    ):
        if not text_encoder_2.config.projection_dim:
            raise ValueError("text_encoder_2 must have a text_projection (OpenCLIP bigG's pooled output)")
        for i, (tok, enc) in enumerate(((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)), 1):
            if max(tok.encoder.values()) >= enc.config.vocab_size:
                raise ValueError(
                    f"tokenizer {i} has {len(tok.encoder)} tokens but text encoder {i} embeds only "
                    f"{enc.config.vocab_size}: the tokenizer does not belong to these weights. Pass "
                    "tokenizer_path= a model folder with the matching tokenizer/ and tokenizer_2/."
                )
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @classmethod
    def preset(cls, name: str = "tiny", seed: int = 0, dtype=torch.float32, device="cpu") -> "TextEncoders":
        """Random-weight encoders with byte-level tokenizers, built offline: ``"tiny"``, or
        ``"sdxl"`` (CLIP ViT-L + bigG at their real sizes, for benchmarks)."""
        presets = {"tiny": ("tiny-l", "tiny-g"), "sdxl": ("clip-l", "bigg")}
        if name not in presets:
            raise ValueError(f"unknown text preset {name!r}; choose one of {sorted(presets)}")
        encoders = [random_init_(CLIPTextModel(CLIPTextConfig.preset(n)), seed + i).eval().requires_grad_(False).to(device, dtype)
                    for i, n in enumerate(presets[name])]  # initialised in fp32 one at a time, then cast and moved
        return cls(CLIPTokenizer.byte_level(pad_token=EOT), encoders[0], CLIPTokenizer.byte_level(pad_token="!"), encoders[1])

    def save(self, folder) -> Path:
        """Write the diffusers layout: ``text_encoder{,_2}/`` (config.json, model.safetensors with
        transformers 4.x keys) and ``tokenizer{,_2}/``; loadable by us, transformers and diffusers."""
        from safetensors.torch import save_file

        folder = Path(folder)
        for sub, enc in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            (folder / sub / "config.json").write_text(json.dumps(enc.config.to_transformers(), indent=2))
            sd = {k if k.startswith("text_projection") else "text_model." + k: v.detach().contiguous().cpu()
                  for k, v in enc.state_dict().items()}
            save_file(sd, str(folder / sub / "model.safetensors"))
        self.tokenizer.save(folder / "tokenizer")
        self.tokenizer_2.save(folder / "tokenizer_2")
        return folder

    # ---- placement ----------------------------------------------------------------------
    def to(self, device=None, dtype=None) -> "TextEncoders":
        """Move (and/or cast) both encoders, e.g. ``.to("cpu")`` to offload after encoding."""
        for enc in (self.text_encoder, self.text_encoder_2):
            enc.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.text_encoder_2.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder_2.dtype

    @property
    def embed_dim(self) -> int:
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.text_encoder_2.config.projection_dim

    # ---- encoding -----------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self, prompt: Prompt, prompt_2: Prompt | None = None, truncate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds[B, 77, D1+D2], pooled[B, P])``; ``prompt_2`` (encoder 2) defaults to ``prompt``.

        ``truncate=False``: A1111 weights and any length, ``[B, 77·n, D1+D2]`` (docs/components.md);
        plain prompts of at most 75 tokens still take the 77-token path (identical tensors).
        """
        p1 = _as_list(prompt, "prompt")
        p2 = _as_list(prompt_2, "prompt_2") if prompt_2 else p1
        if len(p2) != len(p1):
            raise ValueError(f"prompt has {len(p1)} entries but prompt_2 has {len(p2)}; give as many of each")
        # ---- long / weighted prompts (truncate=False): demofusion/text/prompts.py ----
        if not truncate and prompts.needs_long_path(self, p1, p2):
            return prompts.encode_long(self, p1, p2)
        # ---- end long / weighted prompts ----
        states = []
        for tok, enc, texts in ((self.tokenizer, self.text_encoder, p1), (self.tokenizer_2, self.text_encoder_2, p2)):
            out = enc(tok(texts).to(enc.device))
            states.append(out.hidden_states[-2])  # penultimate layer, before final_layer_norm
        embeds = torch.cat([s.to(device=self.device, dtype=self.dtype) for s in states], dim=-1)
        return embeds, out.pooled

    @torch.no_grad()
    def encode_with_negative(
        self,
        prompt: Prompt,
        negative_prompt: Prompt | None = None,
        prompt_2: Prompt | None = None,
        negative_prompt_2: Prompt | None = None,
        guidance: bool = True,
        truncate: bool = True,
    ):
        """``(embeds, negative_embeds, pooled, negative_pooled)`` as diffusers' SDXL ``encode_prompt``.

        Without guidance the negatives are None. With guidance and no ``negative_prompt``,
        they are zeros when ``force_zeros_for_empty_prompt``, else the encoding of ``""``.
        ``truncate=False``: see :meth:`encode`; positives and negatives are padded to the same
        number of chunks with encodings of the empty prompt.
        """
        embeds, pooled = self.encode(prompt, prompt_2, truncate=truncate)
        if not guidance:
            return embeds, None, pooled, None
        if self.zero_negative(negative_prompt, guidance):
            return embeds, torch.zeros_like(embeds), pooled, torch.zeros_like(pooled)
        b = embeds.shape[0]
        neg = negative_prompt or ""
        neg_2 = negative_prompt_2 or neg
        neg, neg_2 = ([n] * b if isinstance(n, str) else list(n) for n in (neg, neg_2))
        if len(neg) != b or len(neg_2) != b:
            raise ValueError(f"negative_prompt has {len(neg)} entries for a batch of {b} prompts")
        neg_embeds, neg_pooled = self.encode(neg, neg_2, truncate=truncate)
        if not truncate:  # ---- long prompts: same number of chunks (demofusion/text/prompts.py) ----
            embeds, neg_embeds = prompts.pad_pair(self, embeds, neg_embeds)
        return embeds, neg_embeds, pooled, neg_pooled

    def zero_negative(self, negative_prompt, guidance: bool = True) -> bool:
        """Whether :meth:`encode_with_negative` gives zeros as the negatives (known on the host, so
        the UNet can skip their cross-attention without looking)."""
        return guidance and negative_prompt is None and self.force_zeros_for_empty_prompt

    def __repr__(self) -> str:
        return (
            f"TextEncoders(embed_dim={self.embed_dim}, pooled_dim={self.pooled_dim}, device={self.device}, "
            f"dtype={self.dtype}, force_zeros_for_empty_prompt={self.force_zeros_for_empty_prompt})"
        )
