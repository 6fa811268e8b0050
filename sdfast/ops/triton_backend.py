"""Triton backend for sdfast's fused ops (kernels in `sdfast.kernels` / `kernels/`).

Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 (the Triton interpreter: slow,
for tests). Importing this module never imports Triton; `available()` checks it cheaply.
"""
import importlib.util
import os

import torch

from .checks import attention_shapes, group_norm_shapes, lora_shapes, tensors

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS_MAX = 256
GROUP_CHANNELS_MAX = 1024


def _interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


def available():
    """True when Triton is importable and can run here (a CUDA device, or the interpreter)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        return _interpret() or torch.cuda.is_available()
    except Exception:
        return False


def unavailable_reason():
    """Why `available()` is False (for the registry's messages)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if not (_interpret() or torch.cuda.is_available()):
        return "no CUDA device, and TRITON_INTERPRET=1 is not set for CPU tensors"
    return "available"


def _kernels():
    try:
        from sdfast.kernels import attention, group_norm, lora_merge
    except ImportError:  # source checkout: kernels/ is a top-level folder beside sdfast/
        from kernels import attention, group_norm, lora_merge
    return group_norm, attention, lora_merge


def _check_tensor(name, t):
    """None when `t` can go to a Triton kernel, else the reason."""
    if t.dtype not in DTYPES:
        return f"{name} dtype {t.dtype} is not fp32/fp16/bf16"
    if t.is_cuda:
        return None
    if t.device.type == "cpu" and _interpret():
        return None
    return f"{name} is on {t.device}; Triton needs CUDA (or TRITON_INTERPRET=1 for CPU tensors)"


def supports_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False, add=None):
    """True, or the reason the Triton GroupNorm cannot take these arguments."""
    if not available():
        return "Triton is not installed or has no CUDA device / interpreter"
    named = (("x", x), ("weight", weight), ("bias", bias), ("add", add))
    reason = tensors(_check_tensor, named) or group_norm_shapes(x, num_groups, add)
    if reason is True and x.shape[1] // num_groups > GROUP_CHANNELS_MAX:
        return f"more than {GROUP_CHANNELS_MAX} channels per group"
    return reason


def supports_attention(q, k, v):
    """True, or the reason the Triton attention cannot take these arguments."""
    if not available():
        return "Triton is not installed or has no CUDA device / interpreter"
    return (tensors(_check_tensor, (("q", q), ("k", k), ("v", v)))
            or attention_shapes(q, k, v, HEAD_DIMS_MAX))


def supports_lora_merge(weight, ups, downs, scales, base=None):
    """True, or the reason the Triton LoRA merge cannot take these arguments."""
    if not available():
        return "Triton is not installed or has no CUDA device / interpreter"
    if reason := _check_tensor("weight", weight):
        return reason
    return lora_shapes(weight, ups, downs, scales, DTYPES)


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, add=None):
    return _kernels()[0].group_norm(x, num_groups, weight, bias, eps=eps, silu=silu, add=add)


def attention(q, k, v):
    return _kernels()[1].attention(q, k, v)


def lora_merge_(weight, ups, downs, scales, base=None):
    if base is not None:          # (no fused form: the copy, then the merge in place)
        weight.copy_(base)
    return _kernels()[2].lora_merge_(weight, list(ups), list(downs), list(scales))


__all__ = ["available", "unavailable_reason", "group_norm", "attention", "lora_merge_", "supports_group_norm",
           "supports_attention", "supports_lora_merge"]
