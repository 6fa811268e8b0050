"""Argument checks shared by the GPU backends (cuda, triton): each returns True or the reason
string the registry reports (see sdfast.ops.registry); device/dtype checks stay per backend."""


def tensors(check, named):
    """The first reason `check(name, tensor)` gives for the `(name, tensor)` pairs (None tensors
    skipped), or None when every tensor passes."""
    for name, t in named:
        if t is not None and (reason := check(name, t)):
            return reason
    return None


def group_norm_shapes(x, num_groups, add):
    """[B, C, H, W] or [B, C, N] input, channels split into the groups, `add` one value per
    (batch, channel)."""
    if x.dim() not in (3, 4):
        return f"x must be [B, C, H, W] or [B, C, N], got {x.dim()}-d"
    if x.shape[1] % num_groups:
        return f"channels {x.shape[1]} not divisible by {num_groups} groups"
    if add is not None and (tuple(add.shape[:2]) != tuple(x.shape[:2])
                            or add.numel() != x.shape[0] * x.shape[1]):
        return f"add must be [B, C] = {tuple(x.shape[:2])}, got {tuple(add.shape)}"
    return True


def attention_shapes(q, k, v, max_head_dim):
    """4-d q/k/v of one dtype, matching batch/heads/head dim, at least one key."""
    if not (q.dtype == k.dtype == v.dtype):
        return "q, k, v must share a dtype"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-d [B, heads, N, D]"
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        return f"shape mismatch: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}"
    if q.shape[3] > max_head_dim:
        return f"head dim {q.shape[3]} > {max_head_dim}"
    if k.shape[2] == 0:
        return "no keys"
    return True


def lora_shapes(weight, ups, downs, scales, dtypes=None):
    """Contiguous 2-d/4-d weight, one up/down/scale each, factors on the weight's device whose
    product has the weight's shape (`dtypes`: the factor dtypes allowed, None for any)."""
    if not (len(ups) == len(downs) == len(scales)):
        return "ups, downs and scales differ in length"
    if weight.dim() not in (2, 4) or not weight.is_contiguous():
        return "weight must be a contiguous [O, I] or [O, I, kh, kw] tensor"
    rows, inner = weight.shape[0], weight[0].numel()
    for up, down in zip(ups, downs):
        if up.device != weight.device or down.device != weight.device:
            return "LoRA tensors must be on the weight's device"
        if dtypes is not None and (up.dtype not in dtypes or down.dtype not in dtypes):
            return "LoRA tensors must be fp32/fp16/bf16"
        if up.shape[0] != rows or up[0].numel() != down.shape[0] or down[0].numel() != inner:
            return f"LoRA up {tuple(up.shape)} / down {tuple(down.shape)} do not fit weight {tuple(weight.shape)}"
    return True
