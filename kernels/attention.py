"""Softmax attention: flash self-attention and a short-context cross-attention kernel.

For queries q [B, H, N, D] and keys / values k, v [B, H, M, D], with scale = 1/sqrt(D):

    s[i, j] = scale * <q_i, k_j>
    p[i, j] = exp(s[i, j] - max_j s[i, j]) / sum_j exp(s[i, j] - max_j s[i, j])
    o[i]    = sum_j p[i, j] v_j

Flash kernel (any M, e.g. UNet self-attention with N = M up to 16k): one program owns a tile
of BLOCK_M queries and streams K/V in tiles of BLOCK_N keys with the online softmax
(Milakov & Gimelshein 2018; Dao et al. 2022): keep a running max m_i and sum l_i,

    m_new = max(m_i, rowmax(s_tile));  alpha = exp(m_i - m_new)
    l_i   = alpha * l_i + rowsum(exp(s_tile - m_new));  acc = alpha * acc + exp(s_tile - m_new) @ v_tile

and divide acc by l_i at the end. Cross kernel (M <= a few hundred, e.g. the 77 / 154 text
tokens): the whole K/V fits in one tile, so the softmax is exact in one step, with no
rescaling. Exponentials are exp2 with log2(e) folded into the scale. Head dims that are not a
power of two (40, 80, 160) are padded to the next one with masks; accumulation is fp32.
"""
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the launcher raises; the reference works without Triton
    triton = None

MAX_HEAD_DIM = 256          # host-side limit on D (padded tile width)
CROSS_MAX_BYTES = 128 * 1024  # host-side limit on the one-tile kernel's K + V tile (sm_80: 164 KiB smem)
LOG2E = 1.4426950408889634


def attention_ref(q, k, v):
    """Pure-torch reference: softmax(q k^T / sqrt(D)) v, in the inputs' dtype."""
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


if triton is not None:

    @triton.jit
    def _load_rows(
        PTR,        # base pointer of one (batch, head) slice
        offs_r,     # row indices [R]
        offs_d,     # head-dim indices [BLOCK_D]
        stride_r,   # row stride
        n_rows,     # valid rows
        D,          # valid head dim
    ):
        mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < D)
        return tl.load(PTR + offs_r[:, None] * stride_r + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _attention_kernel(
        Q,          # queries [B, H, N, D], last dim contiguous
        K,          # keys [B, H, M, D], last dim contiguous
        V,          # values [B, H, M, D], last dim contiguous
        O,          # output [B, H, N, D], last dim contiguous
        stride_qb, stride_qh, stride_qn,  # q strides (batch, head, row)
        stride_kb, stride_kh, stride_kn,  # k strides
        stride_vb, stride_vh, stride_vn,  # v strides
        stride_ob, stride_oh, stride_on,  # o strides
        H,          # heads
        N,          # query rows
        M,          # key rows
        D,          # head dim (<= BLOCK_D)
        qk_scale,   # 1/sqrt(D) * log2(e)
        ONE_TILE: tl.constexpr,  # True: all M keys in one BLOCK_N tile (cross-attention, no rescaling)
        BLOCK_M: tl.constexpr,   # query tile
        BLOCK_N: tl.constexpr,   # key tile (>= M when ONE_TILE)
        BLOCK_D: tl.constexpr,   # padded head dim (power of two)
        PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs, else "tf32" (unused)
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        q = _load_rows(q_base, offs_m, offs_d, stride_qn, N, D)  # [BLOCK_M, BLOCK_D]
        if ONE_TILE:
            k = _load_rows(k_base, offs_n, offs_d, stride_kn, M, D)  # [BLOCK_N, BLOCK_D]
            v = _load_rows(v_base, offs_n, offs_d, stride_vn, M, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            s = tl.where(offs_n[None, :] < M, s, float("-inf"))
            p = tl.exp2(s - tl.max(s, axis=1)[:, None])
            l_i = tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for n0 in range(0, M, BLOCK_N):
                k = _load_rows(k_base, n0 + offs_n, offs_d, stride_kn, M, D)
                v = _load_rows(v_base, n0 + offs_n, offs_d, stride_vn, M, D)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                s = tl.where((n0 + offs_n)[None, :] < M, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new
        out = acc / l_i[:, None]
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < D))


def cross_tile_bytes(M, D, element_size):
    """Bytes of the padded K and V tiles the one-tile cross kernel holds."""
    pm = max(16, triton.next_power_of_2(M))
    pd = max(16, triton.next_power_of_2(D))
    return 2 * pm * pd * element_size


def pick_kernel(M, D, element_size=2):
    """'cross' when all M keys fit one tile (K + V within CROSS_MAX_BYTES), else 'flash'."""
    return "cross" if cross_tile_bytes(M, D, element_size) <= CROSS_MAX_BYTES else "flash"


def precision(dtype):
    """tl.dot input precision: exact fp32 products for fp32 inputs (no TF32 rounding)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_config(kernel, M, D):
    """The constexprs of `_attention_kernel` for `kernel` ('flash' | 'cross'), M keys, head dim D."""
    block_d = max(16, triton.next_power_of_2(D))
    if kernel == "cross":
        return dict(ONE_TILE=True, BLOCK_M=64 if block_d <= 128 else 32,
                    BLOCK_N=max(16, triton.next_power_of_2(M)), BLOCK_D=block_d)
    if kernel == "flash":
        return dict(ONE_TILE=False, BLOCK_M=128 if block_d <= 64 else 64,
                    BLOCK_N=64 if block_d <= 128 else 32, BLOCK_D=block_d)
    raise ValueError(f"kernel must be 'flash' or 'cross', got {kernel!r}")


def attention(q, k, v, kernel=None, block_m=None, block_n=None):
    """Launch Triton attention of q [B, H, N, D] against k, v [B, H, M, D] (scale 1/sqrt(D)).
    `kernel` forces 'flash' or 'cross' (default: `pick_kernel`)."""
    if triton is None:
        raise RuntimeError("Triton is not installed: `pip install triton` to use sdfast.kernels")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects 4-d [B, heads, N, D] tensors")
    B, H, N, D = q.shape
    M = k.shape[2]
    if k.shape != (B, H, M, D) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} exceeds the kernel limit {MAX_HEAD_DIM}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    kernel = kernel or pick_kernel(M, D, q.element_size())
    if kernel == "cross" and cross_tile_bytes(M, D, q.element_size()) > CROSS_MAX_BYTES:
        raise ValueError(f"M={M}, D={D}, {q.dtype} exceeds the one-tile cross kernel's "
                         f"{CROSS_MAX_BYTES} byte K/V tile: use kernel='flash'")
    cfg = launch_config(kernel, M, D)
    block_m, block_n, block_d = block_m or cfg["BLOCK_M"], block_n or cfg["BLOCK_N"], cfg["BLOCK_D"]
    if cfg["ONE_TILE"]:
        block_n = cfg["BLOCK_N"]  # the one tile must hold all M keys
    grid = (triton.cdiv(N, block_m), B * H)
    _attention_kernel[grid](
        q, k, v, o,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        H, N, M, D, LOG2E / math.sqrt(D),
        ONE_TILE=cfg["ONE_TILE"], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION=precision(q.dtype),
    )
    return o


__all__ = ["attention", "attention_ref", "pick_kernel", "cross_tile_bytes", "launch_config"]
