"""Long and weighted prompts for SDXL: A1111 attention syntax, 75-token chunks, compel's weighting.

* :func:`parse_prompt_attention` reads AUTOMATIC1111's syntax into ``[(text, weight), …]``:
  ``(w)`` ×1.1, ``((w))`` ×1.21, ``[w]`` ×(1/1.1), ``(w:1.3)`` ×1.3, nesting multiplies,
  ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal; unclosed brackets weigh to the end of the
  prompt, stray closing ones are text. ``BREAK`` is plain text here.
* Each fragment is tokenized on its own and every token carries its fragment's weight; the ids
  are cut into chunks of 75 (``split="tokens"``) or, as compel's default, at the last sentence
  end / phrase end / word end of each 75 (``split="sentences"``), each chunk is
  ``[BOS] ids [EOS]`` padded to 77 with the tokenizer's pad id, and each chunk goes through the
  encoder on its own: ``[1, 77·n, D]``.
* Weights as compel 2.5.1 applies them (``DownweightMode.MASK``): with ``E`` the encoding of the
  empty prompt, a token of weight ``w ≠ 1`` becomes ``E + (z − E)·w`` (position by position); then
  for every fragment of weight ``w < 1`` the prompt is encoded again with that fragment's tokens
  masked out of attention (the chunk's BOS and last position stay visible), weighted the same way,
  and the result is ``(base + Σ tᵢ·maskedᵢ) / (1 + Σ tᵢ)`` with ``tᵢ = tan((1 − max(wᵢ, 1e-5))·π/2)``.

See docs/components.md, "Long and weighted prompts".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .clip import CLIPTextModel
    from .encoders import TextEncoders
    from .tokenizer import CLIPTokenizer

ROUND = 1.1  # (word)
SQUARE = 1 / 1.1  # [word] — multiplied by this, as A1111 does (not divided by 1.1)
SPLITS = ("tokens", "sentences")

# A1111's tokens: an escaped bracket or backslash, a lone backslash (dropped), an opening bracket,
# ":<number>)" closing a weighted round bracket, a closing bracket, a run of text, a lone ":".
_ATTENTION = re.compile(
    r"""\\[()\[\]\\] | \\ | \( | \[ | :\s*([+-]?[.\d]+)\s*\) | \) | \] | [^\\()\[\]:]+ | :""",
    re.X,
)


# ---- syntax -------------------------------------------------------------------------------
def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``[(fragment, weight), …]`` of an A1111 prompt; adjacent equal weights are merged.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, by: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= by

    for m in _ATTENTION.finditer(text):
        tok, number = m.group(0), m.group(1)
        weight = None
        if number is not None:
            try:
                weight = float(number)
            except ValueError:  # "(x:1.2.3)": A1111 raises; here the ":1.2.3)" is text
                weight = None
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), weight)
        elif tok == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            res.append([tok, 1.0])
    for pos in round_open:  # unclosed: weigh to the end
        multiply(pos, ROUND)
    for pos in square_open:
        multiply(pos, SQUARE)
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for frag in res[1:]:
        if frag[1] == merged[-1][1]:
            merged[-1][0] += frag[0]
        else:
            merged.append(frag)
    return [(t, w) for t, w in merged]


def strip_syntax(text: str) -> str:
    """The prompt with its weighting syntax removed (what the pooled embedding is made from)."""
    return "".join(t for t, _ in parse_prompt_attention(text))


def is_plain(text: str) -> bool:
    """True when ``text`` has no weighting syntax (parsing leaves it unchanged, weight 1)."""
    return parse_prompt_attention(text) == [(text, 1.0)]


def fits(tokenizer: "CLIPTokenizer", text: str) -> bool:
    return len(tokenizer.encode(text)) <= tokenizer.max_length - 2


def needs_long_path(te: "TextEncoders", p1: Sequence[str], p2: Sequence[str]) -> bool:
    """False when every prompt is plain and fits one chunk in its tokenizer: then the 77-token
    path is taken, so those prompts give exactly what ``encode(truncate=True)`` gives."""
    pairs = [(te.tokenizer, p) for p in p1] + [(te.tokenizer_2, p) for p in p2]
    return not all(is_plain(p) and fits(tok, p) for tok, p in pairs)


# ---- tokens -------------------------------------------------------------------------------
@dataclass
class ChunkedTokens:
    """Ids of ``n`` chunks of ``max_length`` (BOS … EOS pad…), one weight per id (1 for BOS, EOS
    and padding), and each fragment's (first, last) position in them (None: no tokens)."""

    ids: list[int]
    weights: list[float]
    ranges: list[tuple[int, int] | None]
    length: int = 77

    @property
    def chunks(self) -> int:
        return len(self.ids) // self.length


