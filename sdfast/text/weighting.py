"""Encode prompts chunk by chunk and apply emphasis weights to the text-encoder output.

Sources:
  "a1111": AUTOMATIC1111 `modules/sd_emphasis.py` `EmphasisOriginal` (the default emphasis):
    z = z * w, then z is rescaled so its mean equals the mean before weighting. A1111 takes that
    mean over the tensor it encodes at once, which is one chunk of one prompt; so it is per
    chunk here. Uncond/cond of different lengths are padded with the encoding of the empty chunk
    (A1111 `forward`: `empty_chunk()` for prompts with fewer chunks).
  "comfy": ComfyUI `comfy/sd1_clip.py` `ClipTokenWeightEncoder.encode_token_weights`:
    z = (z - z_empty) * w + z_empty at tokens whose weight is not 1, where z_empty is the
    encoding of the empty chunk at the same position. Prompts are parsed and chunked with
    ComfyUI's syntax. (ComfyUI itself leaves cond and uncond lengths unequal and repeats them
    in the sampler; here they are padded as for "a1111", so one batch carries both.)

Weights are applied in float32 and the result is cast back to the encoder's dtype.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .chunks import Chunk, empty_chunk, tokenize_prompt
from .tokenizer import CLIPTokenizer

WEIGHTINGS = ("a1111", "comfy")  # each also names the prompt syntax it parses

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


def encode_prompt(encode_fn: EncodeFn, tokenizer: CLIPTokenizer, prompt: str | Sequence[str],
                  negative_prompt: str | Sequence[str] = "",
                  weighting: str = "a1111", embeddings=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted text conditioning `(cond, uncond)`, each `[B, 77 * K, C]`.

    `encode_fn(ids: LongTensor[n, 77]) -> FloatTensor[n, 77, C]` is the text encoder with clip
    skip already applied. `prompt` is one string (B = 1) or a list of B strings;
    `negative_prompt` is one string for all, or a list of the same length. Every row is padded
    with empty-chunk encodings to the longest chunk count K among prompts and negatives.
    All chunks of the call go through `encode_fn` in one batch (identical chunks once).

    `embeddings` (an `EmbeddingLookup` or `{name: vectors}`) enables textual inversion; chunks
    that hold embeddings are encoded with `encode_fn(ids, fixes)`, `fixes[i]` the
    `(offset, vector [1, C])` list of row i (see `sdfast.text.chunks`).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    prompts, negatives = _as_batch(prompt, negative_prompt)
    chunked = {t: tokenize_prompt(tokenizer, t, syntax=weighting, embeddings=embeddings)
               for t in dict.fromkeys([*prompts, *negatives])}
    n_chunks = max(len(c) for c in chunked.values())
    empty = empty_chunk(tokenizer)
    every = [empty, *(c for chunks in chunked.values() for c in chunks)]
    z = _weighted_encodings(encode_fn, every, weighting)  # [1 + M, 77, C]

    offsets, start = {}, 1
    for text, chunks in chunked.items():
        offsets[text] = start
        start += len(chunks)

    def sequence(text: str) -> torch.Tensor:
        own = z[offsets[text]:offsets[text] + len(chunked[text])]  # [k, 77, C]
        pad = z[:1].expand(n_chunks - own.shape[0], -1, -1)          # [K - k, 77, C]
        return torch.cat([own, pad]).flatten(0, 1)                    # [K * 77, C]

    cond = torch.stack([sequence(t) for t in prompts])      # [B, 77 * K, C]
    uncond = torch.stack([sequence(t) for t in negatives])  # [B, 77 * K, C]
    return cond, uncond


def _as_batch(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    if not prompts:
        raise ValueError("encode_prompt needs at least one prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    return prompts, negatives


def _weighted_encodings(encode_fn: EncodeFn, chunks: list[Chunk], weighting: str) -> torch.Tensor:
    """Encode `chunks` (chunks[0] is the empty chunk) and apply their weights: `[n, 77, C]`."""
    # Equal ids and equal embedding placements (the same vectors) mean equal encodings.
    rows: dict[tuple, int] = {}
    fixes: list[list] = []
    index = []
    for c in chunks:
        key = (tuple(c.ids), tuple((offset, id(vector)) for offset, vector in c.fixes))
        if key not in rows:
            rows[key] = len(rows)
            fixes.append(list(c.fixes))
        index.append(rows[key])
    ids = torch.tensor([key[0] for key in rows], dtype=torch.long)  # [u, 77]
    z_unique = encode_fn(ids, fixes) if any(fixes) else encode_fn(ids)  # [u, 77, C]
    if z_unique.dim() != 3 or z_unique.shape[:2] != ids.shape:
        raise ValueError(f"encode_fn must map ids {tuple(ids.shape)} to [n, 77, C]; "
                         f"got {tuple(z_unique.shape)}")
    z = z_unique[torch.tensor(index, device=z_unique.device)].float()  # [n, 77, C]
    w = torch.tensor([c.weights for c in chunks], dtype=torch.float32, device=z.device)  # [n, 77]
    if weighting == "a1111":
        out = emphasis_a1111(z, w)
    else:
        out = emphasis_comfy(z, w, z[0])
    return out.to(z_unique.dtype)


def emphasis_a1111(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis per chunk: scale tokens by w, restore each chunk's mean.

    z: [n, T, C], w: [n, T]. Chunks whose weights are all 1 are returned unchanged.
    """
    scaled = z * w.unsqueeze(-1)  # [n, T, C]
    ratio = z.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True)  # [n, 1, 1]
    plain = (w == 1).all(dim=1).view(-1, 1, 1)  # [n, 1, 1]
    return torch.where(plain, z, scaled * ratio)


def emphasis_comfy(z: torch.Tensor, w: torch.Tensor, z_empty: torch.Tensor) -> torch.Tensor:
    """ComfyUI emphasis: move weighted tokens away from the empty prompt's encoding.

    z: [n, T, C], w: [n, T], z_empty: [T, C] (the empty chunk's encoding).
    """
    w = w.unsqueeze(-1)  # [n, T, 1]
    return torch.where(w != 1, (z - z_empty) * w + z_empty, z)
