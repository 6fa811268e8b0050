"""The one dispatch layer for sdfast's fused ops.

Models call these functions, never a kernel directly. Each checks its arguments (the same
rules for every backend), then runs the torch.library custom op `torch.ops.sdfast.<op>`,
whose registry (sdfast.ops.registry) picks the backend: `reference` (pure torch, always),
`cpu` (csrc/cpu via sdfast._C), `triton` (kernels/), `cuda` (csrc/cuda via sdfast._C_cuda).

While `torch.onnx.export` traces a model (`sdfast.export`), `group_norm` and `attention` run
their pure-torch reference inline instead of the custom op, so the exported graph holds standard
ONNX operators rather than opaque `sdfast::` nodes; the reference is the definition of correct,
so the graph computes what every backend computes.

Force a backend with the `backend=` argument, `with use_backend("cpu"):` or the environment
variable SDFAST_BACKEND (`cpu`, or per op: `attention=cpu,group_norm=reference`); forcing a
backend that is not available here, or that cannot run the arguments, raises SdfastError.
"""
import math

import torch

from sdfast.errors import SdfastError

from . import custom as _custom
from .reference import attention_ref, conv2d_ref, group_norm_ref, lora_merge_ref
from .registry import backends, forced_backend, register, use_backend

__all__ = ["group_norm", "attention", "lora_merge_", "conv2d", "backends", "use_backend",
           "register", "forced_backend", "group_norm_ref", "attention_ref", "lora_merge_ref",
           "conv2d_ref", "SdfastError"]


def _backend_arg(backend):
    if backend is not None and not isinstance(backend, str):
        raise SdfastError(f"backend must be a name or None, got {backend!r}")
    return backend or ""


def _exporting():
    """True while torch.onnx traces a model (see the module docstring)."""
    return torch.onnx.is_in_onnx_export()


def _autocast(device_type):
    """True inside an autocast region for this device type (devices without autocast, such as
    meta, never are)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, add=None, backend=None):
    """GroupNorm over `[B, C, *]` (contiguous or channels-last), optionally with `add`
    (`[B, C]`, or `[B, C, 1, 1]`) added before the norm and SiLU applied after it."""
    if x.dim() < 2:
        raise SdfastError(f"group_norm takes [B, C, *] input, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if num_groups <= 0 or c % num_groups:
        raise SdfastError(f"group_norm: {c} channels do not split into {num_groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise SdfastError(f"group_norm: {name} has shape {tuple(t.shape)}, expected ({c},)")
    if add is not None:
        if (add.dim() < 2 or add.shape[0] not in (1, x.shape[0]) or add.shape[1] != c
                or any(n != 1 for n in add.shape[2:])):
            raise SdfastError(f"group_norm: add has shape {tuple(add.shape)}, expected "
                              f"[{x.shape[0]}, {c}] (trailing 1s allowed)")
    if _exporting():
        return group_norm_ref(x, int(num_groups), weight, bias, float(eps), bool(silu), add)
    args = (x, int(num_groups), weight, bias, float(eps), bool(silu), add, _backend_arg(backend))
    if _custom.eager(x, weight, bias, add):
        return _custom.run_group_norm(*args)
    return torch.ops.sdfast.group_norm(*args)


def attention(q, k, v, backend=None):
    """Softmax attention of `[B, heads, N, D]` queries against `[B, heads, M, D]` keys and
    values with scale 1/sqrt(D). Returns `[B, heads, N, D]` laid out as `[B, N, heads, D]`."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise SdfastError("attention takes [B, heads, N, D] q and [B, heads, M, D] k, v; got "
                          f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1] or k.shape[2] != v.shape[2] or k.shape[:2] != v.shape[:2]:
        raise SdfastError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} do not match "
                          f"q {tuple(q.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise SdfastError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch "
                          "or heads")
    if _exporting():
        return attention_ref(q, k, v)
    if _custom.eager(q, k, v):
        return _custom.run_attention(q, k, v, _backend_arg(backend))
    return torch.ops.sdfast.attention(q, k, v, _backend_arg(backend))


def lora_merge_(weight, up, down, scale, backend=None, base=None):
    """In place `weight += scale * up @ down` with fp32 accumulation; returns `weight`.

    Linear: weight [O, I], up [O, r], down [r, I]. Conv: weight [O, I, kh, kw], up [O, r, 1, 1]
    (or [O, r]), down [r, I, kh, kw]. Lists for `up`, `down` and `scale` merge several LoRAs
    in one pass over the weight.

    Several weights in one pass: `weight` a list of weights and `up`, `down`, `scale` lists
    with one entry per weight (each entry as above: one LoRA or a list of them); returns the
    list. Backends with a batched form (cpu) then spread all the layers over their threads at
    once instead of one call per layer.

    `base` (a tensor of weight's shape, dtype and device, not sharing its memory; for a list of
    weights a list with one entry or None per weight): `weight = base + scale * up @ down`
    instead, base unchanged. The cpu backend reads base and writes weight in the one pass a
    merge in place takes (a copy of an original and the merge into it at the cost of the merge
    alone); the others copy base into weight first.
    """
    backend = _backend_arg(backend)
    if isinstance(weight, (list, tuple)):
        bases = [None] * len(weight) if base is None else list(base)
        if not len(weight) == len(up) == len(down) == len(scale) == len(bases):
            raise SdfastError(f"lora_merge_: {len(weight)} weights but {len(up)} ups, {len(down)} "
                              f"downs, {len(scale)} scales, {len(bases)} bases")
        calls = [c for c in map(_lora_args, weight, up, down, scale, bases) if c[0].numel()]
        if _custom.eager(*(t for w, ups, downs, _, b in calls for t in (w, *ups, *downs, b)
                           if t is not None)):
            _custom.run_lora_merge_layers(calls, backend)
        else:
            for w, ups, downs, scales, b in calls:
                torch.ops.sdfast.lora_merge(w, ups, downs, scales, backend, b)
        return weight
    weight, ups, downs, scales, base = _lora_args(weight, up, down, scale, base)
    if weight.numel() == 0:  # nothing to merge
        return weight
    if _custom.eager(weight, *ups, *downs, *(() if base is None else (base,))):
        _custom.run_lora_merge(weight, ups, downs, scales, backend, base)
    else:
        torch.ops.sdfast.lora_merge(weight, ups, downs, scales, backend, base)
    return weight


def _lora_args(weight, up, down, scale, base=None):
    """One weight's checked (weight, ups, downs, scales, base), the LoRAs as lists."""
    ups, downs, scales = (list(a) if isinstance(a, (list, tuple)) else [a]
                          for a in (up, down, scale))
    if not len(ups) == len(downs) == len(scales):
        raise SdfastError(f"lora_merge_: {len(ups)} ups, {len(downs)} downs, {len(scales)} scales")
    if weight.dim() < 2:
        raise SdfastError(f"lora_merge_: weight must be [O, I] or [O, I, kh, kw], got {tuple(weight.shape)}")
    o, inner = weight.shape[0], math.prod(weight.shape[1:])
    for u, d in zip(ups, downs):
        r = d.shape[0]
        if u.shape[0] != o or math.prod(u.shape[1:]) != r or math.prod(d.shape[1:]) != inner:
            raise SdfastError(f"lora_merge_: up {tuple(u.shape)} @ down {tuple(d.shape)} does not "
                              f"give weight {tuple(weight.shape)}")
    if base is not None:
        if (base.shape, base.dtype, base.device) != (weight.shape, weight.dtype, weight.device):
            raise SdfastError(f"lora_merge_: base is {tuple(base.shape)} {base.dtype} on {base.device}, "
                              f"weight {tuple(weight.shape)} {weight.dtype} on {weight.device}: "
                              f"they must match")
        if base.numel() and base.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
            if base.data_ptr() != weight.data_ptr() or base.stride() != weight.stride():
                raise SdfastError("lora_merge_: base shares memory with weight (pass base=None "
                                  "to merge in place)")
            base = None                   # the weight itself: in place
    return weight, ups, downs, [float(s) for s in scales], base


def _pair(v, name):
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(n, int) and n >= 0 for n in pair):
        raise SdfastError(f"conv2d: {name} must be an int or two ints >= 0, got {v!r}")
    return [int(n) for n in pair]


def conv2d(x, weight, bias=None, stride=1, padding=0, add=None, backend=None):
    """`F.conv2d(x, weight, bias, stride, padding)` plus `add` (a tensor of the output's shape,
    e.g. a residual: fused into the conv's epilogue where the backend can). Groups and dilation
    are 1. The output is channels-last when `x` is, as F.conv2d's. The cpu backend runs 3x3
    stride-1 padding-1 convolutions by Winograd F(4x4, 3x3) (csrc/cpu/winograd.cpp)."""
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if stride[0] == 0 or stride[1] == 0:
        raise SdfastError(f"conv2d: stride must be positive, got {stride}")
    if x.dim() != 4 or weight.dim() != 4:
        raise SdfastError(f"conv2d takes [B, C, H, W] input and [O, C, kh, kw] weight, got "
                          f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise SdfastError(f"conv2d: weight {tuple(weight.shape)} expects {weight.shape[1]} input "
                          f"channels, x has {x.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise SdfastError(f"conv2d: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    out_hw = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[2:], padding, weight.shape[2:], stride)]
    if min(out_hw) < 1:
        raise SdfastError(f"conv2d: a {tuple(weight.shape[2:])} kernel does not fit input "
                          f"{tuple(x.shape[2:])} with padding {padding}")
    if add is not None and tuple(add.shape) != (x.shape[0], weight.shape[0], *out_hw):
        raise SdfastError(f"conv2d: add has shape {tuple(add.shape)}, expected the output's "
                          f"{(x.shape[0], weight.shape[0], *out_hw)}")
    if _exporting() or _autocast(x.device.type):
        # ONNX graphs hold the plain convolution; under autocast (mixed-precision training)
        # torch's convolution casts its inputs to the autocast dtype, a custom op would not.
        return conv2d_ref(x, weight, bias, stride, padding, add)
    args = (x, weight, bias, stride, padding, add, _backend_arg(backend))
    if _custom.eager(x, weight, bias, add):
        return _custom.run_conv2d(*args)
    return torch.ops.sdfast.conv2d(*args)
