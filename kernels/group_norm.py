"""GroupNorm with an optional per-channel add before it and SiLU after it.

For x of shape [B, C, S] (S = H*W, or N for [B, C, N]) split into G groups of C/G channels:

    x'[b, c, s]   = x[b, c, s] + add[b, c]                     (add optional: the time embedding)
    mean[b, g]    = 1/(C/G * S)  sum_{c in g, s} x'[b, c, s]
    var[b, g]     = 1/(C/G * S)  sum_{c in g, s} (x'[b, c, s] - mean[b, g])^2
    y[b, c, s]    = (x'[b, c, s] - mean[b, g]) / sqrt(var[b, g] + eps) * weight[c] + bias[c]
    out[b, c, s]  = silu(y) = y * sigmoid(y)                    (silu optional)

One program normalises one (b, g) pair: a pass for the mean, a pass for the variance around
that mean (two-pass: no catastrophic cancellation on large-mean activations), and a pass that
writes the output; all accumulation is fp32. Layouts are strides: NCHW has stride_s = 1,
channels-last has stride_c = 1 and stride_s = C, so both run through the same kernel.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the launcher raises; the reference works without Triton
    triton = None

MAX_GROUP_CHANNELS = 1024  # host-side limit: channels per group handled by one tile row


def group_norm_ref(x, num_groups, weight, bias, eps=1e-5, silu=False, add=None):
    """Pure-torch reference (computed in x's dtype, as torch does)."""
    if add is not None:
        x = x + add.reshape(*add.shape[:2], *([1] * (x.dim() - 2)))
    y = torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    return torch.nn.functional.silu(y) if silu else y


if triton is not None:

    @triton.jit
    def _group_tile(
        X,          # pointer to x[b, first channel of the group, 0]
        ADD,        # pointer to add[b, first channel of the group] (unused without HAS_ADD)
        stride_c,   # element stride between channels of x
        stride_s,   # element stride between spatial positions of x
        stride_ac,  # element stride between channels of add
        s0,         # first spatial position of this tile
        cpg,        # channels per group
        S,          # spatial size
        HAS_ADD: tl.constexpr,  # add add[b, c] before the norm
        BLOCK_C: tl.constexpr,  # channel tile (>= cpg, power of two)
        BLOCK_S: tl.constexpr,  # spatial tile
    ):
        offs_c = tl.arange(0, BLOCK_C)
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_c[:, None] < cpg) & (offs_s[None, :] < S)
        ptrs = X + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            a = tl.load(ADD + offs_c * stride_ac, mask=offs_c < cpg, other=0.0).to(tl.float32)
            x = tl.where(mask, x + a[:, None], 0.0)
        return x, mask, offs_c, offs_s

    @triton.jit
    def _group_norm_kernel(
        X,          # input [B, C, S] (strided)
        Y,          # output, same strides as X
        W,          # weight [C]
        BIAS,       # bias [C]
        ADD,        # add [B, C] (strided; unused without HAS_ADD)
        stride_xb,  # x/y batch stride
        stride_xc,  # x/y channel stride
        stride_xs,  # x/y spatial stride
        stride_ab,  # add batch stride
        stride_ac,  # add channel stride
        C,          # channels
        S,          # spatial size
        G,          # groups
        eps,        # variance epsilon
        HAS_ADD: tl.constexpr,  # add[b, c] added before the norm
        SILU: tl.constexpr,     # SiLU after the affine
        BLOCK_C: tl.constexpr,  # channel tile (next power of two of C / G)
        BLOCK_S: tl.constexpr,  # spatial tile
    ):
        pid = tl.program_id(0)
        b = pid // G
        g = pid % G
        cpg = C // G
        base = b.to(tl.int64) * stride_xb + (g * cpg).to(tl.int64) * stride_xc
        x_grp = X + base
        add_grp = ADD + b.to(tl.int64) * stride_ab + g * cpg * stride_ac
        n = (cpg * S).to(tl.float32)
        # pass 1: mean
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            x, mask, _, _ = _group_tile(x_grp, add_grp, stride_xc, stride_xs, stride_ac, s0, cpg, S,
                                        HAS_ADD, BLOCK_C, BLOCK_S)
            acc += x
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / n
        # pass 2: variance around the mean
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            x, mask, _, _ = _group_tile(x_grp, add_grp, stride_xc, stride_xs, stride_ac, s0, cpg, S,
                                        HAS_ADD, BLOCK_C, BLOCK_S)
            d = tl.where(mask, x - mean, 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / n + eps)
        # pass 3: normalise, affine, SiLU, store
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c < cpg
        w = tl.load(W + g * cpg + offs_c, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(BIAS + g * cpg + offs_c, mask=cmask, other=0.0).to(tl.float32)
        scale = (w * rstd)[:, None]
        shift = (bb - mean * w * rstd)[:, None]
        for s0 in range(0, S, BLOCK_S):
            x, mask, oc, offs = _group_tile(x_grp, add_grp, stride_xc, stride_xs, stride_ac, s0, cpg, S,
                                          HAS_ADD, BLOCK_C, BLOCK_S)
            y = x * scale + shift
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            ptrs = Y + base + oc[:, None] * stride_xc + offs[None, :] * stride_xs
            tl.store(ptrs, y.to(Y.dtype.element_ty), mask=mask)


def _flat_strides(x):
    """(stride_b, stride_c, stride_s) when x's spatial dims flatten to one strided axis."""
    if x.dim() == 3:
        return x.stride(0), x.stride(1), x.stride(2)
    if x.dim() != 4:
        return None
    h, w = x.shape[2], x.shape[3]
    if h == 1:
        return x.stride(0), x.stride(1), x.stride(3)
    if w == 1 or x.stride(2) == w * x.stride(3):
        return x.stride(0), x.stride(1), x.stride(3) if w > 1 else x.stride(2)
    return None


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, add=None, block_s=None):
    """Launch the Triton GroupNorm(+add, +SiLU) on `x` ([B, C, H, W] in NCHW or channels-last
    memory format, or [B, C, N]). Returns a new tensor with x's memory format."""
    if triton is None:
        raise RuntimeError("Triton is not installed: `pip install triton` to use sdfast.kernels")
    if x.dim() not in (3, 4):
        raise ValueError(f"group_norm expects [B, C, H, W] or [B, C, N], got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"channels {C} not divisible by num_groups {num_groups}")
    cpg = C // num_groups
    if cpg > MAX_GROUP_CHANNELS:
        raise ValueError(f"{cpg} channels per group exceeds the kernel limit {MAX_GROUP_CHANNELS}")
    strides = _flat_strides(x)
    if strides is None:
        x = x.contiguous()
        strides = _flat_strides(x)
    y = torch.empty_like(x)  # preserve_format: same strides as x for dense x
    if y.stride() != x.stride():
        x = x.contiguous()
        y = torch.empty_like(x)
        strides = _flat_strides(x)
    S = x[0, 0].numel()
    if weight is None:
        weight = torch.ones(C, device=x.device, dtype=x.dtype)
    if bias is None:
        bias = torch.zeros(C, device=x.device, dtype=x.dtype)
    has_add = add is not None
    if has_add and tuple(add.shape[:2]) != (B, C):
        raise ValueError(f"add must be [B, C] = [{B}, {C}], got {tuple(add.shape)}")
    add_t = add.reshape(B, C) if has_add else x
    block_c = triton.next_power_of_2(cpg)
    if block_s is None:
        block_s = max(1, min(triton.next_power_of_2(S), 4096 // block_c))
    _group_norm_kernel[(B * num_groups,)](
        x, y, weight.contiguous(), bias.contiguous(), add_t,
        strides[0], strides[1], strides[2],
        add_t.stride(0) if has_add else 0, add_t.stride(1) if has_add else 0,
        C, S, num_groups, float(eps),
        HAS_ADD=has_add, SILU=bool(silu), BLOCK_C=block_c, BLOCK_S=block_s,
    )
    return y


__all__ = ["group_norm", "group_norm_ref"]
