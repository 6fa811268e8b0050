"""Chunking (tokenize_prompt) and weighted encoding (encode_prompt).

Expected chunk layouts are built here from the tokenizer's plain `encode` of the pieces and the
rules of A1111's `tokenize_line` / ComfyUI's `tokenize_with_weights` (cited per test). Encodings
use a deterministic toy text encoder (embedding table, causal running mean, fixed random linear
map, so a token's output depends on the tokens before it, as in CLIP). Expected weighted outputs
are computed from A1111's `EmphasisOriginal` and ComfyUI's `encode_token_weights` formulas on
the raw encodings. Everything is float32; where the code and the test evaluate the same formula
in a different order the tolerance is 1e-5 (outputs are O(1), float32 eps is 1.2e-7, and a
mean over 77 * 8 values adds well under 1e-6); unweighted paths must match bit for bit.
"""
import pytest
import torch

from sdfast.text import (Chunk, empty_chunk, encode_prompt, get_tokenizer, parse_prompt_attention,
                         tokenize_prompt)

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def content(tok, chunk: Chunk):
    """The chunk's tokens between start and end (SD1 layout: padding is the end token)."""
    assert chunk.ids[0] == tok.bos_id and len(chunk.ids) == len(chunk.weights) == 77
    n = chunk.ids.index(tok.eos_id, 1)
    assert all(i == tok.pad_id for i in chunk.ids[n + 1:])
    assert chunk.weights[0] == 1.0 and all(w == 1.0 for w in chunk.weights[n:])
    return chunk.ids[1:n], chunk.weights[1:n]


def ids_of(tok, *words):
    return [i for w in words for i in tok.encode(w)]


# ---------------------------------------------------------------------------- A1111 chunking

def test_short_prompt_is_one_tokenizer_row(tok):
    (chunk,) = tokenize_prompt(tok, "a photo of a cat")
    assert chunk.ids == tok(["a photo of a cat"])[0].tolist()
    assert chunk.weights == [1.0] * 77 and chunk.fixes == []


def test_empty_prompt_is_one_chunk(tok):
    assert tokenize_prompt(tok, "") == [empty_chunk(tok)]
    assert empty_chunk(tok).ids == tok([""])[0].tolist()


def test_sd2_pad_id(tok):
    (chunk,) = tokenize_prompt(get_tokenizer(pad_id=0), "a cat")
    assert chunk.ids == [tok.bos_id, *tok.encode("a cat"), tok.eos_id] + [0] * 73


def test_weights_follow_parse(tok):
    (chunk,) = tokenize_prompt(tok, "a (red:1.5) fox on [grass]")
    ids, weights = content(tok, chunk)
    expected = [(i, w) for text, w in parse_prompt_attention("a (red:1.5) fox on [grass]")
                for i in tok.encode(text)]
    assert list(zip(ids, weights)) == expected
    assert weights == pytest.approx([1.0, 1.5, 1.0, 1.0, 1 / 1.1])


@pytest.mark.parametrize("n_tokens,sizes", [(75, [75]), (76, [75, 1]), (100, [75, 25]),
                                            (150, [75, 75]), (151, [75, 75, 1])])
def test_75_tokens_per_chunk(tok, n_tokens, sizes):
    chunks = tokenize_prompt(tok, "cat " * n_tokens)  # one token per word
    assert [len(content(tok, c)[0]) for c in chunks] == sizes
    assert sum((content(tok, c)[0] for c in chunks), []) == ids_of(tok, "cat") * n_tokens


def test_break_starts_a_new_chunk(tok):
    chunks = tokenize_prompt(tok, "a cat BREAK a dog")
    assert [content(tok, c)[0] for c in chunks] == [tok.encode("a cat"), tok.encode("a dog")]
    # A1111: BREAK on an empty chunk still emits it; a trailing BREAK adds nothing.
    assert [content(tok, c)[0] for c in tokenize_prompt(tok, "BREAK a")] == [[], tok.encode("a")]
    assert len(tokenize_prompt(tok, "a BREAK")) == 1
    assert len(tokenize_prompt(tok, "a break b")) == 1


def test_comma_backtrack_moves_tail_to_next_chunk(tok):
    # 70 cats, a comma, 10 dogs: the chunk fills at 70 + 1 + 4; the next dog is not a comma and
    # the comma is 5 <= 20 tokens back, so the chunk ends after the comma (A1111 default 20).
    chunks = tokenize_prompt(tok, "cat " * 70 + ", " + "dog " * 10)
    assert [content(tok, c)[0] for c in chunks] == [ids_of(tok, "cat") * 70 + [tok.comma_id],
                                                   ids_of(tok, "dog") * 10]


