"""Evaluation: how well generated images follow their prompts (shapes dataset analyser)."""
from .analyser import Analysis, analyse, parse_caption, score

__all__ = ["Analysis", "analyse", "parse_caption", "score"]
