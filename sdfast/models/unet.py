"""The Stable Diffusion 1.x / 2.x UNet with LDM attribute names.

Follows `UNetModel`, `ResBlock`, `Downsample` and `timestep_embedding` of
`ldm/modules/diffusionmodules/openaimodel.py` and `SpatialTransformer`, `BasicTransformerBlock`,
`CrossAttention`, `FeedForward` of `ldm/modules/attention.py` (CompVis/stable-diffusion,
Stability-AI/stablediffusion), configured as in `v1-inference.yaml` / `v2-inference.yaml`.
`state_dict()` keys equal a single-file checkpoint's keys after `model.diffusion_model.`.
ControlNet residuals are added as in `ControlledUnetModel.forward` of lllyasviel/ControlNet
(`cldm/cldm.py`).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdfast.ops import attention
from sdfast.ops.custom import eager

from .layers import (Conv2d, Upsample, channels_last, key_indices, merge_heads, norm, same_layout,
                     split_heads)

# LDM's `Normalize` in attention.py uses eps 1e-6; `normalization` (GroupNorm32) keeps 1e-5.
_TRANSFORMER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of an LDM UNet; the defaults are SD1.5 (`v1-inference.yaml`).

    `attention_levels` are the indices into `channel_mult` whose blocks carry a
    SpatialTransformer (LDM's `attention_resolutions` 4, 2, 1 are levels 0, 1, 2).
    Set at most one of `num_heads` (fixed head count, SD1: 8) and `head_dim` (fixed head width,
    SD2: 64); with neither, the rule `use_linear_in_transformer -> head_dim 64, else num_heads 8`
    applies, since the head split cannot be read from the weights.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    num_heads: int | None = None
    head_dim: int | None = None
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(sorted(self.attention_levels)))
        if self.num_heads is not None and self.head_dim is not None:
            raise ValueError("set only one of num_heads / head_dim "
                             f"(got num_heads={self.num_heads}, head_dim={self.head_dim})")
        if self.num_heads is None and self.head_dim is None:
            if self.use_linear_in_transformer:
                object.__setattr__(self, "head_dim", 64)
            else:
                object.__setattr__(self, "num_heads", 8)
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {len(self.channel_mult)} levels")

    @property
    def time_embed_dim(self):
        return 4 * self.model_channels

    def heads(self, channels):
        """`(num_heads, head_dim)` of a SpatialTransformer over `channels` channels."""
        if self.num_heads is not None:
            heads, dim_head = self.num_heads, channels // self.num_heads
        else:
            heads, dim_head = channels // self.head_dim, self.head_dim
        if heads * dim_head != channels:
            raise ValueError(f"{channels} channels do not split into heads with num_heads="
                             f"{self.num_heads}, head_dim={self.head_dim}")
        return heads, dim_head

    @classmethod
    def detect_from_weights(cls, sd, num_heads=None, head_dim=None, encoder_only=False):
        """Read the config from an LDM UNet state dict (prefix `model.diffusion_model.` stripped).
        `encoder_only`: the dict has no decoder (a ControlNet's copy of the encoder); the output
        channels are then taken equal to the input channels.

        Only shapes are read, so meta tensors or lazy safetensors slices with `.shape` work.
        `num_heads` / `head_dim` override the head rule (see the class docstring).
        """
        if "input_blocks.0.0.weight" not in sd:
            raise ValueError("not an LDM UNet state dict: no 'input_blocks.0.0.weight' "
                             "(strip the 'model.diffusion_model.' prefix first)")
        if any(key.startswith("label_emb.") for key in sd):
            raise ValueError("class-conditioned UNets (label_emb: SDXL, upscalers) are not supported")
        model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]  # [mc, Cin, 3, 3]
        n_in = len(key_indices(sd, "input_blocks."))
        downs = [i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in sd]
        num_res_blocks = downs[0] - 1 if downs else n_in - 1
        levels = len(downs) + 1
        blocks = levels * (num_res_blocks + 1)
        n_out = blocks if encoder_only else len(key_indices(sd, "output_blocks."))
        if (n_in, n_out) != (blocks, blocks):
            raise ValueError("UNets with a different number of res blocks per level are not supported")
        firsts = [1 + lv * (num_res_blocks + 1) for lv in range(levels)]
        mult = [sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // model_channels for i in firsts]
        attn_levels = [lv for lv, i in enumerate(firsts) if f"input_blocks.{i}.1.proj_in.weight" in sd]
        prefixes = [f"input_blocks.{firsts[lv]}.1." for lv in attn_levels] + ["middle_block.1."]
        depths = {len(key_indices(sd, p + "transformer_blocks.")) for p in prefixes}
        if len(depths) != 1:
            raise ValueError(f"UNets with per-level transformer depths {sorted(depths)} are not supported")
        out_channels = in_channels if encoder_only else sd["out.2.weight"].shape[0]
        return cls(in_channels=int(in_channels), out_channels=int(out_channels),
                   model_channels=int(model_channels), channel_mult=tuple(mult),
                   num_res_blocks=num_res_blocks, attention_levels=tuple(attn_levels),
                   transformer_depth=depths.pop(),
                   context_dim=int(sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]),
                   use_linear_in_transformer=sd["middle_block.1.proj_in.weight"].ndim == 2,
                   num_heads=num_heads, head_dim=head_dim)


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding `[B]` -> `[B, dim]` (cos half first), computed in float32.

    LDM `openaimodel.timestep_embedding` (repeat_only=False); timesteps may be fractional.
    The frequencies are computed here, not stored, so they are no checkpoint key.
    """
    half = dim // 2
    steps = torch.arange(half, device=timesteps.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = timesteps.float()[:, None] * freqs[None]  # [B] -> [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, half] -> [B, 2*half]
    return F.pad(emb, (0, dim % 2))  # [B, 2*half] -> [B, dim]


class ResBlock(nn.Module):
    """LDM `ResBlock` (no scale-shift norm, no up/down): conv(silu(norm(x))) with the
    timestep embedding added before the second norm, plus a 1x1-conv or identity skip."""

    def __init__(self, channels, emb_channels, out_channels, groups):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Index 2 is LDM's Dropout slot (no weights), kept so the conv stays `out_layers.3`.
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Identity(),
                                        Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers[2](norm(self.in_layers[0], x, silu=True))  # [B, Cin, h, w] -> [B, C, h, w]
        e = self.emb_layers(emb)  # [B, E] -> [B, C]
        # the skip is added in the conv's epilogue: skip + (conv + bias)
        return self.out_layers[3](norm(self.out_layers[0], h, silu=True, add=e),
                                  add=self.skip_connection(x))


class Downsample(nn.Module):
    """LDM `Downsample` with conv: 3x3, stride 2, padding 1."""

    def __init__(self, channels):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)  # [B, C, h, w] -> [B, C, ceil(h/2), ceil(w/2)]


class CrossAttention(nn.Module):
    """LDM `CrossAttention`: bias-free q/k/v projections, `heads` heads of `dim_head`."""

    def __init__(self, query_dim, context_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # LDM's Dropout at index 1 has no weights; the projection stays `to_out.0`.
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(self, x, context=None, kv=None):
        """`kv`: `self.keys_values(context)` computed once for several calls on parts of `x`
        (`context` is then not read)."""
        q = split_heads(self.to_q(x), self.heads)  # [B, N, C] -> [B, H, N, D]
        k, v = self.keys_values(x if context is None else context) if kv is None else kv
        return self.to_out(merge_heads(attention(q, k, v)))  # [B, H, N, D] -> [B, N, C]

    def keys_values(self, ctx):
        """Keys and values `[B, H, M, D]` of the tokens `ctx` `[B, M, Cc]`."""
        return split_heads(self.to_k(ctx), self.heads), split_heads(self.to_v(ctx), self.heads)


class GEGLU(nn.Module):
    """LDM `GEGLU`: a linear to twice the width, one half gating the other through GELU."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)  # [B, N, C] -> 2 x [B, N, dim_out]
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """LDM gated `FeedForward` (glu=True, mult 4): keys `net.0.proj`, `net.2`."""

    def __init__(self, dim, mult=4):
        super().__init__()
        # Index 1 is LDM's Dropout slot (no weights).
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """LDM `BasicTransformerBlock`: pre-norm self-attention, cross-attention, feed-forward."""

    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        tokens = _row_chunk(x)
        if tokens is None:
            return self._row_local(x, context)
        out = torch.empty_like(x)
        kv = self.attn2.keys_values(context)  # the context's keys and values: once, not per chunk
        for i in range(0, x.shape[1], tokens):
            out[:, i:i + tokens] = self._row_local(x[:, i:i + tokens], context, kv)
        return out

    def _row_local(self, x, context, kv=None):
        """The part of the block where each token needs only itself (and the context)."""
        x = x + self.attn2(self.norm2(x), context, kv=kv)
        return x + self.ff(self.norm3(x))


# Rows (batch x tokens) per chunk of a transformer block's row-local part (cross-attention and
# feed-forward) in CPU inference: the chunk's intermediates, up to 10 KB a row in the
# feed-forward, stay in the core's L2 cache instead of streaming through memory.
ROW_CHUNK_ROWS = 512


def _row_chunk(x):
    """Tokens per chunk for `x` `[B, N, C]`, or None to run the block's rows whole (GPU,
    training, tracing and export, or too few tokens to gain)."""
    tokens = max(16, ROW_CHUNK_ROWS // x.shape[0])
    if (x.device.type != "cpu" or x.shape[1] < 2 * tokens or not eager(x)
            or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        return None
    return tokens


class SpatialTransformer(nn.Module):
    """LDM `SpatialTransformer`: GroupNorm, 1x1-conv (SD1) or linear (SD2) projection in,
    `depth` transformer blocks over the `h*w` tokens, projection out, residual."""

    def __init__(self, channels, heads, dim_head, depth, context_dim, use_linear, groups):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=_TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(channels, inner) if use_linear else Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, _, h, w = x.shape
        y = norm(self.norm, x)
        if not self.use_linear:
            y = self.proj_in(y)  # [B, C, h, w] -> [B, inner, h, w]
        y = y.flatten(2).transpose(1, 2)  # [B, C', h, w] -> [B, h*w, C']
        if self.use_linear:
            y = self.proj_in(y)  # [B, h*w, C] -> [B, h*w, inner]
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = self.proj_out(y)  # [B, h*w, inner] -> [B, h*w, C]
        y = y.transpose(1, 2).reshape(b, -1, h, w)  # [B, h*w, C'] -> [B, C', h, w]
        if not self.use_linear:
            y = self.proj_out(y)  # [B, inner, h, w] -> [B, C, h, w]
        return x + y


class TimestepEmbedSequential(nn.Sequential):
    """LDM's `TimestepEmbedSequential`: hands `emb` to ResBlocks, `context` to transformers
    and the target size of the next skip connection to Upsample."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def _transformer(cfg, channels):
    heads, dim_head = cfg.heads(channels)
    return SpatialTransformer(channels, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                              cfg.use_linear_in_transformer, cfg.norm_groups)


def build_input_blocks(cfg):
    """LDM `input_blocks` and the channel count of each block's output (the skips)."""
    blocks = nn.ModuleList([TimestepEmbedSequential(
        Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1))])
    chans = [cfg.model_channels]
    ch = cfg.model_channels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, cfg.time_embed_dim, mult * cfg.model_channels, cfg.norm_groups)]
            ch = mult * cfg.model_channels
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, ch))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            chans.append(ch)
    return blocks, chans