@pytest.mark.parametrize("n_before,backtracks", [(55, True), (54, False), (50, False)])
def test_comma_backtrack_window(tok, n_before, backtracks):
    # Comma at index n_before; when the chunk is full its distance is 75 - n_before.
    text = "cat " * n_before + ", " + "dog " * 40
    first = content(tok, tokenize_prompt(tok, text)[0])[0]
    if backtracks:
        assert first == ids_of(tok, "cat") * n_before + [tok.comma_id]
    else:
        assert len(first) == 75
    # With the backtrack disabled, the chunk always holds 75 tokens.
    assert len(content(tok, tokenize_prompt(tok, text, comma_backtrack=0)[0])[0]) == 75


def test_comma_as_76th_token_is_not_backtracked(tok):
    # A comma arriving when the chunk is full is just moved to the next chunk.
    chunks = tokenize_prompt(tok, "cat " * 75 + ", dog")
    assert [content(tok, c)[0] for c in chunks] == [ids_of(tok, "cat") * 75,
                                                   [tok.comma_id] + ids_of(tok, "dog")]


def test_embeddings_take_their_names_places(tok):
    # (the full behaviour is in test_embeddings.py)
    chunk, = tokenize_prompt(tok, "a foo cat", embeddings={"foo": torch.zeros(2, 8)})
    assert chunk.ids[1:5] == ids_of(tok, "a") + [0, 0] + ids_of(tok, "cat")
    assert [offset for offset, _ in chunk.fixes] == [1, 2]


# ---------------------------------------------------------------------------- ComfyUI chunking

def test_comfy_small_group_moves_whole(tok):
    # ComfyUI keeps a group of < 8 tokens together: 72 + 5 > 75, so the group starts chunk 2.
    chunks = tokenize_prompt(tok, "cat " * 72 + "(a b c d e:1.2)", syntax="comfy")
    assert [content(tok, c) for c in chunks] == [
        (ids_of(tok, "cat") * 72, [1.0] * 72), (tok.encode("a b c d e"), [1.2] * 5)]


def test_comfy_large_group_is_split(tok):
    chunks = tokenize_prompt(tok, "cat " * 100, syntax="comfy")
    assert [len(content(tok, c)[0]) for c in chunks] == [75, 25]


def test_comfy_no_break_no_backtrack(tok):
    (chunk,) = tokenize_prompt(tok, "a BREAK b", syntax="comfy")
    assert content(tok, chunk)[0] == tok.encode("a break b")
    chunks = tokenize_prompt(tok, "cat " * 70 + ", " + "dog " * 10, syntax="comfy")
    assert [len(content(tok, c)[0]) for c in chunks] == [75, 6]  # one group of 81, split
    assert tokenize_prompt(tok, "", syntax="comfy") == [empty_chunk(tok)]


# ---------------------------------------------------------------------------- encoding

class ToyEncoder:
    """Deterministic stand-in for a CLIP text encoder: ids [n, T] -> [n, T, dim]."""

    def __init__(self, dim=8, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(49408, dim, generator=g)
        self.proj = torch.randn(dim, dim, generator=g) / dim ** 0.5
        self.dtype = dtype
        self.calls = []

    def __call__(self, ids):
        self.calls.append(ids.clone())
        h = self.table[ids]                                       # [n, T, dim]
        steps = torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)  # [1, T, 1]
        return (torch.tanh(h.cumsum(1) / steps @ self.proj) + 0.5).to(self.dtype)


def test_unweighted_prompt_equals_plain_encoding(tok):
    enc = ToyEncoder()
    cond, uncond = encode_prompt(enc, tok, "a photo of a cat", "blurry")
    assert torch.equal(cond, enc(tok(["a photo of a cat"])))
    assert torch.equal(uncond, enc(tok(["blurry"])))


def test_all_chunks_in_one_encoder_call(tok):
    enc = ToyEncoder()
    encode_prompt(enc, tok, ["a cat", "cat " * 100, "a cat"], "")
    assert len(enc.calls) == 1
    # unique rows: "a cat", two chunks of the long prompt, the empty chunk
    assert enc.calls[0].shape == (4, 77)


def test_a1111_weighting_restores_mean(tok):
    enc = ToyEncoder()
    prompt = "a (red:1.5) fox on [grass]"
    cond, _ = encode_prompt(enc, tok, prompt)
    (chunk,) = tokenize_prompt(tok, prompt)
    assert chunk.ids == tok(["a red fox on grass"])[0].tolist()
    z = enc(torch.tensor([chunk.ids]))                              # [1, 77, C]
    w = torch.tensor([chunk.weights])                               # [1, 77]
    # A1111 EmphasisOriginal: z * w, then rescale to the original mean.
    zw = z * w.unsqueeze(-1)
    expected = zw * (z.mean() / zw.mean())
    torch.testing.assert_close(cond, expected, **TOL)
    torch.testing.assert_close(cond.mean(), z.mean(), **TOL)
    assert not torch.allclose(cond, z, **TOL)


