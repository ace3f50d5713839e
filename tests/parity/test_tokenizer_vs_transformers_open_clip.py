"""Our CLIP BPE tokenizer gives the ids of transformers' CLIPTokenizer (same vocab files)."""

import random
import warnings

import pytest
import torch

from demofusion.text import CLIPTokenizer
from demofusion.text.tokenizer import open_clip_bpe_path
from tests.helpers.text import hf_ids, hf_tokenizer, write_byte_vocab, write_clip_vocab

pytest.importorskip("transformers")
pytest.importorskip("open_clip")

HAND = [
    "", " ", "\t\n", "a", "A", "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT, 8k, highly detailed, trending on artstation",
    "  leading and trailing   spaces  ", "tabs\tand\nnewlines\r\nand\u000bvertical\u000cfeeds",
    "it's they're we've I'm you'll he'd don't", "IT'S THEY'RE", "rock'n'roll", "''s ''t '", "`quoted` \"double\"",
    "!!!", "?!?!...", "--==++**", "(((masterpiece))), [best quality:1.2], {detailed}",
    "a,b,c;d:e", "100% 3.14159 1,000,000 2024-01-01 12:30", "007 42nd 3rd 1st", "x² ½ ⅓ ⑦ Ⅻ",
    "１２３４ ａｂｃ ＡＢＣ", "٣٤٥ ١٢ ०१२", "café naïve résumé façade Ångström", "cafe\u0301 (decomposed e-acute)",
    "Zürich München Köln", "ÀÉÎÕÜ àéîõü", "ĳ ŉ ǆ ǅ Ǆ", "straße STRASSE ẞ", "İstanbul ıi Iİ",
    "ΟΔΥΣΣΕΥΣ Σίσυφος ΣΣ", "Привет, мир! ПРИВЕТ", "こんにちは世界", "中文提示词，高清，杰作", "한국어 프롬프트",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "ไทย ภาษา", "emoji 🤖🎨🔥", "👍🏽👨‍👩‍👧‍👦🏳️‍🌈",
    "🇫🇷🇯🇵 flags", "😀😃😄😁😆😅😂🤣", "♥♦♣♠ ★☆ ©®™", "→←↑↓ ⇒ ∀∃∈ ∑∏ √∞", "math: a+b=c, x*y/z^2",
    "&amp; &lt;tag&gt; &quot;q&quot; &#39;s &nbsp; &copy;", "&amp;amp; double escaped", "<b>bold</b> <i>it</i>",
    "<|startoftext|>", "<|endoftext|>", "a<|endoftext|>b", "<|ENDOFTEXT|> upper", " <|startoftext|> x <|endoftext|> ",
    "<|endoftext", "|endoftext|>", "<|foo|>", "non\u00a0breaking\u00a0space", "ideographic\u3000space",
    "zero\u200bwidth\u200cjoiner\u200d", "soft\u00adhyphen", "file\x1cgroup\x1drecord\x1eunit\x1fsep",
    "nul\x00char", "bell\x07 esc\x1b del\x7f", "\u2028line\u2029para", "\u180emongolian", "ogham\u1680space",
    "en\u2002em\u2003thin\u2009hair\u200a", "narrow\u202fnbsp\u205fmath", "ﬁﬂ ligatures ﬀ", "Ⅷ ⅷ",
    "ＨＥＬＬＯ ｗｏｒｌｄ", "mixed123abc456", "snake_case and kebab-case and CamelCase", "http://example.com/a?b=c&d=e",
    "user@example.com", "#hashtag @mention $100 €50 £3 ¥7", "~tilde ^caret |pipe \\backslash", "a" * 300,
    "word " * 100, "🤖" * 60, "., " * 50, "1 2 3 4 5 6 7 8 9 0 " * 10,
    " ".join(["masterpiece, best quality, ultra detailed, 8k wallpaper, dramatic lighting"] * 4),
]


def _random_corpus(n, seed=0):
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n\r\u00a0\u3000",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "àáâäæçèéêëìíîïñòóôöœùúûüÿÀÉÎÖÜßøå", "αβγδΣσςΩЖжЯя",
        "日本語中文한국어", "🤖🎨🔥👍🏽✨🌈", "‐–—…‘’“”•·°±×÷", "\u0301\u0308\u200b\u200d\ufe0f",
    ]
    words = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "<|endoftext|>", "<|startoftext|>", "'s", "'ll", "n't"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.1:
                parts.append(rng.choice(words))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
            parts.append(rng.choice(["", " ", "  ", "\n"]))
        out.append("".join(parts))
    return out


CORPUS = HAND + _random_corpus(200)


@pytest.fixture(scope="module")
def vocab_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipvocab")
    return write_clip_vocab(root / "tokenizer"), write_clip_vocab(root / "tokenizer_2", pad_token="!")


def test_corpus_is_awkward_enough(vocab_dirs):
    ref = hf_tokenizer(vocab_dirs[0])
    lengths = [len(ref(p, add_special_tokens=False).input_ids) for p in CORPUS]
    assert len(CORPUS) >= 200 and "" in CORPUS
    assert sum(n > 75 for n in lengths) >= 10, "the corpus must exercise truncation"


