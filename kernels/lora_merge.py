"""In-place LoRA merge: W += sum_k scale_k * up_k @ down_k, accumulated in fp32.

For a linear weight W [O, I] and K LoRAs with up_k [O, r_k], down_k [r_k, I]:

    W[o, i] <- W[o, i] + sum_k sum_{j < r_k} scale_k * up_k[o, j] * down_k[j, i]

A conv weight [O, I, kh, kw] is the linear case on [O, I*kh*kw], with down [r, I, kh, kw]
flattened to [r, I*kh*kw] and up [O, r, 1, 1] to [O, r]. The host concatenates the LoRAs
along the rank axis (U = [up_1 | ... | up_K], Dn = [down_1; ...; down_K], R = sum r_k) with one
fp32 scale per rank row, so one launch does every LoRA and W is rounded once:

    W[o, i] <- W[o, i] + sum_{j < R} (U[o, j] * scale[j]) * Dn[j, i]

One program owns a [BLOCK_O, BLOCK_I] tile of W and loops over R in BLOCK_R steps; products
are fp32 (`input_precision="ieee"`: no TF32 rounding), since the merge is memory-bound anyway.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the launcher raises; the reference works without Triton
    triton = None


def _as_2d(up, down):
    """up [O, r(, 1, 1)] -> [O, r]; down [r, I(, kh, kw)] -> [r, I*kh*kw]."""
    return up.reshape(up.shape[0], up.shape[1]), down.reshape(down.shape[0], -1)


def lora_merge_ref(weight, ups, downs, scales):
    """Pure-torch reference: in place on `weight`, fp32 accumulation, one rounding; returns weight."""
    w2 = weight.reshape(weight.shape[0], -1)
    delta = torch.zeros(w2.shape, dtype=torch.float32, device=weight.device)
    for up, down, scale in zip(ups, downs, scales):
        u, d = _as_2d(up, down)
        delta += float(scale) * (u.float() @ d.float())
    weight.copy_((w2.float() + delta).to(weight.dtype).reshape(weight.shape))
    return weight


if triton is not None:

    @triton.jit
    def _lora_merge_kernel(
        W,          # weight [O, I], updated in place (row stride stride_wo, unit column stride)
        U,          # concatenated ups [O, R] (row stride stride_uo, unit column stride)
        DN,         # concatenated downs [R, I] (row stride stride_dr, unit column stride)
        SCALE,      # fp32 scale per rank row [R]
        stride_wo,  # weight row stride
        stride_uo,  # ups row stride
        stride_dr,  # downs row stride
        O,          # output features
        I,          # input features (I*kh*kw for conv)
        R,          # total rank
        BLOCK_O: tl.constexpr,  # rows of W per program
        BLOCK_I: tl.constexpr,  # columns of W per program
        BLOCK_R: tl.constexpr,  # rank step (>= 16 for tl.dot)
    ):
        pid_o = tl.program_id(0)
        pid_i = tl.program_id(1)
        offs_o = (pid_o * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            u = tl.load(U + offs_o[:, None] * stride_uo + rr[None, :],
                        mask=(offs_o[:, None] < O) & (rr[None, :] < R), other=0.0).to(tl.float32)
            s = tl.load(SCALE + rr, mask=rr < R, other=0.0)
            d = tl.load(DN + rr[:, None].to(tl.int64) * stride_dr + offs_i[None, :],
                        mask=(rr[:, None] < R) & (offs_i[None, :] < I), other=0.0).to(tl.float32)
            acc += tl.dot(u * s[None, :], d, input_precision="ieee")
        mask = (offs_o[:, None] < O) & (offs_i[None, :] < I)
        w_ptrs = W + offs_o[:, None] * stride_wo + offs_i[None, :]
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(w_ptrs, (w + acc).to(W.dtype.element_ty), mask=mask)


def lora_merge_(weight, ups, downs, scales, block_o=64, block_i=64, block_r=16):
    """Merge LoRAs into `weight` ([O, I] or conv [O, I, kh, kw], contiguous rows) in place with
    the Triton kernel; `ups`, `downs`, `scales` are equal-length lists. Returns `weight`."""
    if triton is None:
        raise RuntimeError("Triton is not installed: `pip install triton` to use sdfast.kernels")
    if not (len(ups) == len(downs) == len(scales)):
        raise ValueError(f"ups, downs, scales differ in length: {len(ups)}, {len(downs)}, {len(scales)}")
    if not ups:
        return weight
    O = weight.shape[0]
    w2 = weight.view(O, -1)  # raises for a weight whose rows cannot be flattened
    if w2.stride(1) != 1:
        raise ValueError("lora_merge_ needs a weight with contiguous rows")
    I = w2.shape[1]
    pairs = [_as_2d(u, d) for u, d in zip(ups, downs)]
    for u, d in pairs:
        if u.shape[0] != O or d.shape[1] != I or u.shape[1] != d.shape[0]:
            raise ValueError(f"LoRA up {tuple(u.shape)} / down {tuple(d.shape)} do not fit weight [{O}, {I}]")
    dtype = torch.promote_types(pairs[0][0].dtype, pairs[0][1].dtype)
    U = torch.cat([u.to(dtype) for u, _ in pairs], dim=1).contiguous()   # [O, R]
    DN = torch.cat([d.to(dtype) for _, d in pairs], dim=0).contiguous()  # [R, I]
    scale = torch.cat([torch.full((u.shape[1],), float(s), dtype=torch.float32) for (u, _), s in
                       zip(pairs, scales)]).to(weight.device)
    R = U.shape[1]
    grid = (triton.cdiv(O, block_o), triton.cdiv(I, block_i))
    _lora_merge_kernel[grid](
        w2, U, DN, scale,
        w2.stride(0), U.stride(0), DN.stride(0),
        O, I, R,
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_R=block_r,
    )
    return weight


__all__ = ["lora_merge_", "lora_merge_ref"]
