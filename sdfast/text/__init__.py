"""Text front end: CLIP BPE tokenizer (vocab shipped as package data), prompt emphasis syntax
(A1111 and ComfyUI dialects), long-prompt chunking and weighted encoding.

    tok = get_tokenizer()                      # SD1; get_tokenizer(pad_id=0) for SD2
    cond, uncond = encode_prompt(text_encoder, tok, "a (red:1.2) fox", "blurry")
"""
from .chunks import Chunk, empty_chunk, finish_chunk, tokenize_prompt
from .prompt import SYNTAXES, parse_prompt_attention
from .tokenizer import CLIPTokenizer, get_tokenizer
from .weighting import WEIGHTINGS, emphasis_a1111, emphasis_comfy, encode_prompt

__all__ = [
    "CLIPTokenizer", "get_tokenizer",
    "SYNTAXES", "parse_prompt_attention",
    "Chunk", "empty_chunk", "finish_chunk", "tokenize_prompt",
    "WEIGHTINGS", "encode_prompt", "emphasis_a1111", "emphasis_comfy",
]