@pytest.mark.parametrize("which", ["tokenizer", "tokenizer_2"])
def test_ids_equal_transformers(vocab_dirs, which):
    folder = vocab_dirs[0] if which == "tokenizer" else vocab_dirs[1]
    ref, ours = hf_tokenizer(folder), CLIPTokenizer.from_folder(folder)
    assert ours.pad_id == ref.pad_token_id == (49407 if which == "tokenizer" else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(CORPUS)
    want = hf_ids(ref, CORPUS)
    bad = [(p, got[i].tolist(), want[i].tolist()) for i, p in enumerate(CORPUS) if not torch.equal(got[i], want[i])]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]}"
    # also the untruncated ids (no specials) on every prompt
    for p in CORPUS:
        assert ours.encode(p) == ref(p, add_special_tokens=False).input_ids, p


def test_open_clip_vocab_equals_vocab_files(vocab_dirs):
    assert open_clip_bpe_path() is not None
    a, b = CLIPTokenizer.from_open_clip(), CLIPTokenizer.from_folder(vocab_dirs[0])
    assert a.encoder == b.encoder and a.bpe_ranks == b.bpe_ranks and len(a.encoder) == 49408
    c = CLIPTokenizer.from_open_clip(pad_token="!")
    assert c.pad_id == 0


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_byte_level_equals_transformers(tmp_path, pad):
    ref = hf_tokenizer(write_byte_vocab(tmp_path / "bytes", pad_token=pad))
    ours = CLIPTokenizer.byte_level(pad_token=pad)
    assert (ours.sot_id, ours.eot_id) == (512, 513) and len(ours.encoder) == 514
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(CORPUS)
    assert torch.equal(got, hf_ids(ref, CORPUS))
    assert int(got.max()) <= 513 and torch.equal(got.argmax(-1), (got == 513).int().argmax(-1))


def test_truncation_warns_with_the_cut_text():
    tok = CLIPTokenizer.from_open_clip()
    prompt = "one " * 75 + "two three"
    with pytest.warns(UserWarning, match="two three"):
        ids = tok(prompt)
    assert ids.shape == (1, 77) and ids[0, -1] == tok.eot_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok("one " * 75)  # exactly 75 tokens: nothing cut, no warning


def test_decode_round_trip():
    tok = CLIPTokenizer.from_open_clip()
    assert tok.decode(tok("A photo of a Cat, café!")[0]) == "a photo of a cat , café !"


def test_save_then_load_folder(tmp_path):
    tok = CLIPTokenizer.byte_level(pad_token="!")
    loaded = CLIPTokenizer.load(tok.save(tmp_path / "tokenizer_2").parent, subfolder="tokenizer_2")
    assert loaded.encoder == tok.encoder and loaded.pad_id == 0


def test_missing_vocab_error(monkeypatch):
    import demofusion.text.tokenizer as T

    monkeypatch.setattr(T, "open_clip_bpe_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="open_clip_torch"):
        T.CLIPTokenizer.load(None)


def test_openai_cleaning_matches_open_clip_simple_tokenizer():
    """cleaning="openai" (ftfy + HTML unescape, as OpenAI's CLIP) equals open_clip's SimpleTokenizer."""
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()  # its specials are named <start_of_text>/<end_of_text>: skip literals
    ours = CLIPTokenizer.from_open_clip(pad_token="!", cleaning="openai")
    corpus = [p for p in CORPUS if "<|" not in p and "|>" not in p]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ours(corpus), ref(corpus))
    # the two cleanings differ where the docs say they do (HTML entities, ftfy fixes)
    hf = CLIPTokenizer.from_open_clip()
    assert ours.encode("&amp;") != hf.encode("&amp;") and ours.encode("a &amp; b") == hf.encode("a & b")


def _random_codepoint_prompts(n, seed=1):
    """Random characters from many Unicode blocks (code points assigned in Python's Unicode)."""
    import unicodedata

    blocks = [(0x0, 0x7F), (0x80, 0x2FF), (0x300, 0x36F), (0x370, 0x52F), (0x600, 0x6FF), (0x900, 0x97F),
              (0x10A0, 0x10FF), (0x1E00, 0x1FFF), (0x2000, 0x206F), (0x2100, 0x2BFF), (0x3000, 0x30FF),
              (0x4E00, 0x4E80), (0xAC00, 0xAC80), (0xFB00, 0xFB4F), (0xFE00, 0xFE6F), (0xFF00, 0xFFEF),
              (0x1D400, 0x1D7FF), (0x1F1E6, 0x1F1FF), (0x1F300, 0x1FAFF), (0xE0000, 0xE007F)]
    rng, out = random.Random(seed), []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 60)):
            c = chr(rng.randint(*rng.choice(blocks)))
            if unicodedata.category(c) not in ("Cn", "Cs"):
                chars.append(c + (" " if rng.random() < 0.2 else ""))
        out.append("".join(chars))
    return out


def test_random_codepoints_equal_transformers(vocab_dirs):
    """Fuzz: 1500 prompts of random characters from 20 Unicode blocks, both paddings."""
    corpus = _random_codepoint_prompts(1500)
    for folder in vocab_dirs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = CLIPTokenizer.from_folder(folder)(corpus)
        want = hf_ids(hf_tokenizer(folder), corpus)
        bad = [p for i, p in enumerate(corpus) if not torch.equal(got[i], want[i])]
        assert not bad, f"{len(bad)} prompts differ, first: {bad[0]!r}"
