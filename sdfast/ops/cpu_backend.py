"""The `cpu` backend: csrc/cpu (OpenMP, fp32; AVX2 and AVX-512 builds, the best the CPU has at
run time) through the torch-free module sdfast._C.

This file is the boundary: it checks the tensors, makes the few copies a kernel cannot do
without (a layout it has no stride pattern for, a non-fp32 LoRA factor) and passes
addresses, sizes and element strides to sdfast._C; nothing below it knows about torch.
Outputs: group_norm keeps x's memory format; attention writes [B, N, H, D] memory viewed as
[B, H, N, D] (the layout torch's own SDPA returns and merge_heads reads for free).
"""
import math
import os

import torch

from sdfast.errors import SdfastError

try:
    from sdfast import _C
except ImportError as err:  # no compiler at install time: the backend is simply absent
    _C = None
    _IMPORT_ERROR = f"sdfast._C is not built ({err})"
else:
    _IMPORT_ERROR = None

_KERNELS = ("group_norm_f32", "attention_f32", "lora_merge_f32", "conv3x3_winograd_f32")


def available():
    if _C is None or not all(hasattr(_C, k) for k in _KERNELS):
        return False
    _check_isa_setting()
    return True


def _check_isa_setting():
    """SDFAST_CPU_ISA (read by the kernels' dispatch) must name an instruction set this build
    and CPU run, or be unset: a misspelt or unsupported value is an error, not ignored."""
    name = os.environ.get("SDFAST_CPU_ISA", "")
    if not name:
        return
    if name not in ("avx2", "avx512"):
        raise SdfastError(f"SDFAST_CPU_ISA={name}: expected avx2 or avx512 (or unset: the best "
                          "the CPU has)")
    if not _C.cpu_isa_available(name):
        raise SdfastError(f"SDFAST_CPU_ISA={name}: this CPU or build cannot run {name} kernels")


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
# - group norm, one thread: from about 32 K elements (1.3-4x at SD1.5 ResBlock shapes; at
#   10 K elements about even, below that the fixed per-call cost loses to torch); threaded:
#   see GN_MIN_NUMEL_THREADED;
# - attention: with AVX-512 the kernel wins cross-attention up to head dim 80 and
#   self-attention up to head dim 64 at every SD length (see ATTN_MAX_HEAD_DIM_SELF); with
#   AVX2 only with one key block (csrc/cpu/attention.cpp kWholeKV) at cross-attention shapes up to head dim 48 (ATTN_MAX_KEYS_AVX2);
# - LoRA merge: always (the reference recomputes in fp32 copies; the kernel is one pass).
# - conv2d, from 16 channels in and out (with fewer, the UNet's 4-channel and the VAE's RGB
#   convs, 0.7-1.2x): 3x3 stride 1 (Winograd) 1.7-2.8x over oneDNN at every SD UNet and VAE
#   shape channels-last (1.1-2.4x on NCHW input, converted); 1x1 (GEMM) 1.0-1.25x; other
#   kernels (the stride-2 downsamplers, GEMM over a patch copy) 1.3-4.4x where the weight has
#   at least twice the patch copy's elements (the UNet's 640- and 1280-channel ones), 0.3-0.9x
#   elsewhere (the VAE encoder's, the UNet's first).
GN_MIN_NUMEL = 32768
# With more than one thread torch's group norm splits the work too, and the cpu kernel's lead
# starts later: measured with 2 threads through sdfast.ops (Python included), since the NCHW
# path sums a whole group in one set of vector accumulators: 2.1-2.4x at 328-655 K elements,
# 1.2-1.5x at 82-164 K, 0.8-0.95x at 41 K.
GN_MIN_NUMEL_THREADED = 65536
CONV_MIN_CHANNELS = 16
CONV_GEMM_MIN_WEIGHT_PER_PATCH = 2
# AVX2 (SDFAST_CPU_ISA=avx2): torch's SDPA runs AVX-512 code on the same machine and the AVX2
# kernel loses at every self-attention shape (0.58-0.73x), so it takes up to two prompt chunks
# of keys only.
ATTN_MAX_HEAD_DIM_AVX2 = 48
ATTN_MAX_KEYS_AVX2 = 160
# AVX-512, the quiet 2-thread run (bench/results/cpu-sd15-kernels.json): cross-attention (77
# keys) 2.1x at head dim 40, 1.4x at 80 (1.15x with 77 queries), 0.9x at 160. Self-attention,
# 2 threads, B 2, H 8, q/k/v heads viewed out of [B, N, H*D] projections as the UNet makes
# them, since the long-sequence layout with the queries in the vector lanes
# (csrc/cpu/attention.cpp): head dim 40 1.06x at 256 tokens, 1.29x at 1024, 1.46-1.51x at
# 4096; head dim 64 1.04x, 1.14x, 1.17-1.20x; head dim 80 about even (0.95x at 256, 1.05x at
# 1024, 1.03x at 4096; before that layout 0.69x at 256 tokens). So self-attention takes the
# kernel up to head dim 64; head dim 80 only with up to two prompt chunks of keys; head dim
# 160 (0.99x at 256-1024 tokens, 0.69x at 64) and the VAE's one 512-wide head stay on SDPA.
ATTN_MAX_HEAD_DIM = 80
ATTN_MAX_HEAD_DIM_SELF = 64


