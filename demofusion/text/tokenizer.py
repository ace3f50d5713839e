"""CLIP's byte-level BPE tokenizer, written here (no transformers / open_clip import).

It reproduces what ``transformers.CLIPTokenizer`` (the *tokenizers*-backed class of
transformers ≥ 5, which is what diffusers' SDXL pipelines call) does to a prompt:

1. the special-token literals ``<|startoftext|>``, ``<|endoftext|>`` and the pad token are cut
   out of the raw text verbatim (case-sensitive) and become their ids — so with SDXL's
   tokenizer 2 (pad ``!``) every ``!`` of a prompt is token 0, never part of a BPE word;
2. every other span is normalised: Unicode NFC, each run of whitespace → one space,
   lower-cased character by character (no ftfy, no HTML unescaping — transformers ≥ 5 does
   neither; see docs/components.md, "Text encoders and tokenizer");
3. split with CLIP's regex (letters runs, single digits, punctuation runs, ``'s`` …), each
   piece split again with GPT-2's byte-level regex, mapped byte → printable unicode;
4. BPE with CLIP's merges (``</w>`` marks the end of a word); unknown symbols → ``<|endoftext|>``;
5. ``[<|startoftext|>] + ids[:75] + [<|endoftext|>]``, padded to 77 with the pad token
   (SDXL's tokenizer 1 pads with ``<|endoftext|>``, tokenizer 2 with ``!``, id 0).

``cleaning="openai"`` instead follows OpenAI's / open_clip's original ``SimpleTokenizer``
(ftfy if installed, HTML unescaped twice, whole-string lower-case).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import regex
import torch

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
CONTEXT_LENGTH = 77

_WHITESPACE = regex.compile(r"\s+")
# CLIP's pre-tokenisation pattern (the literal specials first, as transformers has it).
_CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_CLIP_PAT_I = regex.compile(_CLIP_PAT.pattern, regex.IGNORECASE)
# GPT-2's byte-level pattern, applied by transformers' ByteLevel pre-tokenizer to each piece.
_GPT2_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


# Bytes that are printable Latin-1 characters keep their character; CLIP lists them first.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Byte → printable character table of GPT-2/CLIP (the others map to chr(256 + n), in byte order)."""
    rest = [b for b in range(256) if b not in _PRINTABLE]
    return {**{b: chr(b) for b in _PRINTABLE}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def _byte_symbols() -> list[str]:
    """CLIP's first 512 vocabulary entries: the 256 byte symbols, then each with ``</w>``."""
    chars = list(bytes_to_unicode().values())  # printable bytes first, then the remapped ones
    return chars + [c + "</w>" for c in chars]


def open_clip_bpe_path() -> Path | None:
    """open_clip's shipped ``bpe_simple_vocab_16e6.txt.gz`` (found without importing open_clip)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        p = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if p.is_file():
            return p
    return None


def read_bpe_gz(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (as OpenAI built them)."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = _byte_symbols() + ["".join(m) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(vocab)}, merges


def read_merges_txt(path: str | Path) -> list[tuple[str, str]]:
    """Merges from a ``merges.txt`` (``#version`` header and blank lines skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if not line.strip() or line.startswith("#version"):
            continue
        a, b = line.split()
        out.append((a, b))
    return out


def _pad_token_from_folder(folder: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            tok = json.loads(f.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(tok, dict):
                tok = tok.get("content")
            if tok:
                return tok
    return None


class CLIPTokenizer:
    """CLIP BPE tokenizer. ``tok(prompts) -> LongTensor[B, 77]`` (sot … eot, then padding)."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        pad_token: str = EOT,
        max_length: int = CONTEXT_LENGTH,
        cleaning: str = "transformers",
    ):
        if cleaning not in ("transformers", "openai"):
            raise ValueError(f"cleaning must be 'transformers' or 'openai', not {cleaning!r}")
        for tok in (SOT, EOT, pad_token):
            if tok not in vocab:
                raise ValueError(f"token {tok!r} is not in the vocabulary; is this a CLIP vocab.json?")
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pad_token, self.max_length, self.cleaning = pad_token, max_length, cleaning
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.pad_id = self.encoder[pad_token]
        self._cache: dict[str, list[str]] = {}
        # transformers cuts its special tokens (sot, eot and the pad token, e.g. SDXL's "!")
        # out of the raw text before anything else, longest first
        specials = sorted({SOT, EOT, pad_token}, key=len, reverse=True)
        self._special_pat = regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_json, merges_txt, **kw) -> "CLIPTokenizer":
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        return cls(vocab, read_merges_txt(merges_txt), **kw)

    @classmethod
    def from_folder(cls, folder, pad_token: str | None = None, default_pad: str = EOT, **kw) -> "CLIPTokenizer":
        """A diffusers ``tokenizer/`` folder (vocab.json, merges.txt, special_tokens_map.json)."""
        folder = Path(folder)
        pad = pad_token or _pad_token_from_folder(folder) or default_pad
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", pad_token=pad, **kw)

    @classmethod
    def from_open_clip(cls, pad_token: str = EOT, **kw) -> "CLIPTokenizer":
        """CLIP's vocabulary from the file open_clip_torch ships (offline; SDXL uses this vocab)."""
        path = open_clip_bpe_path()
        if path is None:
            raise FileNotFoundError(
                "no CLIP vocabulary: give a diffusers model folder with tokenizer/vocab.json and "
                "merges.txt, or `pip install open_clip_torch`, which ships CLIP's BPE vocabulary "
                "(bpe_simple_vocab_16e6.txt.gz)."
            )
        vocab, merges = read_bpe_gz(path)
        return cls(vocab, merges, pad_token=pad_token, **kw)

    @classmethod
    def byte_level(cls, pad_token: str = EOT, **kw) -> "CLIPTokenizer":
        """Merge-free vocabulary: 512 byte symbols, sot = 512, eot = 513 (tiny offline preset)."""
        vocab = {t: i for i, t in enumerate(_byte_symbols() + [SOT, EOT])}
        return cls(vocab, [], pad_token=pad_token, **kw)

    @classmethod
    def load(cls, path=None, subfolder: str = "tokenizer", pad_token: str | None = None,
             default_pad: str = EOT, **kw) -> "CLIPTokenizer":
        """From ``path/subfolder`` or ``path`` if it holds vocab.json, else open_clip's vocab.

        The pad token is ``pad_token`` if given, else the folder's special_tokens_map.json,
        else ``default_pad`` (SDXL: ``<|endoftext|>`` for tokenizer 1, ``!`` for tokenizer 2).
        """
        if path is not None:
            p = Path(path)
            for folder in (p / subfolder, p):
                if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                    return cls.from_folder(folder, pad_token=pad_token, default_pad=default_pad, **kw)
        return cls.from_open_clip(pad_token=pad_token or default_pad, **kw)

    def save(self, folder) -> Path:
        """Write vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json (diffusers layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.get)
        text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        (folder / "merges.txt").write_text(text, encoding="utf-8")
        specials = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": self.pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **specials}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return folder

    # ---- text → pieces ------------------------------------------------------------------
    def _pieces(self, text: str) -> list[str]:
        """Pre-tokenised pieces (special-token literals kept whole)."""
        if self.cleaning == "openai":
            return self._pieces_openai(text)
        out = []
        for i, span in enumerate(self._special_pat.split(text)):
            if i % 2:  # a special-token literal, matched verbatim before normalisation
                out.append(span)
                continue
            span = unicodedata.normalize("NFC", span)
            span = _WHITESPACE.sub(" ", span)
            span = "".join(c.lower() for c in span)  # per character, as Rust's to_lowercase
            for piece in _CLIP_PAT.findall(span):
                out.extend(_GPT2_PAT.findall(piece))
        return out

    def _pieces_openai(self, text: str) -> list[str]:
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:
            pass
        text = html.unescape(html.unescape(text)).strip()
        text = " ".join(text.split()).lower()
        return _CLIP_PAT_I.findall(text)

    def bpe(self, piece: str) -> list[str]:
        """BPE symbols of one pre-tokenised piece (bytes already mapped to characters)."""
        if piece in self._cache:
            return self._cache[piece]
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            # merge every occurrence of the best-ranked adjacent pair, left to right
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self._cache) < 100_000:
            self._cache[piece] = word
        return word

    def tokenize(self, text: str) -> list[str]:
        """BPE token strings of ``text`` (no sot/eot)."""
        out = []
        for piece in self._pieces(text):
            if piece in (SOT, EOT) or (piece == self.pad_token and self.cleaning == "transformers"):
                out.append(piece)
                continue
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            out.extend(self.bpe(mapped))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without sot/eot and without truncation."""
        return [self.encoder.get(t, self.eot_id) for t in self.tokenize(text)]

    def decode(self, ids) -> str:
        """Text of token ids (sot/eot/padding dropped)."""
        ids = [int(i) for i in ids]
        toks = [self.decoder.get(i, "") for i in ids if i not in (self.sot_id, self.eot_id)]
        raw = bytearray()
        for c in "".join(toks).replace("</w>", " "):
            raw.extend(bytes([self.byte_decoder[c]]) if c in self.byte_decoder else c.encode("utf-8"))
        return raw.decode("utf-8", errors="replace").strip()

    # ---- prompts → ids tensor -----------------------------------------------------------
    def __call__(self, prompts: str | Sequence[str], warn: bool = True) -> torch.Tensor:
        """``LongTensor[B, max_length]``: sot, ids (truncated), eot, padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a str or a list of str, got {prompts!r}")
        rows = [self._row(p, warn) for p in prompts]
        return torch.tensor(rows, dtype=torch.long)

    def _row(self, prompt: str, warn: bool) -> list[int]:
        ids = self.encode(prompt)
        keep = self.max_length - 2
        if len(ids) > keep and warn:
            warnings.warn(
                f"prompt is longer than CLIP's {self.max_length} tokens; this part was cut off: "
                f"{self.decode(ids[keep:])!r}",
                stacklevel=3,
            )
        row = [self.sot_id] + ids[:keep] + [self.eot_id]
        return row + [self.pad_id] * (self.max_length - len(row))

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab={len(self.encoder)}, merges={len(self.bpe_ranks)}, "
            f"pad={self.pad_token!r}, cleaning={self.cleaning!r})"
        )
