"""Long prompts as 77-token chunks (start + 75 + end), each token carrying its emphasis weight.

Sources:
  syntax="a1111": AUTOMATIC1111 `modules/sd_hijack_clip.py`, `tokenize_line` / `empty_chunk` /
    `process_tokens`. Each parsed piece is tokenized on its own; chunks hold 75 tokens; "BREAK"
    closes the current chunk; when a chunk is full and a comma sits within the last
    `comma_backtrack` (A1111 default 20) tokens, the chunk ends after that comma and the tokens
    behind it move to the next chunk. A chunk is padded with `tokenizer.pad_id` after its end
    token (A1111 pads with the end token and, for SD2, rewrites everything after the first end
    token to the pad id: the same ids). An empty prompt is one chunk.
  syntax="comfy": ComfyUI `comfy/sd1_clip.py`, `SDTokenizer.tokenize_with_weights`. Each
    weighted piece (split again before every whitespace-preceded "embedding:") is one token
    group; a group shorter than 8 tokens that does not fit is moved whole to the next chunk,
    a longer one is split. No BREAK, no comma backtrack. (Older ComfyUI versions made one group
    per space-separated word; this follows the current one.)

Textual inversion: `tokenize_prompt(..., embeddings=...)` takes an
`sdfast.addons.embeddings.EmbeddingLookup` (or a `{name: [n, C] tensor}` mapping). A1111 syntax:
an embedding's name is matched on token ids anywhere in a piece (longest name first), and its n
vectors take n places in the chunk, starting a new chunk when they do not fit (A1111's
`tokenize_line`). ComfyUI syntax: `embedding:name` (with ComfyUI's retry on shorter names, the
rest read as text); its vectors form one token group. An unknown `embedding:name` is an error
when a lookup is given. `Chunk.fixes` lists `(offset, vectors [1, C])` per embedding row, where
`offset` is the position inside the 75 content tokens (A1111's `PromptChunkFix`); the row's id
is 0, a placeholder the encoder replaces with the vector.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .prompt import parse_prompt_attention
from .tokenizer import CLIPTokenizer

DEFAULT_COMMA_BACKTRACK = 20   # A1111 `opts.comma_padding_backtrack` default
COMFY_MAX_WORD_LENGTH = 8      # ComfyUI `SDTokenizer.max_word_length`
_COMFY_EMBEDDING_SPLIT = re.compile(r"(?<=\s)embedding:")


@dataclass
class Chunk:
    """One text-encoder input: `ids` and `weights` are both `tokenizer.max_length` long.

    `weights` is 1.0 at the start, end and pad positions. `fixes` holds `(offset, vector)`
    textual-inversion placements (`vector` [1, C]; offset 0 is the first content token).
    """

    ids: list[int]
    weights: list[float]
    fixes: list[tuple[int, Any]] = field(default_factory=list)


class EmbeddingRow:
    """One embedding vector standing in a token list (becomes id 0 plus a fix)."""

    __slots__ = ("vector",)

    def __init__(self, vector):
        self.vector = vector          # [1, C]


PLACEHOLDER_ID = 0


def finish_chunk(tokenizer: CLIPTokenizer, ids: Sequence, weights: Sequence[float],
                 fixes: Sequence[tuple[int, Any]] = ()) -> Chunk:
    """start + ids + end + pad, with weight 1.0 on every added position. `EmbeddingRow`s in
    `ids` become placeholder ids and fixes."""
    fixes = list(fixes)
    plain = []
    for offset, token in enumerate(ids):
        if isinstance(token, EmbeddingRow):
            fixes.append((offset, token.vector))
            token = PLACEHOLDER_ID
        plain.append(token)
    row = tokenizer.pad_row(plain)
    pad = len(row) - len(plain) - 2
    return Chunk(row, [1.0, *map(float, weights), 1.0] + [1.0] * pad, fixes)


def _as_lookup(tokenizer, embeddings):
    if embeddings is None:
        return None
    from sdfast.addons.embeddings import Embedding, EmbeddingLookup

    if isinstance(embeddings, EmbeddingLookup):
        return embeddings
    return EmbeddingLookup(tokenizer, [Embedding(name, vectors.reshape(-1, vectors.shape[-1]))
                                       for name, vectors in embeddings.items()])


def _rows(embedding):
    return [EmbeddingRow(embedding.vectors[i:i + 1]) for i in range(embedding.vectors.shape[0])]


def empty_chunk(tokenizer: CLIPTokenizer) -> Chunk:
    """The chunk of an empty prompt (A1111's `empty_chunk`, ComfyUI's `gen_empty_tokens`)."""
    return finish_chunk(tokenizer, [], [])


def tokenize_prompt(tokenizer: CLIPTokenizer, text: str, syntax: str = "a1111",
                    embeddings: Mapping[str, Any] | None = None,
                    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK) -> list[Chunk]:
    """Parse `text` in `syntax` and lay it out in chunks (see module docstring).

    `comma_backtrack` only applies to syntax="a1111" (0 disables it).
    """
    lookup = _as_lookup(tokenizer, embeddings)
    pairs = parse_prompt_attention(text, syntax)
    if syntax == "a1111":
        if comma_backtrack < 0:
            raise ValueError(f"comma_backtrack must be >= 0, got {comma_backtrack}")
        return _a1111_chunks(tokenizer, pairs, comma_backtrack, lookup)
    return _comfy_chunks(tokenizer, pairs, lookup)


class _A1111Layout:
    """State of A1111's `tokenize_line`: the open chunk and its last comma position."""

    def __init__(self, tokenizer: CLIPTokenizer, comma_backtrack: int):
        self.tok = tokenizer
        self.size = tokenizer.max_length - 2
        self.backtrack = comma_backtrack
        self.chunks: list[Chunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1

    def close(self) -> None:
        self.chunks.append(finish_chunk(self.tok, self.ids, self.weights))
        self.ids, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float) -> None:
        self._make_room(token)
        self.ids.append(token)
        self.weights.append(weight)

    def add_embedding(self, token: int, rows: list, weight: float) -> None:
        """An embedding whose name starts with `token`: its rows stay in one chunk."""
        self._make_room(token)
        if len(self.ids) + len(rows) > self.size:
            self.close()
        self.ids += rows
        self.weights += [weight] * len(rows)

    def _make_room(self, token: int) -> None:
        if token == self.tok.comma_id:
            self.last_comma = len(self.ids)
        elif self._backtrack_applies():
            cut = self.last_comma + 1
            moved_ids, moved_weights = self.ids[cut:], self.weights[cut:]
            del self.ids[cut:], self.weights[cut:]
            self.close()
            self.ids, self.weights = moved_ids, moved_weights
        if len(self.ids) == self.size:
            self.close()

    def _backtrack_applies(self) -> bool:
        return (self.backtrack > 0 and len(self.ids) == self.size and self.last_comma != -1
                and len(self.ids) - self.last_comma <= self.backtrack)