def faster_group_norm(x, num_groups, weight, bias, eps, silu, add):
    return x.numel() >= (GN_MIN_NUMEL if torch.get_num_threads() == 1 else GN_MIN_NUMEL_THREADED)


def faster_attention(q, k, v):
    if _C.cpu_isa() == "avx512":
        if k.shape[-2] <= ATTN_MAX_KEYS_AVX2:
            return q.shape[-1] <= ATTN_MAX_HEAD_DIM
        return q.shape[-1] <= ATTN_MAX_HEAD_DIM_SELF
    return k.shape[-2] <= ATTN_MAX_KEYS_AVX2 and q.shape[-1] <= ATTN_MAX_HEAD_DIM_AVX2


def faster_lora_merge(weight, ups, downs, scales, base=None):
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

def supports_lora_merge(weight, ups, downs, scales, base=None):
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


def _unit_columns(m):
    """Whether the kernel can read the 2-d `m` in place: unit column stride (or one column)."""
    return m.stride(1) == 1 or m.shape[1] == 1


def _matrix(t, rows):
    """`t` as a float32 [rows, -1] matrix with unit column stride (a view when possible)."""
    t = t.detach().to(torch.float32).reshape(rows, -1)
    return t if _unit_columns(t) else t.contiguous()


def _lora_layer(weight, ups, downs, scales, base=None):
    """(kernel arguments, target) of one weight: the target is the [O, I] fp32 matrix merged in
    place, a copy when `weight` has no such view (copied back by _lora_done). With `base`, the
    kernel writes base + the LoRAs into the target in one pass (base read as an [O, I] view,
    else copied into the target first)."""
    o = weight.shape[0]
    target = weight.detach().reshape(o, -1)
    own_view = target.data_ptr() == weight.data_ptr() and _unit_columns(target)
    src = None
    if base is not None:
        src = base.detach().reshape(o, -1)
        if not (own_view and _unit_columns(src)):
            src = None
            with torch.no_grad():
                weight.copy_(base)
            target = weight.detach().reshape(o, -1)
    if not own_view:
        target = target.contiguous()
    ups = [_matrix(u, o) for u in ups]
    downs = [_matrix(d, d.shape[0]) for d in downs]
    args = (target.data_ptr(), o, target.shape[1], target.stride(0),
            [u.data_ptr() for u in ups], [u.stride(0) for u in ups],
            [d.data_ptr() for d in downs], [d.stride(0) for d in downs],
            [d.shape[0] for d in downs], [float(s) for s in scales],
            0 if src is None else src.data_ptr(), 0 if src is None else src.stride(0))
    return args, target, (ups, downs, src)  # these stay referenced until the kernel ran


def _lora_done(weight, target):
    if target.data_ptr() != weight.data_ptr():
        with torch.no_grad():
            weight.copy_(target.reshape(weight.shape))


def lora_merge_(weight, ups, downs, scales, base=None):
    args, target, keep = _lora_layer(weight, ups, downs, scales, base)
    _C.lora_merge_f32(*args, torch.get_num_threads())
    _lora_done(weight, target)
    return weight


