"""Long and weighted prompts (demofusion/text/prompts.py): A1111 parser, chunking, compel parity.

The references are compel 2.5.1 (weights, chunks, MASK down-weighting, padding) and diffusers'
``StableDiffusionXLPipeline.encode_prompt`` (short plain prompts), on tiny transformers encoders.
"""

import warnings

import pytest
import torch

from demofusion.text import load_text_encoders
from demofusion.text.prompts import (
    chunk_tokens,
    encode_long,
    is_plain,
    parse_prompt_attention,
    strip_syntax,
)
from demofusion.text.tokenizer import CLIPTokenizer
from tests.helpers import assert_close_rel, max_rel_err
from tests.helpers.text import write_tiny_text_folder

R, S = 1.1, 1 / 1.1

# ---- parser ---------------------------------------------------------------------------------
PARSE = {
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", R), (" word", 1.0)],
    "((word))": [("word", R * R)],
    "[word]": [("word", S)],
    "[[word]]": [("word", S * S)],
    "(word:1.3)": [("word", 1.3)],
    "a ( word : 0.5 ) b": [("a ", 1.0), (" word ", 0.5), (" b", 1.0)],
    "((word:1.3))": [("word", 1.3 * R)],
    "(a [b] c)": [("a ", R), ("b", S * R), (" c", R)],
    "(a (b:1.5) c:0.8)": [("a ", 0.8), ("b", 1.5 * 0.8), (" c", 0.8)],
    "(unbalanced": [("unbalanced", R)],
    "a [b (c": [("a ", 1.0), ("b ", S), ("c", R * S)],
    r"\(literal\]": [("(literal]", 1.0)],
    r"a \(b\) \[c\] d\\e": [(r"a (b) [c] d\e", 1.0)],
    r"(esc \) inside)": [("esc ) inside", R)],
    r"a\b": [("ab", 1.0)],  # a lone backslash is dropped, as A1111 does
    "(unnecessary)(parens)": [("unnecessaryparens", R)],
    "a) b] c": [("a) b] c", 1.0)],  # stray closing brackets are text
    "word:1.2) x": [("word:1.2) x", 1.0)],  # a weight with no open bracket is text
    "time: 12:30": [("time: 12:30", 1.0)],
    "(x:1.2.3)": [("x:1.2.3)", R)],  # malformed number: text (A1111 raises), bracket left open
    "a BREAK b": [("a BREAK b", 1.0)],  # BREAK is plain text here
    "[x:0.3]": [("x:0.3", S)],  # only ")" closes a weight; A1111's [a:b:n] editing is not parsed here
    "": [("", 1.0)],
    "()": [("", 1.0)],
    # A1111's own docstring example
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
}


@pytest.mark.parametrize("text", list(PARSE))
def test_parse_prompt_attention(text):
    got, want = parse_prompt_attention(text), PARSE[text]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


def test_strip_syntax_and_is_plain():
    assert strip_syntax(r"a (red:1.3) [cat] \(x\)") == "a red cat (x)"
    assert is_plain("a photo of a cat, 4k") and is_plain("")
    assert not is_plain("a (cat)") and not is_plain(r"a \(cat\)") and not is_plain("(cat:1.0)")


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_chunks_of_75_wrapped_and_padded(pad):
    tok = CLIPTokenizer.byte_level(pad_token=pad)
    frags = [("x" * 100, 1.0), ("y" * 60, 1.5)]
    ct = chunk_tokens(tok, frags)
    assert ct.chunks == 3 and len(ct.ids) == len(ct.weights) == 3 * 77
    ids = [ct.ids[i * 77:(i + 1) * 77] for i in range(3)]
    assert all(c[0] == tok.sot_id and c[76] in (tok.eot_id, tok.pad_id) for c in ids)
    assert ids[0][76] == ids[1][76] == tok.eot_id  # full chunks: BOS + 75 + EOS
    assert ids[2][1:11] == tok.encode("y" * 60)[-10:] and ids[2][11] == tok.eot_id  # 160 = 75 + 75 + 10
    assert set(ids[2][12:]) == {tok.pad_id}  # SDXL: tokenizer 1 pads with EOS, tokenizer 2 with "!"
    assert ct.ranges == [(1, 102), (103, 164)]  # token positions, across chunk boundaries
    assert ct.weights[:77] == [1.0] * 77 and ct.weights[77:103] == [1.0] * 26
    assert ct.weights[103:154] == [1.5] * 50 + [1.0] and ct.weights[154:] == [1.0] + [1.5] * 10 + [1.0] * 66
    assert chunk_tokens(tok, [("", 1.0)]).ids == tok("").tolist()[0]  # the empty prompt: one chunk