def build_middle_block(cfg, ch):
    """LDM `middle_block`: ResBlock, SpatialTransformer, ResBlock at `ch` channels."""
    return TimestepEmbedSequential(
        ResBlock(ch, cfg.time_embed_dim, ch, cfg.norm_groups), _transformer(cfg, ch),
        ResBlock(ch, cfg.time_embed_dim, ch, cfg.norm_groups))


def build_output_blocks(cfg, chans):
    """LDM `output_blocks`, consuming the skip channel counts `chans` from the end."""
    chans = list(chans)
    blocks = nn.ModuleList()
    ch = chans[-1]
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            out = cfg.model_channels * mult
            layers = [ResBlock(ch + chans.pop(), cfg.time_embed_dim, out, cfg.norm_groups)]
            ch = out
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, ch))
            if level and i == cfg.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(TimestepEmbedSequential(*layers))
    return blocks


class UNetModel(nn.Module):
    """The SD1.x / SD2.x denoiser: `forward(x, timesteps, context, control=None)`.

    x `[B, Cin, h, w]`, timesteps `[B]` (float, may be fractional), context `[B, M, context_dim]`
    (any M, e.g. a multiple of 77 for long prompts); returns `[B, Cout, h, w]`. Any latent size
    works: upsampling targets each skip connection's size, as diffusers does for odd sizes.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        mc, emb_dim = config.model_channels, config.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks, chans = build_input_blocks(config)
        self.middle_block = build_middle_block(config, chans[-1])
        self.output_blocks = build_output_blocks(config, chans)
        self.out = nn.Sequential(nn.GroupNorm(config.norm_groups, mc), nn.SiLU(),
                                 Conv2d(mc, config.out_channels, 3, padding=1))

    def forward(self, x, timesteps, context, control=None):
        """`control`: optional ControlNet residuals, one per input block (added to the skip
        connections in input-block order) and a last one added to the middle block's output."""
        return self._run(x, timesteps, context, control)[0]

    def forward_with_cache(self, x, timesteps, context, control=None, depth=1, deep=None):
        """The UNet split for step caching (DeepCache, Ma et al. 2023): returns `(out, deep)`.

        Without `deep` it runs the whole UNet and also returns the deep feature: the tensor
        entering `output_blocks[-depth]` (before its skip is concatenated). With `deep` it runs
        only the shallow branch, `input_blocks[:depth]` and `output_blocks[-depth:]`, on that
        feature (time embedding and `out` included); `control` then adds its residuals to the
        skips that branch computes (the deep ones are part of `deep`). With the inputs that
        made `deep`, the shallow branch returns exactly the whole UNet's output.
        """
        if not 1 <= depth <= len(self.input_blocks):
            raise ValueError(f"depth must be in 1..{len(self.input_blocks)}, got {depth}")
        return self._run(x, timesteps, context, control, depth, deep)

    def _run(self, x, timesteps, context, control, depth=None, deep=None):
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.config.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # [B, mc] -> [B, 4*mc]
        n_in = len(self.input_blocks) if deep is None else depth
        hs = []
        h = channels_last(x)
        for block in self.input_blocks[:n_in]:
            h = block(h, emb, context)
            hs.append(h)
        if deep is None:
            h = self.middle_block(h, emb, context)
        if control is not None:
            hs, h = _add_control(hs, h, control, len(self.input_blocks), shallow=deep is not None)
        blocks = self.output_blocks
        if deep is not None:
            h, blocks = deep, blocks[len(blocks) - depth:]
        kept = None
        for index, block in enumerate(blocks, start=len(self.output_blocks) - len(blocks)):
            if depth is not None and index == len(self.output_blocks) - depth:
                kept = h
            h = torch.cat([h, hs.pop()], dim=1)  # [B, C, h, w] -> [B, C + Cskip, h, w]
            h = block(h, emb, context, size=hs[-1].shape[-2:] if hs else None)
        out = self.out[2](norm(self.out[0], h, silu=True))  # [B, mc, h, w] -> [B, Cout, h, w]
        return same_layout(out, x), kept


def _add_control(hs, h, control, n_in, shallow=False):
    """LDM ControlNet: `control[i]` joins skip `i`, `control[-1]` the middle block output.
    `shallow`: only the skips in `hs` (the first ones) get theirs; `h` is left alone."""
    if len(control) != n_in + 1:
        raise ValueError(f"control needs {n_in + 1} residuals ({n_in} input blocks and the "
                         f"middle block), got {len(control)}")
    hs = [skip + c for skip, c in zip(hs, control)]
    return hs, h if shallow else h + control[-1]


__all__ = ["UNetConfig", "UNetModel", "timestep_embedding", "ResBlock", "Downsample",
           "SpatialTransformer", "TimestepEmbedSequential", "build_input_blocks",
           "build_middle_block", "build_output_blocks"]