def lora_merge_layers_(layers):
    """lora_merge_ on every (weight, ups, downs, scales[, base]) of `layers`, in one parallel
    pass."""
    prepared = [_lora_layer(*layer) for layer in layers]
    _C.lora_merge_layers_f32([args for args, _, _ in prepared], torch.get_num_threads())
    for (weight, *_), (_, target, _) in zip(layers, prepared):
        _lora_done(weight, target)


# --- conv2d --------------------------------------------------------------------------------
# Channels-last throughout. 3x3 kernels with stride 1 and padding 1 run the Winograd kernel
# (csrc/cpu/winograd.cpp); every other convolution is one GEMM (MKL, through torch.mm) of the
# [B*Ho*Wo, C*kh*kw] input patches (x itself for a 1x1 kernel) and the weight read in place as
# [C*kh*kw, O]. Neither re-lays-out the weight per call as oneDNN's convolution does (a full
# copy of it, 30 ms for a 1280x1280 3x3 weight here).

def supports_conv2d(x, weight, bias, stride, padding, add):
    return _first_reason(_cpu_f32("x", x), _cpu_f32("weight", weight), _cpu_f32("bias", bias),
                         _cpu_f32("add", add))


def _is_winograd(weight, stride, padding):
    return tuple(weight.shape[2:]) == (3, 3) and list(stride) == [1, 1] and list(padding) == [1, 1]


def faster_conv2d(x, weight, bias, stride, padding, add):
    if min(weight.shape[0], weight.shape[1]) < CONV_MIN_CHANNELS:
        return False
    if _is_winograd(weight, stride, padding) or tuple(weight.shape[2:]) == (1, 1):
        return True
    # other kernels (the stride-2 downsamplers): the patch copy must be small beside the weight
    b, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    ho, wo = ((n + 2 * p - k) // s + 1 for n, p, k, s in zip((h, w), padding, (kh, kw), stride))
    return weight.numel() >= CONV_GEMM_MIN_WEIGHT_PER_PATCH * b * ho * wo * c * kh * kw


def _whc(t):
    """(b, h, w) element strides of a channels-last [B, C, H, W] tensor."""
    return [t.stride(0), t.stride(2), t.stride(3)]


def _channels_last(t):
    return None if t is None else t.contiguous(memory_format=torch.channels_last)


def conv2d(x, weight, bias, stride, padding, add):
    x, add = _channels_last(x), _channels_last(add)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if _is_winograd(weight, stride, padding):
        return _winograd(x, weight, bias, add)
    return _gemm_conv(x, weight, bias, stride, padding, add)


def _winograd(x, weight, bias, add):
    b, c, h, w = x.shape
    y = torch.empty((b, weight.shape[0], h, w), dtype=x.dtype, memory_format=torch.channels_last)
    _C.conv3x3_winograd_f32(x.data_ptr(), weight.data_ptr(), _addr(bias), _addr(add), y.data_ptr(),
                            b, h, w, c, weight.shape[0], _whc(x), _whc(y),
                            [0, 0, 0] if add is None else _whc(add), torch.get_num_threads())
    return y


def _gemm_conv(x, weight, bias, stride, padding, add):
    o, c, kh, kw = weight.shape
    if padding != [0, 0]:
        x = _channels_last(torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0])))
    if (kh, kw) == (1, 1):
        x = x[:, :, ::stride[0], ::stride[1]]
        b, _, ho, wo = x.shape
        cols = x.permute(0, 2, 3, 1).reshape(-1, c)  # [B, C, Ho, Wo] -> [B*Ho*Wo, C] (a view)
    else:
        patches = x.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])  # [B, C, Ho, Wo, kh, kw]
        b, _, ho, wo = patches.shape[:4]
        cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)  # -> [B*Ho*Wo, C*kh*kw]
    wmat = weight.view(o, -1).t()  # [C*kh*kw, O], no copy
    rows = cols @ wmat if bias is None else torch.addmm(bias, cols, wmat)  # [B*Ho*Wo, O]
    if add is not None:
        rows += add.permute(0, 2, 3, 1).reshape(-1, o)
    return rows.view(b, ho, wo, o).permute(0, 3, 1, 2)  # [B, Ho, Wo, O] -> [B, O, Ho, Wo] channels-last
