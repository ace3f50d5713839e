"""Random-weight stand-ins for the evaluation networks, written in their published on-disk layouts:
the FID Inception-v3 as torch-fidelity's ``weights-inception-2015-12-05-*.pth`` state dict, and a
tiny transformers CLIPModel + CLIPProcessor folder. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import torch


def random_picture(height: int, width: int, seed: int, blocks: int = 8) -> torch.Tensor:
    """A smooth random picture, uint8 [3, H, W]: random colours on a coarse grid, bicubic-enlarged."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (blocks, blocks, 3), dtype=np.uint8))
    fine = np.asarray(coarse.resize((width, height), Image.BICUBIC))
    return torch.from_numpy(fine.copy()).permute(2, 0, 1).contiguous()


def save_pictures(folder, count: int, size: int, seed: int) -> Path:
    """``count`` random pictures of ``size``² as 000.png … in ``folder``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(random_picture(size, size, seed + i).permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


def write_random_inception(path, seed: int = 0) -> Path:
    """torch-fidelity's FeatureExtractorInceptionV3 state dict with random values. The BatchNorm
    statistics are those of random pictures (one forward in train mode), so activations stay O(1)
    through the 90-odd layers and the features are not all zero."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    with mock.patch("torch.load", return_value={}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path="unused")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative: one batch → running stats = that batch's statistics
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    with torch.no_grad():
        torch.nn.init.normal_(net.fc.weight, std=0.3)
        net.train()
        net(torch.stack([random_picture(299, 299, seed=1000 + i) for i in range(6)]))
    net.eval()
    path = Path(path)
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, path)
    return path


def write_random_clip(folder, seed: int = 0) -> Path:
    """A tiny CLIPModel with random weights + a CLIPProcessor (byte-level BPE over a toy vocab)."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text = CLIPTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
              ).save_pretrained(folder)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in letters:
        vocab.setdefault(w, len(vocab))
        vocab.setdefault(w + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder
