"""`sdfast.accelerate(pipe)`: sdfast's fused ops inside an existing diffusers pipeline.

Only the given instances change; diffusers' classes and every other instance stay as they are
(no module-level patching):

- `ResnetBlock2D` (time_embedding_norm "default", SiLU non-linearity, GroupNorms): its instance
  `forward` becomes `_resnet_forward`, which runs norm1 + SiLU as one `sdfast.ops.group_norm`
  and the time-embedding add + norm2 + SiLU as another (the add sits exactly before norm2 in
  diffusers' block);
- `conv_norm_out` + `conv_act` of `UNet2DConditionModel` and of the VAE's `Encoder` / `Decoder`
  (a GroupNorm applied right before a SiLU, the SiLU used nowhere else): the norm's instance
  `forward` does both, the SiLU's instance `forward` passes its input through;
- every other `nn.GroupNorm` (transformer input norms, the VAE attention's norm, ...): its
  instance `forward` calls `sdfast.ops.group_norm`;
- every `nn.Conv2d` with groups and dilation 1 and numeric zero padding (all of SD's): its
  instance `forward` calls `sdfast.ops.conv2d` (on the cpu backend, Winograd for 3x3 stride 1);
- `Attention` modules whose processor is diffusers' `AttnProcessor2_0` (the default on torch 2)
  or `AttnProcessor` with the default scale: `attn.set_processor(SdfastAttnProcessor())`, which
  computes what AttnProcessor2_0 computes with `sdfast.ops.attention` (scaled dot-product
  attention with scale 1/sqrt(head_dim), as AttnProcessor2_0 uses). Other processors (IP-Adapter,
  LoRA, custom ones) are left in place and counted as skipped.

`accelerate(...)` returns an `Accelerated` handle: `.counts` says what changed and `.undo()`
restores every instance (so does `accelerate(pipe, undo=True)`, which needs no handle: the
changes are recognisable on the instances).
"""
import types

import torch
import torch.nn.functional as F

from . import ops
from .errors import SdfastError
from .models.layers import plain_conv

_COMPONENTS = ("unet", "vae", "controlnet")


class SdfastAttnProcessor:
    """diffusers' `AttnProcessor2_0` with `sdfast.ops.attention` as the attention kernel.
    A call with an attention mask (sdfast's op has none) runs torch's SDPA with the mask,
    exactly as AttnProcessor2_0 does. `previous` is the processor it replaced."""

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # [B, C, h, w] -> [B, hw, C]
        batch, length, _ = (hidden_states if encoder_hidden_states is None
                            else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, N, H*D] -> [B, H, N, D]
                   for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attention_mask is None:
            out = ops.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))                     # projection, dropout
        if image:
            out = out.transpose(-1, -2).reshape(b, c, h, w)            # [B, hw, C] -> [B, C, h, w]
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _norm(module, x, silu=False, add=None):
    return ops.group_norm(x, module.num_groups, module.weight, module.bias, module.eps,
                          silu=silu, add=add)


def _group_norm_forward(self, x):
    return _norm(self, x)


def _group_norm_silu_forward(self, x):
    return _norm(self, x, silu=True)


def _identity_forward(self, x):
    return x


