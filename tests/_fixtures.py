"""Shared test fixtures that build reference artefacts from sdfast's shipped data."""
from sdfast.bench.arch import write_clip_tokenizer_dir

__all__ = ["write_clip_tokenizer_dir"]
