"""The `cpu` backend: csrc/cpu (OpenMP, fp32; AVX2 and AVX-512 builds, the best the CPU has at
run time) through the torch-free module sdfast._C.

This file is the boundary: it checks the tensors, makes the few copies a kernel cannot do
without (a layout it has no stride pattern for, a non-fp32 LoRA factor) and passes
addresses, sizes and element strides to sdfast._C; nothing below it knows about torch.
Outputs: group_norm keeps x's memory format; attention writes [B, N, H, D] memory viewed as
[B, H, N, D] (the layout torch's own SDPA returns and merge_heads reads for free).
"""
import math

import torch

try:
    from sdfast import _C
except ImportError as err:  # no compiler at install time: the backend is simply absent
    _C = None
    _IMPORT_ERROR = f"sdfast._C is not built ({err})"
else:
    _IMPORT_ERROR = None

_KERNELS = ("group_norm_f32", "attention_f32", "lora_merge_f32")


def available():
    return _C is not None and all(hasattr(_C, k) for k in _KERNELS)


def unavailable_reason():
    if _C is None:
        return _IMPORT_ERROR
    return "sdfast._C predates the CPU kernels: rebuild with `pip install -e .`"


def _cpu_f32(name, t):
    """None if `t` (or None) is a CPU float32 tensor, else the reason string."""
    if t is None:
        return None
    if t.device.type != "cpu":
        return f"{name} is on {t.device}; the cpu backend takes CPU tensors"
    if t.dtype != torch.float32:
        return f"{name} is {t.dtype}; the cpu backend takes float32"
    return None


def _first_reason(*reasons):
    for r in reasons:
        if r is not None:
            return r
    return True


# --- group_norm ----------------------------------------------------------------------------

def supports_group_norm(x, num_groups, weight, bias, eps, silu, add):
    return _first_reason(_cpu_f32("x", x), _cpu_f32("weight", weight), _cpu_f32("bias", bias),
                         _cpu_f32("add", add))


# Where the cpu kernels beat the reference backend (what automatic selection would run
# instead), as bench/kernels.py and the shapes measured them (bench/results/
# kernels-cpu.json; fp32, AVX-512 and AVX2 builds on the same 2-core machine):
# - group norm: from about 32 K elements (1.3-4x at SD1.5 ResBlock shapes; at 10 K elements
#   about even, below that the fixed per-call cost loses to torch);
# - attention with one key block (M <= 512: cross-attention, 77 x chunks keys): with AVX-512
#   1.0-2x at every head dim; with AVX2 only up to head dim 48 (D 80-160: 0.7-0.9x);
#   self-attention at SD lengths stays on torch's SDPA (0.8-1.1x);
# - LoRA merge: always (the reference recomputes in fp32 copies; the kernel is one pass).
GN_MIN_NUMEL = 32768
ATTN_MAX_KEYS = 512          # the kernel's one-key-block limit (csrc/cpu/attention.cpp kWholeKV)
ATTN_MAX_HEAD_DIM_AVX2 = 48


def faster_group_norm(x, num_groups, weight, bias, eps, silu, add):
    return x.numel() >= GN_MIN_NUMEL


def faster_attention(q, k, v):
    if k.shape[-2] > ATTN_MAX_KEYS:
        return False
    return _C.cpu_isa() == "avx512" or q.shape[-1] <= ATTN_MAX_HEAD_DIM_AVX2


def faster_lora_merge(weight, ups, downs, scales):
    return True


def _rows_view(x):
    """`x` [B, C, *spatial] as [B, C, S] with a unit channel or spatial stride (a view), or
    None when its layout has no such view."""
    b, c = x.shape[:2]
    try:
        v = x.view(b, c, -1)
    except RuntimeError:
        return None
    if v.shape[2] <= 1 or v.stride(2) == 1:
        return v
    if v.stride(1) == 1 or c == 1:
        return v
    return None


def _gn_strides(v):
    """Element strides (b, c, s) for the kernel: s == 1 selects its per-channel-row path."""
    sb, sc, ss = v.stride()
    if v.shape[2] <= 1:
        ss = 1
    elif v.shape[1] == 1 and ss != 1:
        sc = 1
    return [sb, sc, ss]


def group_norm(x, num_groups, weight, bias, eps, silu, add):
    xv = _rows_view(x)
    if xv is None:
        x = x.contiguous()
        xv = _rows_view(x)
    y = torch.empty_like(x)
    b, c, s = xv.shape
    x_strides = _gn_strides(xv)
    y_strides = x_strides if y.stride() == x.stride() else _gn_strides(y.view(xv.shape))
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    add_strides = [0, 0]
    if add is not None:
        add = add.reshape(add.shape[0], add.shape[1])  # [B|1, C(, 1, 1)] -> [B|1, C]
        add_strides = [add.stride(0) if add.shape[0] > 1 else 0, add.stride(1)]
    _C.group_norm_f32(x.data_ptr(), y.data_ptr(), _addr(weight), _addr(bias), _addr(add),
                      b, c, s, num_groups, x_strides, y_strides, add_strides,
                      float(eps), bool(silu), torch.get_num_threads())
    return y


def _addr(t):
    return 0 if t is None else t.data_ptr()


# --- attention -----------------------------------------------------------------------------

def supports_attention(q, k, v):
    reason = _first_reason(_cpu_f32("q", q), _cpu_f32("k", k), _cpu_f32("v", v))
    if reason is not True:
        return reason
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "the cpu backend takes [B, heads, N, D] tensors"
    if v.shape[-1] != q.shape[-1]:
        return "the cpu backend needs v's head dim equal to q's"
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        return "the cpu backend does not broadcast batch or heads"
    if k.shape[2] == 0:
        return "no keys"
    return True


def _unit_last(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides3(t):
    return [t.stride(0), t.stride(1), t.stride(2)]


def attention(q, k, v):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, n, d = q.shape
    m = k.shape[2]
    o = q.new_empty(b, n, h, d).transpose(1, 2)  # [B, N, H, D] memory -> [B, H, N, D]
    _C.attention_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), b, h, n, m, d,
                     _strides3(q), _strides3(k), _strides3(v), _strides3(o),
                     1.0 / math.sqrt(d), 0, torch.get_num_threads())
    return o


# --- lora_merge ----------------------------------------------------------------------------

def supports_lora_merge(weight, ups, downs, scales):
    reason = _cpu_f32("weight", weight)
    if reason is not None:
        return reason
    for name, group in (("up", ups), ("down", downs)):
        for t in group:
            if t.device.type != "cpu":
                return f"a LoRA {name} is on {t.device}; the cpu backend takes CPU tensors"
            if not t.dtype.is_floating_point:
                return f"a LoRA {name} is {t.dtype}"
    return True


def _matrix(t, rows):
    """`t` as a float32 [rows, -1] matrix with unit column stride (a view when possible)."""
    t = t.detach().to(torch.float32).reshape(rows, -1)
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def _lora_layer(weight, ups, downs, scales):
    """(kernel arguments, target) of one weight: the target is the [O, I] fp32 matrix merged in
    place, a copy when `weight` has no such view (copied back by _lora_done)."""
    o = weight.shape[0]
    target = weight.detach().reshape(o, -1)
    if target.data_ptr() != weight.data_ptr() or (target.stride(1) != 1 and target.shape[1] > 1):
        target = target.contiguous()
    ups = [_matrix(u, o) for u in ups]
    downs = [_matrix(d, d.shape[0]) for d in downs]
    args = (target.data_ptr(), o, target.shape[1], target.stride(0),
            [u.data_ptr() for u in ups], [u.stride(0) for u in ups],
            [d.data_ptr() for d in downs], [d.stride(0) for d in downs],
            [d.shape[0] for d in downs], [float(s) for s in scales])
    return args, target, (ups, downs)  # the factors stay referenced until the kernel ran


def _lora_done(weight, target):
    if target.data_ptr() != weight.data_ptr():
        with torch.no_grad():
            weight.copy_(target.reshape(weight.shape))


def lora_merge_(weight, ups, downs, scales):
    args, target, keep = _lora_layer(weight, ups, downs, scales)
    _C.lora_merge_f32(*args, torch.get_num_threads())
    _lora_done(weight, target)
    return weight


def lora_merge_layers_(layers):
    """lora_merge_ on every (weight, ups, downs, scales) of `layers`, in one parallel pass."""
    prepared = [_lora_layer(*layer) for layer in layers]
    _C.lora_merge_layers_f32([args for args, _, _ in prepared], torch.get_num_threads())
    for (weight, *_), (_, target, _) in zip(layers, prepared):
        _lora_done(weight, target)
