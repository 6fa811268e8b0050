"""CLIP byte-level BPE tokenizer, built in memory from OpenAI's shipped merge list.

Source of the format: OpenAI CLIP, `clip/simple_tokenizer.py` and `clip/bpe_simple_vocab_16e6.txt.gz`
(MIT, see data/LICENSE.openai-clip). The vocabulary is not stored: it is derived from the merge
list exactly as CLIP derives it:

    ids 0..255      the 256 byte symbols, in GPT-2's byte-to-unicode order
    ids 256..511    the same symbols with the end-of-word suffix "</w>"
    ids 512..49405  one token per merge (the two halves concatenated), in merge order
    49406, 49407    <|startoftext|>, <|endoftext|>

Text handling follows the reference tokenizers that Stable Diffusion front ends use
(transformers' fast CLIPTokenizer): NFC, whitespace runs collapsed to one space, lower case,
CLIP's pre-tokenizer regex, byte-level symbols, "</w>" closing each word. OpenAI's own Python
tokenizer additionally runs ftfy and html.unescape; that only matters for mojibake and HTML
entities and is not done here (neither diffusers nor A1111 nor ComfyUI do it either).

The BPE itself runs in the `tokenizers` library (Rust); nothing is written to disk.
"""
from __future__ import annotations

import functools
import gzip
from importlib import resources
from typing import Iterable, Sequence

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the 262144 in the file
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77

# CLIP's pre-tokenizer (simple_tokenizer.py): special tokens, English contractions, letter runs,
# single digits, runs of anything that is neither space, letter nor digit.
CLIP_SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                      r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def _byte_order() -> tuple[list[int], list[int]]:
    """Byte values split as CLIP orders them: printable non-space Latin-1 first, then the rest."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    keep = set(printable)
    return printable, [b for b in range(256) if b not in keep]


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, indexed by byte value (GPT-2 / CLIP convention).

    Printable bytes stand for themselves; the other 68 get code points 256, 257, ... in byte order.
    """
    printable, others = _byte_order()
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def load_merges() -> list[tuple[str, str]]:
    """The merge list CLIP uses, read from the shipped gzip (first line is a version header)."""
    raw = resources.files(__package__).joinpath("data", BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{BPE_FILE} is damaged: expected {NUM_MERGES} merge pairs")
    return merges


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, derived from the merges in CLIP's order (see module docstring)."""
    printable, others = _byte_order()
    symbols = byte_symbols()
    base = [symbols[b] for b in printable + others]
    tokens = base + [s + END_OF_WORD for s in base] + [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


@functools.lru_cache(maxsize=1)
def _backend() -> Tokenizer:
    """One Rust tokenizer per process, shared by every CLIPTokenizer (it is stateless)."""
    merges = load_merges()
    vocab = build_vocab(merges)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=EOS_TOKEN, dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD,
                        fuse_unk=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Written literally in a prompt, the special tokens map to their ids (as in transformers).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (BOS_TOKEN, EOS_TOKEN)])
    return tok


class CLIPTokenizer:
    """CLIP's BPE tokenizer with fixed-length batching for Stable Diffusion text encoders.

    `pad_id` is what fills a sequence after its end token: the end token itself for SD1's
    OpenAI CLIP (the default), 0 for SD2's OpenCLIP.
    """

    vocab_size = 49408
    bos_id = 49406
    eos_id = 49407
    max_length = MAX_LENGTH

    def __init__(self, pad_id: int | None = None):
        self._tok = _backend()
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be a token id in [0, {self.vocab_size}), got {pad_id}")
        self.comma_id = self.token_to_id("," + END_OF_WORD)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: no start/end tokens, no truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` for many texts in one call into the Rust tokenizer."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Fixed-length ids `[n, 77]`: start + ids + end + padding, cut so the end token stays."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.pad_row(ids[:self.max_length - 2]) for ids in self.encode_batch(texts)]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def pad_row(self, ids: Sequence[int]) -> list[int]:
        """start + `ids` + end, then `pad_id` up to `max_length` (`ids` must fit)."""
        if len(ids) > self.max_length - 2:
            raise ValueError(f"{len(ids)} tokens do not fit in {self.max_length} with start/end")
        row = [self.bos_id, *ids, self.eos_id]
        return row + [self.pad_id] * (self.max_length - len(row))

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (e.g. "cat</w>"), or None if absent."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id, or None if out of range."""
        return self._tok.id_to_token(int(token_id))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: byte symbols back to UTF-8, each "</w>" read as a space."""
        ids = [int(i) for i in ids]
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()


@functools.lru_cache(maxsize=None)
def get_tokenizer(pad_id: int | None = None) -> CLIPTokenizer:
    """Cached CLIPTokenizer: `pad_id=None` pads with the end token (SD1), `pad_id=0` for SD2."""
    return CLIPTokenizer(pad_id)
