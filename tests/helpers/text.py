"""Text-encoder test factories: CLIP vocab files, reference tokenizers and encoders, layouts.

Everything is built offline: the vocabulary comes from the BPE file open_clip ships, models
are transformers / open_clip modules in small configs filled by ``seeded_init_``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from tests.helpers import save_tensors, seeded_init_


def write_clip_vocab(folder, pad_token="<|endoftext|>") -> Path:
    """vocab.json + merges.txt built from open_clip's bpe file, as SDXL's tokenizer folders are."""
    import open_clip.tokenizer as oct

    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    syms = list(oct.bytes_to_unicode().values())
    vocab = syms + [s + "</w>" for s in syms] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return _write(folder, {t: i for i, t in enumerate(vocab)}, merges, pad_token)


def write_byte_vocab(folder, pad_token="<|endoftext|>") -> Path:
    """The merge-free byte vocabulary (512 byte symbols, sot 512, eot 513), written independently."""
    import open_clip.tokenizer as oct

    syms = list(oct.bytes_to_unicode().values())
    vocab = syms + [s + "</w>" for s in syms] + ["<|startoftext|>", "<|endoftext|>"]
    return _write(folder, {t: i for i, t in enumerate(vocab)}, [], pad_token)


def _write(folder, vocab, merges, pad_token) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    return folder


def hf_tokenizer(folder, pad_token=None):
    """transformers' CLIPTokenizer from a vocab folder (pad token as the folder says unless given)."""
    from transformers import CLIPTokenizer

    kw = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(folder), **kw)


def hf_ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