def _split_point(tok: "CLIPTokenizer", ids: list[int], size: int, split: str) -> int:
    """compel's ``_find_next_best_split_point``: SENTENCES → PHRASES → WORDS → ``size``."""
    if split == "tokens" or len(ids) <= size:
        return size
    names = [tok.decoder.get(i, "") for i in ids[:size]]
    tests = (lambda s: s == ".</w>", lambda s: s in (".</w>", ",</w>", ";</w>", ":</w>"),
             lambda s: s.endswith("</w>"))
    for test in tests:
        for i in range(len(names) - 1, -1, -1):
            if test(names[i]):
                return i + 1
    return size


def chunk_tokens(tok: "CLIPTokenizer", fragments: Sequence[tuple[str, float]], split: str = "tokens") -> ChunkedTokens:
    """Tokenize each fragment, chunk as compel's ``_chunk_and_pad_token_ids`` (never truncated)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    ids: list[int] = []
    weights: list[float] = []
    owner: list[int] = []  # fragment index of each id
    for k, (text, w) in enumerate(fragments or [("", 1.0)]):
        t = tok.encode(text)
        ids += t
        weights += [float(w)] * len(t)
        owner += [k] * len(t)
    length, size = tok.max_length, tok.max_length - 2
    out_ids, out_w, pos = [], [], []
    rest = list(range(len(ids)))
    while True:
        cut = _split_point(tok, [ids[i] for i in rest], size, split)
        part, rest = rest[:cut], rest[cut:]
        start = len(out_ids) + 1
        pos += [start + j for j in range(len(part))]
        row = [tok.sot_id] + [ids[i] for i in part] + [tok.eot_id]
        out_ids += row + [tok.pad_id] * (length - len(row))
        out_w += [1.0] + [weights[i] for i in part] + [1.0] * (length - len(row) + 1)
        if not rest:
            break
    ranges: list[tuple[int, int] | None] = [None] * max(len(fragments), 1)
    for i, k in enumerate(owner):
        ranges[k] = (pos[i], pos[i]) if ranges[k] is None else (ranges[k][0], pos[i])
    return ChunkedTokens(out_ids, out_w, ranges, length)


# ---- encoding -----------------------------------------------------------------------------
def _penultimate_masked(enc: "CLIPTextModel", ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``enc``'s penultimate hidden state for ``ids [N, L]`` with key positions ``keep == False``
    hidden from every query (transformers' ``attention_mask``), on top of the causal mask."""
    x = enc.embeddings(ids)
    n = ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
    mask = causal[None, None] & keep[:, None, None, :]
    for layer in enc.encoder.layers[:-1]:  # hidden_states[-2] is the output of the last-but-one layer
        attn, h = layer.self_attn, layer.layer_norm1(x)
        b, _, d = h.shape

        def split(t):
            return t.view(b, n, attn.heads, d // attn.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h)),
                                           attn_mask=mask)
        x = x + attn.out_proj(o.transpose(1, 2).reshape(b, n, d))
        x = x + layer.mlp(layer.layer_norm2(x))
    return x


def empty_embedding(tok: "CLIPTokenizer", enc: "CLIPTextModel") -> torch.Tensor:
    """Penultimate hidden state of the empty prompt ``[BOS, EOS, pad…]``: ``[1, 77, D]``."""
    return enc(tok([""]).to(enc.device)).hidden_states[-2]