def _a1111_chunks(tokenizer: CLIPTokenizer, pairs: list[list],
                  comma_backtrack: int, lookup=None) -> list[Chunk]:
    layout = _A1111Layout(tokenizer, comma_backtrack)
    for (text, weight), ids in zip(pairs, tokenizer.encode_batch(t for t, _ in pairs)):
        if text == "BREAK" and weight == -1:
            layout.close()
            continue
        position = 0
        while position < len(ids):
            found = lookup.match(ids, position) if lookup else None
            if found is None:
                layout.add(ids[position], weight)
                position += 1
            else:                               # A1111: find_embedding_at_position
                embedding, used = found
                layout.add_embedding(ids[position], _rows(embedding), weight)
                position += used
    if layout.ids or not layout.chunks:
        layout.close()
    return layout.chunks


def _comfy_embedding(lookup, part):
    """`(Embedding, leftover text)` for a piece "embedding:name rest" (ComfyUI's
    `_try_get_embedding`: a name not found is retried without its last character, the cut
    characters going back to the text)."""
    body = part[len("embedding:"):]
    word, space, rest = body.partition(" ")
    name = word.strip("\n")
    for cut in range(len(name), 0, -1):
        embedding = lookup.get(name[:cut])
        if embedding is not None:
            return embedding, name[cut:] + space + rest
    from sdfast.errors import SdfastError

    raise SdfastError(f"unknown embedding {name!r} (embedding:{name}); load it or put it in "
                      "the embeddings folder")


def _comfy_groups(tokenizer: CLIPTokenizer, pairs: list[list], lookup=None) -> list[tuple[list, float]]:
    """ComfyUI's token groups: one per weighted piece, split before each "embedding:" word."""
    pieces: list[tuple[Any, float]] = []
    for text, weight in pairs:
        first, *rest = _COMFY_EMBEDDING_SPLIT.split(text)
        parts = [first] + ["embedding:" + r for r in rest]
        for part in parts:
            if lookup is not None and part.startswith("embedding:"):
                embedding, leftover = _comfy_embedding(lookup, part)
                pieces.append((_rows(embedding), weight))
                part = leftover
            # Without a lookup, ComfyUI tokenizes "embedding:name" as text.
            if part:
                pieces.append((part, weight))
    texts = [p for p, _ in pieces if isinstance(p, str)]
    encoded = iter(tokenizer.encode_batch(texts))
    return [(next(encoded) if isinstance(p, str) else p, weight) for p, weight in pieces]


def _comfy_chunks(tokenizer: CLIPTokenizer, pairs: list[list], lookup=None) -> list[Chunk]:
    size = tokenizer.max_length - 2
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    for group, weight in _comfy_groups(tokenizer, pairs, lookup):
        splittable = len(group) >= COMFY_MAX_WORD_LENGTH
        while group:
            room = size - len(ids)
            if len(group) <= room:
                ids += group
                weights += [weight] * len(group)
                break
            if splittable:
                ids += group[:room]
                weights += [weight] * room
                group = group[room:]
            chunks.append(finish_chunk(tokenizer, ids, weights))
            ids, weights = [], []
    chunks.append(finish_chunk(tokenizer, ids, weights))
    return chunks