# ---- encoders: ours and compel's over the same tiny folder ----------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("transformers")
    root, e1, e2, t1, t2 = write_tiny_text_folder(tmp_path_factory.mktemp("prompts"), seed=21)
    return load_text_encoders(root), (e1, e2, t1, t2)


_COMPEL: dict = {}


def make_compel(setup, split="tokens"):
    """Two single-encoder Compels configured as compel's CompelForSDXL does (the multi-encoder
    ``Compel([tok1, tok2], …)`` form is deprecated in 2.5.1 and cannot pad: no ``empty_z``)."""
    compel = pytest.importorskip("compel")
    from compel import ReturnedEmbeddingsType
    from compel.embeddings_provider import SplitLongTextMode

    _, (e1, e2, t1, t2) = setup
    if split not in _COMPEL:
        mode = SplitLongTextMode.BRUTAL if split == "tokens" else SplitLongTextMode.SENTENCES
        kw = dict(returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                  truncate_long_prompts=False, split_long_text_mode=mode)
        _COMPEL[split] = compel.Compel(t1, e1, **kw), compel.Compel(t2, e2, requires_pooled=True, **kw)
    return _COMPEL[split]


_ROWS: dict = {}  # (id(compel), prompt) -> compel's conditioning (computed once per session)


def compel_sdxl(c1, c2, prompts, prompts_2=None):
    """compel's SDXL conditioning of A1111 prompts, fed our parser's fragments as compel fragments:
    each encoder's batch padded with its empty-prompt chunks (Compel.pad_conditioning_tensors_to_
    same_length), the shorter encoder padded likewise (CompelForSDXL), channels concatenated;
    pooled = compel's get_pooled_embeddings of the prompt without its syntax."""
    from compel.prompt_parser import Conjunction, FlattenedPrompt

    prompts_2 = prompts_2 or prompts
    per_encoder = []
    for c, ps in ((c1, prompts), (c2, prompts_2)):
        rows = []
        for p in ps:
            if (id(c), p) not in _ROWS:
                conj = Conjunction([FlattenedPrompt([(t, float(w)) for t, w in parse_prompt_attention(p)])])
                _ROWS[id(c), p] = c.build_conditioning_tensor_for_conjunction(conj)[0]
            rows.append(_ROWS[id(c), p])
        per_encoder.append(torch.cat(c.pad_conditioning_tensors_to_same_length(rows)))
    n = max(x.shape[1] for x in per_encoder)
    for i, c in enumerate((c1, c2)):
        empty = c.conditioning_provider.empty_z
        extra = (n - per_encoder[i].shape[1]) // 77
        per_encoder[i] = torch.cat([per_encoder[i], empty.repeat(len(prompts), extra, 1)], dim=1)
    pooled = c2.conditioning_provider.get_pooled_embeddings([strip_syntax(p) for p in prompts_2])
    return torch.cat(per_encoder, dim=-1), pooled


CORPUS = [
    # up weights, nested; a weighted span across the first chunk boundary
    "a (majestic:1.3) castle on a hill, ((ultra detailed)), oil painting by an old master, warm colors, "
    "(dramatic clouds over the stormy northern sea and the jagged cliffs below:1.25), seagulls, wide angle",
    # down weights [x], [[x]], (x:0.5); a down-weighted span across a chunk boundary
    "portrait of an elderly fisherman, [blurry background], weathered skin, [[film grain]], (soft light:0.5), "
    "(harsh shadows, overexposed highlights, chromatic aberration and lens flare:0.6), kodak portra 400",
    # escaped brackets, literal colons, unclosed bracket at the end
    r"logo text \(version 2\) on a sign: \[beta\] edition, (neon glow:1.4), [rain], city at night, "
    r"reflections on wet asphalt, (cyberpunk:1.1) street vendors, steam rising, (crowd:0.8), (tall buildings",
    # four chunks, weights inside each; "[x:0.3]" is not a weight in A1111 (text at 1/1.1)
    "an enchanted forest, " * 3 + "(glowing mushrooms:1.5), " + "mossy stones and ancient roots, " * 2
    + "[fireflies:0.3], " + "a quiet river winding through the valley, " * 2 + "((bioluminescent)) fog",
    # weight 0 and a tiny weight, square brackets nested in round ones
    "still life with fruit on a wooden table, (apples:0), (pears:0.05), (a bowl of [ripe] grapes:1.2), "
    "dutch golden age painting, chiaroscuro, dark background, (velvet drapery:1.15), silver goblet, candle",
    # plain and long: weights all 1
    "a watercolor map of an imaginary archipelago with tiny villages, lighthouses, winding roads, sailing "
    "ships, sea monsters in the margins, a compass rose and hand lettered island names in sepia ink",
    # stray closers and weights without an opening bracket stay text
    "sunset) over the desert] dunes, camel caravan:1.2) travelling west, (golden hour:1.3), long shadows, "
    "(heat haze:0.7), [distant mountains], a lone acacia tree, (photorealistic:1.2), 35mm film, (((sharp)))",
    # many small fragments, many weights
    " ".join(f"(word{i}:{0.4 + 0.1 * (i % 12):.2f})" for i in range(24)) + ", the end",
]
NEGATIVES = [
    "blurry, low quality",
    "(worst quality:1.4), [jpeg artifacts], " + "deformed hands, extra fingers, watermark, signature, " * 3,
    "",
    "ugly",
    "(lowres:1.2), bad anatomy, " * 6 + "[text]",
    "cropped",
    "(((oversaturated))), [[flat lighting]], " * 4,
    "noise",
]


