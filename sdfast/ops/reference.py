"""Pure-torch references: the definition of correct for every backend.

These are also the `reference` backend (sdfast.ops.registry), so they take the same
arguments as every backend's functions.
"""
import torch
import torch.nn.functional as F


def group_norm_ref(x, num_groups, weight, bias, eps=1e-5, silu=False, add=None):
    if add is not None:
        x = x + add.reshape(*add.shape[:2], *([1] * (x.dim() - 2)))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def attention_ref(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def lora_merge_ref(weight, ups, downs, scales, base=None):
    """weight += sum_l scales[l] * ups[l] @ downs[l], accumulated in fp32, in place; with
    `base` (weight's shape), weight = base + the same sum (base unchanged).

    `weight` [O, I] (linear) or [O, I, kh, kw] (conv); `ups[l]` [O, r] or [O, r, 1, 1];
    `downs[l]` [r, I] or [r, I, kh, kw]. Single tensors / a float are read as one LoRA.
    """
    if isinstance(ups, torch.Tensor):
        ups, downs, scales = [ups], [downs], [scales]
    source = weight if base is None else base
    w32 = source.detach().float().reshape(weight.shape[0], -1)  # [O, I*kh*kw]
    if w32.data_ptr() in (weight.data_ptr(), source.data_ptr()):
        w32 = w32.clone()
    for up, down, scale in zip(ups, downs, scales):
        delta = up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)
        w32 += float(scale) * delta  # [O, r] @ [r, I*kh*kw]
    with torch.no_grad():
        weight.copy_(w32.reshape(weight.shape))
    return weight


def conv2d_ref(x, weight, bias, stride, padding, add=None):
    """`F.conv2d(x, weight, bias, stride, padding)` (+ `add`, the output's shape)."""
    y = F.conv2d(x, weight, bias, tuple(stride), tuple(padding))
    return y if add is None else y + add


__all__ = ["group_norm_ref", "attention_ref", "lora_merge_ref", "conv2d_ref"]
