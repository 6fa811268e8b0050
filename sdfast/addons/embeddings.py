"""Textual-inversion embeddings: reading every common file format, and the name lookup the
prompt tokenizer uses (`sdfast.text.chunks`).

Formats (`read_embedding`):
- A1111 `.pt`: `{"string_to_param": {"*": [n, C]}, "name": ..., ...}` (weights-only unpickling);
- A1111 `.safetensors`: `{"emb_params": [n, C]}`;
- diffusers `learned_embeds.bin` / `.safetensors`: `{token: [C] or [n, C]}`;
- SD2 embeddings are the same with C = 1024; SDXL ones (`clip_l` / `clip_g`) are refused.
"""
import os
from dataclasses import dataclass

import torch

from sdfast.errors import SdfastError

EMBEDDING_EXTS = (".pt", ".safetensors", ".bin")
# Vectors one embedding may have: the 75 tokens of a prompt chunk (A1111 and ComfyUI place an
# embedding whole in one chunk).
MAX_VECTORS = 75


@dataclass
class Embedding:
    """`vectors` `[n, C]` (float32, CPU) triggered by `name`; `token` is the diffusers file's
    own token (e.g. "<cat-toy>"), also a trigger, when the file has one."""

    name: str
    vectors: torch.Tensor
    path: str | None = None
    token: str | None = None


def _read(path):
    from sdfast.io.checkpoint import _safe_globals

    lower = path.lower()
    if lower.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:
            raise SdfastError(f"{path}: not a readable safetensors file ({exc})") from None
    import zipfile

    with open(path, "rb") as fh:
        head = fh.read(1)
    if head != b"\x80" and not zipfile.is_zipfile(path):
        raise SdfastError(f"{path}: not an embedding file (neither safetensors nor a torch "
                          ".pt/.bin)")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdfastError(f"{path}: not a readable embedding file ({first})") from None


def read_embedding(path, name=None):
    """An `Embedding` from a file (formats in the module docstring). `name` defaults to the
    file name without extension (A1111's trigger)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SdfastError(f"{path}: no such embedding file")
    data = _read(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    token = None
    if not isinstance(data, dict):
        raise SdfastError(f"{path}: not an embedding (expected a dict, found {type(data).__name__})")
    if "clip_l" in data or "clip_g" in data:
        raise SdfastError(f"{path}: an SDXL embedding (clip_l/clip_g); the model is SD1.x/SD2.x")
    if isinstance(data.get("string_to_param"), dict):
        params = list(data["string_to_param"].values())
        vectors = params[0] if params else None
    elif "emb_params" in data:
        vectors = data["emb_params"]
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise SdfastError(f"{path}: not an embedding (no string_to_param / emb_params, and "
                              f"{len(tensors)} tensors instead of one token)")
        token, vectors = next(iter(tensors.items()))
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or not vectors.is_floating_point():
        raise SdfastError(f"{path}: the embedding's vectors are not a [n, C] float tensor")
    vectors = vectors.detach().float().reshape(-1, vectors.shape[-1]).clone()
    if not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise SdfastError(f"{path}: the embedding has {vectors.shape[0]} vectors; a prompt chunk "
                          f"holds 1 to {MAX_VECTORS}")
    if not torch.isfinite(vectors).all():
        raise SdfastError(f"{path}: the embedding's vectors hold NaN or infinite values")
    return Embedding(name or stem, vectors, path, token)


class EmbeddingLookup:
    """Name -> Embedding for the tokenizer: A1111 matches a name's token ids anywhere in a
    prompt piece (longest first); ComfyUI looks names up after `embedding:`."""

    def __init__(self, tokenizer, embeddings):
        self.embeddings = {}
        self._by_first = {}
        for emb in embeddings:
            for name in {emb.name, emb.token} - {None}:
                self.embeddings[name] = emb
                ids = tuple(tokenizer.encode(name))
                if ids:
                    self._by_first.setdefault(ids[0], []).append((ids, emb))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)

    def __bool__(self):
        return bool(self.embeddings)

    def match(self, ids, position):
        """`(Embedding, tokens used)` when an embedding's name starts at `ids[position]`."""
        for name_ids, emb in self._by_first.get(ids[position], ()):
            if tuple(ids[position:position + len(name_ids)]) == name_ids:
                return emb, len(name_ids)
        return None

    def get(self, name):
        return self.embeddings.get(name)


__all__ = ["Embedding", "EmbeddingLookup", "read_embedding", "EMBEDDING_EXTS"]