@torch.no_grad()
def encode_weighted(
    tok: "CLIPTokenizer",
    enc: "CLIPTextModel",
    fragments: Sequence[tuple[str, float]],
    split: str = "tokens",
    empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """One encoder's weighted penultimate hidden states of one prompt: ``[1, 77·n, D]``
    (compel's ``get_embeddings_for_weighted_prompt_fragments``, MASK down-weighting)."""
    ct = chunk_tokens(tok, fragments, split)
    n, length, dev = ct.chunks, ct.length, enc.device
    ids = torch.tensor(ct.ids, dtype=torch.long, device=dev).view(n, length)
    z = enc(ids).hidden_states[-2]  # [n, 77, D]
    down = [(r, wt) for r, (_, wt) in zip(ct.ranges, fragments) if r is not None and wt < 1]
    w = torch.tensor(ct.weights, dtype=torch.float32, device=dev).view(n, length, 1)
    identity = w == 1
    if bool(identity.all()) and not down:
        return z.reshape(1, n * length, -1)
    if empty is None:
        empty = empty_embedding(tok, enc)
    e = empty.float()

    def weigh(h: torch.Tensor) -> torch.Tensor:  # E + (z − E)·w, exactly z where w == 1
        h = h.float()
        return torch.where(identity, h, e + (h - e) * w)

    base = weigh(z)
    runs, lerp = [base], [1.0]
    for (start, end), weight in down:
        keep = torch.ones(n * length, dtype=torch.bool, device=dev)
        keep[start : end + 1] = False
        keep[0::length] = True  # compel keeps each chunk's BOS and last position visible
        keep[length - 1 :: length] = True
        keep = keep.view(n, length)
        hit = (~keep).any(dim=1)  # chunks whose mask changed; the others encode exactly as the base
        masked = z.clone()
        if bool(hit.any()):
            masked[hit] = _penultimate_masked(enc, ids[hit], keep[hit]).to(z.dtype)
        runs.append(weigh(masked))
        lerp.append(math.tan((1.0 - max(1e-5, weight)) * math.pi / 2))
    if len(runs) > 1:
        lw = torch.tensor(lerp, dtype=torch.float32, device=dev)
        lw = (lw / lw.sum()).view(-1, 1, 1, 1)
        base = (torch.stack(runs) * lw).sum(dim=0)
    return base.reshape(1, n * length, -1).to(z.dtype)


def pad_chunks(tensors: list[torch.Tensor], empty: torch.Tensor, length: int | None = None) -> list[torch.Tensor]:
    """Each ``[B, 77·k, D]`` tensor extended with copies of ``empty [1, 77, D]`` up to ``length``
    tokens (default: the longest) — compel's ``pad_conditioning_tensors_to_same_length``."""
    length = length or max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        extra = (length - t.shape[1]) // empty.shape[1]
        if extra:
            t = torch.cat([t, empty.to(t).expand(t.shape[0], -1, -1).repeat(1, extra, 1)], dim=1)
        out.append(t)
    return out


def _empty_pair(te: "TextEncoders") -> torch.Tensor:
    parts = [empty_embedding(tok, enc) for tok, enc in ((te.tokenizer, te.text_encoder), (te.tokenizer_2, te.text_encoder_2))]
    return torch.cat([p.to(device=te.device, dtype=te.dtype) for p in parts], dim=-1)


@torch.no_grad()
def encode_long(
    te: "TextEncoders", p1: Sequence[str], p2: Sequence[str] | None = None, split: str = "tokens"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds [B, 77·n, D1+D2], pooled [B, P])`` of A1111-syntax prompts of any length.

    Encoder 1 reads ``p1``, encoder 2 ``p2`` (default ``p1``); every sequence is padded with
    encodings of the empty prompt to the longest of the batch and of both encoders. ``pooled`` is
    encoder 2's pooled output of ``p2`` with the syntax removed, truncated to 75 tokens.
    """
    p1 = list(p1)
    p2 = list(p2) if p2 is not None else p1
    if len(p1) != len(p2):
        raise ValueError(f"prompt has {len(p1)} entries but prompt_2 has {len(p2)}; give as many of each")
    encoders = ((te.tokenizer, te.text_encoder, p1), (te.tokenizer_2, te.text_encoder_2, p2))
    empties: dict[int, torch.Tensor] = {}  # each encoder's empty prompt, computed only if needed

    def empty_of(i: int) -> torch.Tensor:
        if i not in empties:
            empties[i] = empty_embedding(*encoders[i][:2])
        return empties[i]

    seqs = []
    for i, (tok, enc, texts) in enumerate(encoders):
        rows = []
        for p in texts:
            frags = parse_prompt_attention(p)
            weighted = any(w != 1 for _, w in frags)
            rows.append(encode_weighted(tok, enc, frags, split, empty_of(i) if weighted else None))
        seqs.append(rows)
    length = max(t.shape[1] for rows in seqs for t in rows)
    parts = []
    for i, rows in enumerate(seqs):
        if any(t.shape[1] < length for t in rows):
            rows = pad_chunks(rows, empty_of(i), length)
        parts.append(torch.cat(rows).to(device=te.device, dtype=te.dtype))
    embeds = torch.cat(parts, dim=-1)
    ids = te.tokenizer_2([strip_syntax(p) for p in p2], warn=False).to(te.text_encoder_2.device)
    pooled = te.text_encoder_2(ids).pooled
    return embeds, pooled


def pad_pair(te: "TextEncoders", a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative embeddings padded with empty-prompt chunks to the same length."""
    if a.shape[1] == b.shape[1]:
        return a, b
    a, b = pad_chunks([a, b], _empty_pair(te))
    return a, b