def test_comfy_weighting_interpolates_from_empty(tok):
    enc = ToyEncoder()
    prompt = "a ((red:1.5)) fox"   # ComfyUI: the explicit weight replaces the outer 1.1
    cond, _ = encode_prompt(enc, tok, prompt, weighting="comfy")
    z = enc(tok(["a red fox"]))[0]                                 # [77, C]
    z_empty = enc(tok([""]))[0]                                    # [77, C]
    red = 2                                                        # start, "a", "red"
    assert tok.decode(tok(["a red fox"])[0, red:red + 1]) == "red"
    expected = z.clone()
    expected[red] = (z[red] - z_empty[red]) * 1.5 + z_empty[red]
    torch.testing.assert_close(cond[0], expected, **TOL)
    others = torch.arange(77) != red
    assert torch.equal(cond[0, others], z[others])  # weight-1 tokens untouched


def test_long_prompt_chunks_are_concatenated(tok):
    enc = ToyEncoder()
    cond, uncond = encode_prompt(enc, tok, "cat " * 100, "blurry")
    assert cond.shape == uncond.shape == (1, 154, 8)
    cat = tok.encode("cat")[0]
    first = torch.tensor([[tok.bos_id] + [cat] * 75 + [tok.eos_id]])
    second = torch.tensor([tok.pad_row([cat] * 25)])
    torch.testing.assert_close(cond, torch.cat([enc(first), enc(second)], dim=1), rtol=0, atol=0)
    # The negative is padded with the empty prompt's encoding (A1111 empty_chunk).
    torch.testing.assert_close(uncond, torch.cat([enc(tok(["blurry"])), enc(tok([""]))], dim=1),
                               rtol=0, atol=0)


def test_longer_negative_pads_the_prompt(tok):
    enc = ToyEncoder()
    cond, uncond = encode_prompt(enc, tok, "a cat", "ugly " * 80)
    assert cond.shape == uncond.shape == (1, 154, 8)
    assert torch.equal(cond[:, 77:], enc(tok([""])))


def test_break_and_backtrack_reach_the_encoder(tok):
    enc = ToyEncoder()
    cond, _ = encode_prompt(enc, tok, "a cat BREAK a dog")
    assert torch.equal(cond, torch.cat([enc(tok(["a cat"])), enc(tok(["a dog"]))], dim=1))
    cond, _ = encode_prompt(enc, tok, "cat " * 70 + ", " + "dog " * 10)
    assert torch.equal(cond[:, :77], enc(tok(["cat " * 70 + ","])))
    assert torch.equal(cond[:, 77:], enc(tok(["dog " * 10])))


def test_batch_of_prompts(tok):
    enc = ToyEncoder()
    cond, uncond = encode_prompt(enc, tok, ["a cat", "cat " * 100], ["x", "y"])
    assert cond.shape == uncond.shape == (2, 154, 8)
    single, _ = encode_prompt(enc, tok, "cat " * 100)
    assert torch.equal(cond[1], single[0])
    assert torch.equal(cond[0, 77:], enc(tok([""]))[0])
    assert torch.equal(uncond[1, :77], enc(tok(["y"]))[0])
    with pytest.raises(ValueError, match="negative"):
        encode_prompt(enc, tok, ["a", "b"], ["x", "y", "z"])


def test_sd2_padding_reaches_encoder():
    enc = ToyEncoder()
    tok0 = get_tokenizer(pad_id=0)
    cond, _ = encode_prompt(enc, tok0, "a cat")
    assert torch.equal(cond, enc(tok0(["a cat"])))
    assert enc.calls[0][:, 4:].eq(0).all()


def test_low_precision_encoder_keeps_dtype(tok):
    enc = ToyEncoder(dtype=torch.bfloat16)
    cond, uncond = encode_prompt(enc, tok, "a (cat:1.2)", "dog")
    assert cond.dtype == uncond.dtype == torch.bfloat16


def test_unknown_weighting(tok):
    with pytest.raises(ValueError, match="a1111.*comfy"):
        encode_prompt(ToyEncoder(), tok, "a cat", weighting="compel")


def test_a1111_mean_is_restored_per_chunk(tok):
    enc = ToyEncoder()
    cond, _ = encode_prompt(enc, tok, "(cat:1.3) " * 75 + "dog " * 25)
    chunks = tokenize_prompt(tok, "(cat:1.3) " * 75 + "dog " * 25)
    assert [set(c.weights) for c in chunks] == [{1.0, 1.3}, {1.0}]
    raw = enc(torch.tensor([c.ids for c in chunks]))  # [2, 77, C]
    torch.testing.assert_close(cond[0, :77].mean(), raw[0].mean(), **TOL)
    assert torch.equal(cond[0, 77:], raw[1])  # all-1 chunk: unchanged
