"""sdfast.text.CLIPTokenizer against transformers' CLIPTokenizer (the reference SD front ends use).

The reference is loaded with `from_pretrained(dir)` from a vocab.json / merges.txt that this test
writes from the shipped merge list, laying the vocabulary out as OpenAI's simple_tokenizer.py
does, with transformers' own byte table (so sdfast's vocabulary derivation is checked too).
Token ids are integers: every comparison is exact.
"""

import pytest
import torch

import sdfast.text
from sdfast.text import CLIPTokenizer, get_tokenizer

transformers = pytest.importorskip("transformers")
from _fixtures import write_clip_tokenizer_dir  # noqa: E402


CORPUS = [
    "a photo of a cat",
    "",
    "Hello, World!",
    "UPPER case and MiXeD CaSe Words",
    "it's, they're, we'll, I'd, you've, I'm, don't, O'Neil's",
    "1girl, 2boys, 3.14159, 1,000,000 and 2024-01-01 at 12:30pm",
    "   lots   of \t whitespace\n\nand new lines \r\n at both ends   ",
    "punctuation!!! ??? ... ;:- _ ~ @#$%^&* <> {} | ` \" '",
    "(masterpiece:1.2), [[blurry]], \\(escaped\\), embedding:foo BREAK bar",
    "café naïve façade résumé e\u0301 (combining accent)",
    "Ünïcödé Straße İstanbul ǅ ﬁ ligature",
    "日本語のテキスト、中文，한국어",
    "Привет мир, Ελληνικά, مرحبا, עברית",
    "emoji 🐱🐶🔥👍🏽 ❤️ 👨‍👩‍👧 flags 🇫🇷",
    "non\u00a0breaking\u3000ideographic\u200bzero-width",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "a" * 300,
    " ".join(["a long prompt with many words, commas and numbers 42"] * 12),
]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return write_clip_tokenizer_dir(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def reference(reference_dir):
    return transformers.CLIPTokenizer.from_pretrained(str(reference_dir))


def test_special_ids_and_size(reference):
    tok = get_tokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (reference.bos_token_id,
                                                     reference.eos_token_id,
                                                     reference.pad_token_id)
    assert tok.vocab_size == len(reference) == 49408
    assert tok.max_length == 77
    assert tok.comma_id == reference.convert_tokens_to_ids(",</w>")


def test_vocabulary_matches(reference):
    tok = get_tokenizer()
    vocab = reference.get_vocab()
    assert len(vocab) == tok.vocab_size
    assert all(tok.token_to_id(t) == i for t, i in vocab.items())
    assert all(tok.id_to_token(i) == t for t, i in vocab.items())
    assert tok.token_to_id("not-a-token</w>") is None


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_reference(reference, text):
    assert get_tokenizer().encode(text) == reference(text, add_special_tokens=False)["input_ids"]


def test_batch_matches_reference(reference):
    got = get_tokenizer()(CORPUS)
    want = reference(CORPUS, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt")["input_ids"]
    assert got.dtype == torch.long and got.shape == (len(CORPUS), 77)
    assert torch.equal(got, want)
    assert (got[:, -1][got[:, -2] != reference.eos_token_id] == reference.eos_token_id).all()


def test_sd2_padding_matches_reference(reference):
    # SD2's OpenCLIP pads with id 0 after the end token. The reference is the SD1 layout with
    # every position after the closing end token set to 0 (a literal "<|endoftext|>" in the
    # text is content, so the closing one is found from the content length). Not
    # `from_pretrained(pad_token="!")`: that registers "!" as a special token, so a literal "!"
    # in a prompt would become id 0, which OpenCLIP (the tokenizer SD2 was trained with) never does.
    want = reference(CORPUS, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt")["input_ids"]
    for row, text in zip(want, CORPUS):
        content = min(len(reference(text, add_special_tokens=False)["input_ids"]), 75)
        row[content + 2:] = 0  # start + content + end, then padding
    got = get_tokenizer(pad_id=0)(CORPUS)
    assert torch.equal(got, want)
    assert got[0, 7:].eq(0).all()  # "a photo of a cat": 5 tokens, then end, then zeros


@pytest.mark.parametrize("skip_special", [False, True])
def test_decode_matches_reference(reference, skip_special):
    tok = get_tokenizer()
    for row in tok(CORPUS).tolist():
        want = reference.decode(row, skip_special_tokens=skip_special)
        assert tok.decode(row, skip_special_tokens=skip_special) == want


def test_single_string_and_cache():
    tok = get_tokenizer()
    assert torch.equal(tok("a cat"), tok(["a cat"]))
    assert get_tokenizer() is tok
    assert get_tokenizer(pad_id=0) is not tok
    assert get_tokenizer(pad_id=0)._tok is tok._tok  # one Rust tokenizer shared
    with pytest.raises(ValueError):
        CLIPTokenizer(pad_id=49408)
