"""CUDA backend for sdfast's fused ops: the torch-free kernels of `sdfast._C_cuda` (csrc/cuda/).

This module is the boundary: it checks arguments, turns tensors into pointers, sizes, strides,
a dtype tag and the current stream, and calls the extension. Importing it never imports
`_C_cuda`; `available()` checks it cheaply.
"""
import functools
import importlib

import torch

from .checks import attention_shapes, group_norm_shapes, lora_shapes, tensors

DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_HEAD_DIM = 160  # csrc/cuda/kernels.h kMaxHeadDim


@functools.lru_cache(maxsize=1)
def _ext():
    return importlib.import_module("sdfast._C_cuda")


def available():
    """True when sdfast._C_cuda loads and a CUDA device is present."""
    try:
        if not torch.cuda.is_available():
            return False
        _ext()
        return True
    except Exception:
        return False


def unavailable_reason():
    """Why `available()` is False (for the registry's messages)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        _ext()
    except Exception as err:
        return f"sdfast._C_cuda does not load ({type(err).__name__}: {err}); build with nvcc present"
    return "available"


def _check_tensor(name, t):
    if not t.is_cuda:
        return f"{name} is on {t.device}, not CUDA"
    if t.dtype not in DTYPE_TAGS:
        return f"{name} dtype {t.dtype} is not fp32/fp16/bf16"
    return None


def _spatial_stride(x):
    """The element stride of x's flattened spatial axis, or None if it does not flatten."""
    if x.dim() == 3:
        return x.stride(2)
    h, w = x.shape[2], x.shape[3]
    if h == 1:
        return x.stride(3)
    if w == 1:
        return x.stride(2)
    return x.stride(3) if x.stride(2) == w * x.stride(3) else None


def supports_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False, add=None):
    """True, or the reason the CUDA GroupNorm cannot take these arguments."""
    if not available():
        return "sdfast._C_cuda is not built or no CUDA device is present"
    def same_dtype(name, t):
        return _check_tensor(name, t) or (f"{name} dtype {t.dtype} differs from x dtype {x.dtype}"
                                          if t.dtype != x.dtype else None)

    named = (("x", x), ("weight", weight), ("bias", bias), ("add", add))
    return tensors(same_dtype, named) or group_norm_shapes(x, num_groups, add)


def supports_attention(q, k, v):
    """True, or the reason the CUDA attention cannot take these arguments."""
    if not available():
        return "sdfast._C_cuda is not built or no CUDA device is present"
    return (tensors(_check_tensor, (("q", q), ("k", k), ("v", v)))
            or attention_shapes(q, k, v, MAX_HEAD_DIM))


def supports_lora_merge(weight, ups, downs, scales, base=None):
    """True, or the reason the CUDA LoRA merge cannot take these arguments."""
    if not available():
        return "sdfast._C_cuda is not built or no CUDA device is present"
    if reason := _check_tensor("weight", weight):
        return reason
    if weight.dim() in (2, 4) and weight.shape[0] > 65535:
        return "more than 65535 output rows"
    return lora_shapes(weight, ups, downs, scales)


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream


def _require(ok):
    if ok is not True:
        raise ValueError(f"cuda backend: {ok}")


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, add=None):
    _require(supports_group_norm(x, num_groups, weight, bias, eps, silu, add))
    B, C = x.shape[:2]
    if _spatial_stride(x) is None:
        x = x.contiguous()
    y = torch.empty_like(x)
    if y.stride() != x.stride():
        x = x.contiguous()
        y = torch.empty_like(x)
    weight = torch.ones(C, device=x.device, dtype=x.dtype) if weight is None else weight.contiguous()
    bias = torch.zeros(C, device=x.device, dtype=x.dtype) if bias is None else bias.contiguous()
    add2 = add.reshape(B, C) if add is not None else None
    with torch.cuda.device(x.device):
        _ext().group_norm(
            x.data_ptr(), y.data_ptr(), weight.data_ptr(), bias.data_ptr(),
            add2.data_ptr() if add2 is not None else 0, B, C, x[0, 0].numel(), num_groups,
            x.stride(0), x.stride(1), _spatial_stride(x),
            add2.stride(0) if add2 is not None else 0, add2.stride(1) if add2 is not None else 0,
            float(eps), add2 is not None, bool(silu), DTYPE_TAGS[x.dtype], _stream(x))
    return y


def attention(q, k, v):
    _require(supports_attention(q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, N, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    with torch.cuda.device(q.device):
        _ext().attention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), B, H, N, k.shape[2], D,
            list(q.stride()[:3]), list(k.stride()[:3]), list(v.stride()[:3]), list(o.stride()[:3]),
            DTYPE_TAGS[q.dtype], _stream(q))
    return o


def lora_merge_(weight, ups, downs, scales, base=None):
    ups, downs, scales = list(ups), list(downs), list(scales)
    _require(supports_lora_merge(weight, ups, downs, scales))
    if base is not None:          # (no fused form: the copy, then the merge in place)
        weight.copy_(base)
    if not ups:
        return weight
    O = weight.shape[0]
    U = torch.cat([u.reshape(O, -1).float() for u in ups], dim=1).contiguous()    # [O, R]
    DN = torch.cat([d.reshape(d.shape[0], -1).float() for d in downs], dim=0)    # [R, I]
    scale = torch.cat([torch.full((u.reshape(O, -1).shape[1],), float(s), dtype=torch.float32)
                       for u, s in zip(ups, scales)]).to(weight.device)
    w2 = weight.view(O, -1)
    with torch.cuda.device(weight.device):
        _ext().lora_merge(w2.data_ptr(), U.data_ptr(), DN.data_ptr(), scale.data_ptr(),
                          O, w2.shape[1], U.shape[1], w2.stride(0), DTYPE_TAGS[weight.dtype],
                          _stream(weight))
    return weight


__all__ = ["available", "unavailable_reason", "group_norm", "attention", "lora_merge_", "supports_group_norm",
           "supports_attention", "supports_lora_merge"]
