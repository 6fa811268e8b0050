"""Small pieces shared by the UNet and the VAE (and later ControlNet).

Sources: the LDM code of CompVis / Stability-AI `stablediffusion` (`ldm/modules/attention.py`,
`ldm/modules/diffusionmodules/openaimodel.py`, `ldm/modules/diffusionmodules/model.py`).
Every GroupNorm and convolution goes through the ops layer so that fused backends can replace it.
The models run channels-last ([B, C, H, W] tensors with the channels innermost in memory): every
backend's conv and group norm take that layout, and a transformer's token view [B, h*w, C] of a
channels-last map is free (no transpose copy).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from sdfast.ops import conv2d, group_norm


def norm(module, x, silu=False, add=None):
    """Apply the `nn.GroupNorm` `module`'s parameters through the ops layer.

    The module exists only for its parameters (checkpoint keys) and its `num_groups` / `eps`;
    `silu=True` fuses the SiLU that follows the norm everywhere in LDM, `add` (`[B, C]`) is
    added to `x` before the norm (the UNet ResBlock's timestep embedding).
    """
    return group_norm(x, module.num_groups, module.weight, module.bias, module.eps,
                      silu=silu, add=add)


def plain_conv(conv):
    """True when the `nn.Conv2d` is one `sdfast.ops.conv2d` computes: groups and dilation 1,
    numeric zero padding."""
    return (conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (the same parameters, so the same checkpoint keys) run through
    `sdfast.ops.conv2d`, which may pick a faster backend (cpu: Winograd for 3x3) and fuses
    `add` (a residual of the output's shape) into the convolution. Groups and dilation 1,
    zero padding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not plain_conv(self):
            raise ValueError("sdfast's Conv2d takes groups=1, dilation=1 and numeric zero padding")

    def forward(self, x, add=None):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, add=add)


def channels_last(x):
    """`x` with channels innermost in memory (a no-op when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def same_layout(out, like):
    """`out` in `like`'s memory format (what the model was given): contiguous unless `like` is
    channels-last."""
    cl = like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    return out.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def key_indices(sd, prefix):
    """Sorted distinct integers `i` over the keys `prefix{i}.*` of a state dict."""
    found = set()
    for key in sd:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def split_heads(x, heads):
    """`[B, N, heads * D]` -> `[B, heads, N, D]` (a view)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)  # [B, N, H*D] -> [B, H, N, D]


def merge_heads(x):
    """`[B, heads, N, D]` -> `[B, N, heads * D]`."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # [B, H, N, D] -> [B, N, H*D]


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (LDM `Upsample`, both models).

    `size` overrides the 2x target so a UNet can match an odd-sized skip connection
    (as diffusers' `forward_upsample_size` does); for exact sizes both give the same result.
    """

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [B, C, h, w] -> [B, C, 2h, 2w]
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")  # [B, C, h, w] -> [B, C, *size]
        return self.conv(x)


__all__ = ["norm", "Conv2d", "channels_last", "same_layout", "key_indices", "split_heads",
           "merge_heads", "Upsample"]