def test_corpus_is_long_and_weighted(setup):
    ours, _ = setup
    tok = ours.tokenizer
    lengths = [len(tok.encode(strip_syntax(p))) for p in CORPUS]
    assert all(100 <= n <= 250 for n in lengths), lengths
    weights = [w for p in CORPUS for _, w in parse_prompt_attention(p)]
    assert min(weights) == 0 and max(weights) >= 1.5 and any(0 < w < 1 for w in weights)
    crossing = [w for p in CORPUS for r, (_, w) in zip(chunk_tokens(tok, parse_prompt_attention(p)).ranges,
                                                       parse_prompt_attention(p)) if r and r[0] // 77 != r[1] // 77]
    assert any(w > 1 for w in crossing) and any(w < 1 for w in crossing)  # spans cut by a chunk boundary


@pytest.mark.parity
@pytest.mark.parametrize("i", range(len(CORPUS)))
def test_matches_compel_one_prompt(setup, i):
    ours, _ = setup
    c1, c2 = make_compel(setup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, want_pooled = compel_sdxl(c1, c2, [CORPUS[i]])
    got, pooled = ours.encode(CORPUS[i], truncate=False)
    assert got.shape == want.shape and got.shape[1] > 77
    assert_close_rel(got, want, 1e-5, "embeds")
    assert_close_rel(pooled, want_pooled, 1e-5, "pooled")


@pytest.mark.parity
def test_matches_compel_batch_with_negatives(setup):
    """A batch of all prompts with negatives of other lengths: every row padded to the longest."""
    ours, _ = setup
    c1, c2 = make_compel(setup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, want_pooled = compel_sdxl(c1, c2, CORPUS + NEGATIVES)  # as CompelForSDXL: one padded batch
        got = ours.encode_with_negative(CORPUS, negative_prompt=NEGATIVES, truncate=False)
    b = len(CORPUS)
    assert got[0].shape == got[1].shape == want[:b].shape
    for a, w in zip(got, (want[:b], want[b:], want_pooled[:b], want_pooled[b:])):
        assert_close_rel(a, w, 1e-5)


@pytest.mark.parity
def test_matches_compel_prompt_2_and_short_negative(setup):
    """prompt_2 of another length: the shorter encoder is padded with its own empty chunks."""
    ours, _ = setup
    c1, c2 = make_compel(setup)
    p1, p2 = [CORPUS[0], "a cat"], ["(oil painting:1.2)", CORPUS[3]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, want_pooled = compel_sdxl(c1, c2, p1 + ["(blurry:1.1)"] * 2, p2 + ["grainy"] * 2)
        got = ours.encode_with_negative(p1, "(blurry:1.1)", prompt_2=p2, negative_prompt_2="grainy", truncate=False)
    assert got[0].shape[1] == 4 * 77
    for a, w in zip(got, (want[:2], want[2:], want_pooled[:2], want_pooled[2:])):
        assert_close_rel(a, w, 1e-5)


@pytest.mark.parity
def test_sentence_split_matches_compel_default(setup):
    """split="sentences" is compel's default chunking (last '.' / ',' / word end of each 75)."""
    ours, _ = setup
    c1, c2 = make_compel(setup, split="sentences")
    prompts = [CORPUS[0], CORPUS[3], "a red fox. " * 12, "(abcdefghij:1.2)" * 9]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, want_pooled = compel_sdxl(c1, c2, prompts)
    got, pooled = encode_long(ours, prompts, split="sentences")
    assert got.shape == want.shape
    tok = ours.tokenizer
    cuts = [chunk_tokens(tok, parse_prompt_attention(p), "sentences").ids != chunk_tokens(
        tok, parse_prompt_attention(p)).ids for p in prompts]
    assert cuts == [True, True, True, False]  # the last: one 90-letter word, cut at 75 tokens
    assert_close_rel(got, want, 1e-5)
    assert_close_rel(pooled, want_pooled, 1e-5)


@pytest.mark.parity
def test_compel_public_wrapper(setup):
    """compel's own CompelForSDXL on compel syntax written from our fragments gives our result."""
    pytest.importorskip("compel")
    from compel import CompelForSDXL
    from compel.embeddings_provider import SplitLongTextMode
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    ours, (e1, e2, t1, t2) = setup
    pipe = StableDiffusionXLPipeline(vae=None, unet=None, text_encoder=e1, text_encoder_2=e2, tokenizer=t1,
                                     tokenizer_2=t2, scheduler=EulerDiscreteScheduler())
    ref = CompelForSDXL(pipe)
    for c in (ref.compel_1, ref.compel_2):
        c.conditioning_provider.split_long_text_mode = SplitLongTextMode.BRUTAL
    a1111 = "a (red cat:1.3) sitting [on a mat], " * 4 + "((studio photo)), (soft shadows:0.7)"
    frags = parse_prompt_attention(a1111)
    compel_syntax = " ".join(t.strip() if w == 1 else f"({t.strip()}){w!r}" for t, w in frags)
    parsed = ref.compel_1.parse_prompt_string(compel_syntax).prompts[0].children
    assert [(f.text, f.weight) for f in parsed] == [(t.strip(), pytest.approx(w)) for t, w in frags]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref(compel_syntax, negative_prompt="blurry, " * 30)
        got = ours.encode_with_negative(a1111, negative_prompt="blurry, " * 30, truncate=False)
    assert_close_rel(got[0], want.embeds, 1e-5)
    assert_close_rel(got[1], want.negative_embeds, 1e-5)
    assert_close_rel(got[3], want.negative_pooled_embeds, 1e-5)  # plain negative: same text pooled


# ---- short plain prompts: exactly today's path ----------------------------------------------
SHORT = {
    "single": dict(prompt="a photo of a cat, 4k"),
    "batch+negative": dict(prompt=["a photo of a cat", "an astronaut riding a horse!!"],
                           negative_prompt=["blurry", "low quality, ugly"]),
    "prompt_2": dict(prompt="a cat", prompt_2="A DOG, oil painting", negative_prompt="blurry",
                     negative_prompt_2="grainy"),
    "empty-negative": dict(prompt="a cat", negative_prompt=""),
    "zero-negative": dict(prompt="a cat: portrait, 75 tokens at most " + "x" * 30),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(SHORT))
def test_short_plain_prompts_bit_identical_and_match_diffusers(setup, case):
    pytest.importorskip("diffusers")
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    ours, (e1, e2, t1, t2) = setup
    pipe = StableDiffusionXLPipeline(vae=None, unet=None, text_encoder=e1, text_encoder_2=e2, tokenizer=t1,
                                     tokenizer_2=t2, scheduler=EulerDiscreteScheduler())
    kw = SHORT[case]
    long = ours.encode_with_negative(truncate=False, **kw)
    short = ours.encode_with_negative(truncate=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = pipe.encode_prompt(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, **kw)
    for a, b, w in zip(long, short, want):
        assert a.shape == b.shape == w.shape and (a.ndim == 2 or a.shape[1] == 77)
        assert torch.equal(a, b)
        if w.abs().max():
            assert_close_rel(a, w, 1e-5)
        else:
            assert not a.abs().max()
    # the long machinery itself, forced on a plain prompt, agrees too
    p1 = kw["prompt"] if isinstance(kw["prompt"], list) else [kw["prompt"]]
    forced = encode_long(ours, p1, [kw.get("prompt_2") or p for p in p1])
    assert max_rel_err(forced[0], short[0]) <= 1e-6 and max_rel_err(forced[1], short[2]) <= 1e-6


def test_escaped_brackets_encode_the_literal_text(setup):
    ours, _ = setup
    got = ours.encode(r"a sign reading \(open\) \[24h\]", truncate=False)
    want = ours.encode("a sign reading (open) [24h]")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- weights matter, where they should ------------------------------------------------------
def test_weights_change_their_span_only(setup):
    ours, _ = setup
    before, after = "a misty harbour at dawn, " * 4, ", fishing boats, calm water" * 5
    plain = ours.encode(before + "red lighthouse" + after, truncate=False)[0]
    up = ours.encode(before + "(red lighthouse:1.5)" + after, truncate=False)[0]
    down = ours.encode(before + "[red lighthouse]" + after, truncate=False)[0]
    n = plain.shape[1] // 77
    assert n == 3 and plain.shape == up.shape == down.shape == (1, n * 77, 64)
    r = chunk_tokens(ours.tokenizer, parse_prompt_attention(before + "(red lighthouse:1.5)" + after)).ranges[1]
    assert 77 <= r[0] and r[1] < 154  # the span sits in chunk 2
    span = torch.zeros(n * 77, dtype=torch.bool)
    span[r[0]:r[1] + 1] = True
    diff = (up - plain).abs().amax(dim=-1)[0]
    assert diff[span].min() > 1e-3 and not diff[~span].any()  # up-weight: those tokens, nothing else
    # z' = E + (z − E)·1.5, E = the empty prompt's encoding at the same positions
    empty = ours.encode("", truncate=True)[0][0]
    pos = torch.arange(n * 77)[span] % 77
    assert_close_rel(up[0, span], empty[pos] + (plain[0, span] - empty[pos]) * 1.5, 1e-6)
    # down-weight (MASK): the span's chunk changes, the other chunks stay (to rounding)
    chunk = (down - plain).abs().amax(dim=-1)[0].view(n, 77)
    scale = plain.abs().max()
    assert chunk[1, r[0] - 77:].max() > 1e-2 * scale
    assert chunk[[0, 2]].max() <= 1e-6 * scale
    assert chunk[1, : r[0] - 77].max() <= 1e-6 * scale  # causal: the tokens before it are unchanged


def test_long_negative_padding_and_zero_negatives(setup):
    ours, _ = setup
    long, short = CORPUS[3], "blurry"
    pos, neg, _, _ = ours.encode_with_negative(short, negative_prompt=long, truncate=False)
    assert pos.shape == neg.shape == (1, 4 * 77, 64)
    empty = ours.encode("")[0]
    assert torch.equal(pos[:, :77], ours.encode(short)[0])
    for k in range(1, 4):
        assert_close_rel(pos[:, 77 * k:77 * (k + 1)], empty, 1e-6)
    assert ours.force_zeros_for_empty_prompt
    pos, neg, pooled, neg_pooled = ours.encode_with_negative([long, short], truncate=False)
    assert neg.shape == pos.shape == (2, 4 * 77, 64) and not neg.abs().max() and not neg_pooled.abs().max()
    with pytest.raises(ValueError, match="prompt_2"):
        ours.encode(["a", "b"], ["c"], truncate=False)