def _conv_forward(self, x):
    return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding)


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers `ResnetBlock2D.forward` (time_embedding_norm "default") with fused norms."""
    h = _norm(self.norm1, input_tensor, silu=True)
    if self.upsample is not None:
        if h.shape[0] >= 64:                 # diffusers' guard for nearest-upsampling of NHWC
            input_tensor, h = input_tensor.contiguous(), h.contiguous()
        input_tensor, h = self.upsample(input_tensor), self.upsample(h)
    elif self.downsample is not None:
        input_tensor, h = self.downsample(input_tensor), self.downsample(h)
    h = self.conv1(h)
    add = None
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        add = self.time_emb_proj(temb)       # [B, C], added before norm2
    elif temb is not None:
        add = temb
    h = self.conv2(self.dropout(_norm(self.norm2, h, silu=True, add=add)))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + h) / self.output_scale_factor


_FORWARDS = (_group_norm_forward, _group_norm_silu_forward, _identity_forward, _resnet_forward,
             _conv_forward)


class Accelerated:
    """What `accelerate` changed; `undo()` puts every instance back as it was."""

    def __init__(self, modules):
        self.modules = modules
        self.counts = {"resnet": 0, "group_norm_silu": 0, "group_norm": 0, "attention": 0,
                       "attention_skipped": 0, "conv": 0}

    def undo(self):
        """Restore every changed instance; returns the number of instances restored."""
        return _undo(self.modules)


def accelerate(pipe, undo=False):
    """Swap sdfast's ops into a diffusers `StableDiffusionPipeline` (its `unet`, `vae` and, when
    present, `controlnet`) or into a bare diffusers model (`UNet2DConditionModel`,
    `AutoencoderKL`, ...), in place. Returns an `Accelerated` handle (see the module docstring).
    `undo=True` reverses an earlier call instead and returns the number of instances restored."""
    modules = _modules_of(pipe)
    if undo:
        return _undo(modules)
    handle = Accelerated(modules)
    for module in modules:
        for child in module.modules():
            _swap_fused_pair(child, handle.counts)
        for child in module.modules():
            _swap_one(child, handle.counts)
    return handle


def _modules_of(pipe):
    if isinstance(pipe, torch.nn.Module):
        return [pipe]
    found = [getattr(pipe, name, None) for name in _COMPONENTS]
    found = [m for m in found if isinstance(m, torch.nn.Module)]
    if not found:
        raise SdfastError(f"accelerate takes a diffusers pipeline (with a unet or vae) or a "
                          f"torch module, got {type(pipe).__name__}")
    return found


def _set_forward(module, fn):
    module.forward = types.MethodType(fn, module)


def _ours(module):
    fn = module.__dict__.get("forward")
    return fn is not None and getattr(fn, "__func__", None) in _FORWARDS


def _swap_fused_pair(module, counts):
    """conv_norm_out (GroupNorm) + conv_act (SiLU) of diffusers' UNet and VAE coders."""
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    if not isinstance(module, (UNet2DConditionModel, Encoder, Decoder)):
        return
    norm, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
    if type(norm) is torch.nn.GroupNorm and type(act) is torch.nn.SiLU and not _ours(norm):
        _set_forward(norm, _group_norm_silu_forward)
        _set_forward(act, _identity_forward)
        counts["group_norm_silu"] += 1


def _swap_one(module, counts):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    if _ours(module):
        return
    if type(module) is ResnetBlock2D:
        if (module.time_embedding_norm == "default" and type(module.nonlinearity) is torch.nn.SiLU
                and type(module.norm1) is torch.nn.GroupNorm
                and type(module.norm2) is torch.nn.GroupNorm):
            _set_forward(module, _resnet_forward)
            counts["resnet"] += 1
    elif type(module) is torch.nn.GroupNorm:
        _set_forward(module, _group_norm_forward)
        counts["group_norm"] += 1
    elif type(module) is torch.nn.Conv2d and plain_conv(module):
        _set_forward(module, _conv_forward)
        counts["conv"] += 1
    elif isinstance(module, Attention):
        processor = module.processor
        default_scale = module.scale == (module.inner_dim // module.heads) ** -0.5
        if type(processor) is AttnProcessor2_0 or (type(processor) is AttnProcessor and default_scale):
            module.set_processor(SdfastAttnProcessor(processor))
            counts["attention"] += 1
        elif not isinstance(processor, SdfastAttnProcessor):
            counts["attention_skipped"] += 1


def _undo(modules):
    restored = 0
    for module in modules:
        for child in module.modules():
            if _ours(child):
                del child.forward
                restored += 1
            processor = getattr(child, "processor", None)
            if isinstance(processor, SdfastAttnProcessor):
                child.set_processor(processor.previous)
                restored += 1
    return restored


__all__ = ["accelerate", "Accelerated", "SdfastAttnProcessor"]
