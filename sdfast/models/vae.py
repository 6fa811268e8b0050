"""The Stable Diffusion KL autoencoder with LDM attribute names.

Follows `Encoder`, `Decoder`, `ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample` of
`ldm/modules/diffusionmodules/model.py`, `AutoencoderKL` of `ldm/models/autoencoder.py` and
`DiagonalGaussianDistribution` of `ldm/modules/distributions/distributions.py`
(CompVis/stable-diffusion), configured as the `first_stage_config` of `v1-inference.yaml`.
`state_dict()` keys equal a single-file checkpoint's keys after `first_stage_model.`.
Latents are NOT scaled here: the pipeline applies the scale factor (0.18215 for SD1/SD2).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdfast.ops import attention

from .layers import Conv2d, Upsample, channels_last, key_indices, norm, same_layout

# LDM `Normalize` in model.py: GroupNorm(32, C, eps=1e-6).
_NORM_EPS = 1e-6
# LDM `DiagonalGaussianDistribution` clamps the log-variance to this range.
_LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of an LDM KL autoencoder (`ddconfig` + `embed_dim`); defaults are SD's.

    Attention sits only in the middle blocks (`attn_resolutions: []` as in every SD VAE).
    """

    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))

    @classmethod
    def detect_from_weights(cls, sd):
        """Read the config from an LDM VAE state dict (prefix `first_stage_model.` stripped).

        Only shapes are read, so meta tensors or lazy safetensors slices with `.shape` work.
        """
        if "encoder.conv_in.weight" not in sd:
            raise ValueError("not an LDM VAE state dict: no 'encoder.conv_in.weight' "
                             "(strip the 'first_stage_model.' prefix first)")
        if any(".attn." in key for key in sd if key.startswith(("encoder.down.", "decoder.up."))):
            raise ValueError("VAEs with attention outside the middle block are not supported")
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]  # [ch, Cin, 3, 3]
        nrb = len(key_indices(sd, "encoder.down.0.block."))
        mult = [sd[f"encoder.down.{lv}.block.{nrb - 1}.conv2.weight"].shape[0] // ch
                for lv in key_indices(sd, "encoder.down.")]
        z_channels = sd["decoder.conv_in.weight"].shape[1]
        if sd["encoder.conv_out.weight"].shape[0] != 2 * z_channels:
            raise ValueError("only KL autoencoders (double_z, mean and log-variance) are supported")
        return cls(ch=int(ch), ch_mult=tuple(mult), num_res_blocks=nrb, z_channels=int(z_channels),
                   embed_dim=int(sd["post_quant_conv.weight"].shape[1]), in_channels=int(in_channels),
                   out_channels=int(sd["decoder.conv_out.weight"].shape[0]))


class ResnetBlock(nn.Module):
    """LDM `ResnetBlock` without timestep embedding (temb_channels=0), 1x1 `nin_shortcut`."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_NORM_EPS)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_NORM_EPS)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Identity() if in_channels == out_channels
                             else Conv2d(in_channels, out_channels, 1))

    def forward(self, x):
        h = self.conv1(norm(self.norm1, x, silu=True))  # [B, Cin, h, w] -> [B, C, h, w]
        # the shortcut is added in the conv's epilogue: shortcut + (conv + bias)
        return self.conv2(norm(self.norm2, h, silu=True), add=self.nin_shortcut(x))


def _tokens(x):
    return x.flatten(2).transpose(1, 2)[:, None]  # [B, C, h, w] -> [B, 1, h*w, C]


class AttnBlock(nn.Module):
    """LDM `AttnBlock`: single-head self-attention over the `h*w` pixels, 1x1-conv projections."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=_NORM_EPS)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = norm(self.norm, x)
        o = attention(_tokens(self.q(y)), _tokens(self.k(y)), _tokens(self.v(y)))
        o = o[:, 0].transpose(1, 2).reshape(b, c, h, w)  # [B, 1, h*w, C] -> [B, C, h, w]
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """LDM VAE `Downsample` with conv: zero-pad right and bottom by one, 3x3 stride 2."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, h, w] -> [B, C, floor(h/2), floor(w/2)]


class MidBlock(nn.Module):
    """`mid`: ResnetBlock, AttnBlock, ResnetBlock."""

    def __init__(self, channels, groups):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder level `down.{i}`: res blocks, then a Downsample except at the last level."""

    def __init__(self, in_channels, out_channels, num_blocks, groups, downsample):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels,
                                               groups) for i in range(num_blocks))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder level `up.{i}`: res blocks, then an Upsample except at level 0."""

    def __init__(self, in_channels, out_channels, num_blocks, groups, upsample):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels,
                                               groups) for i in range(num_blocks))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """LDM `Encoder` (double_z): image `[B, Cin, H, W]` -> moments `[B, 2*z, H/f, W/f]`."""

    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        last = len(chans) - 1
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(([cfg.ch] + chans)[i], c, cfg.num_res_blocks, cfg.norm_groups, i != last)
            for i, c in enumerate(chans))
        self.mid = MidBlock(chans[-1], cfg.norm_groups)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, chans[-1], eps=_NORM_EPS)
        self.conv_out = Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # [B, Cin, H, W] -> [B, ch, H, W]
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(norm(self.norm_out, h, silu=True))  # [B, C, h, w] -> [B, 2z, h, w]


class Decoder(nn.Module):
    """LDM `Decoder`: latent `[B, z, h, w]` -> image `[B, Cout, h*f, w*f]` (no tanh)."""

    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(chans[-1], cfg.norm_groups)
        # `up[i]` is level i, run from the deepest level up; its input comes from level i + 1.
        self.up = nn.ModuleList(
            UpLevel((chans + [chans[-1]])[i + 1], c, cfg.num_res_blocks + 1, cfg.norm_groups, i != 0)
            for i, c in enumerate(chans))
        self.norm_out = nn.GroupNorm(cfg.norm_groups, chans[0], eps=_NORM_EPS)
        self.conv_out = Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # [B, z, h, w] -> [B, C, h, w]
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(norm(self.norm_out, h, silu=True))  # [B, ch, H, W] -> [B, Cout, H, W]


class DiagonalGaussian:
    """LDM `DiagonalGaussianDistribution` over latents: `moments` `[B, 2E, h, w]` split into
    `mean` and `logvar` (clamped to [-30, 20]) along channels."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)  # [B, 2E, h, w] -> 2 x [B, E, h, w]
        self.logvar = logvar.clamp(*_LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """`mean + std * eps`; `eps` is drawn on the generator's device, then moved."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    """LDM `AutoencoderKL`: `encode(x)` -> DiagonalGaussian, `decode(z)` -> image in about
    [-1, 1] (raw, not clamped). No latent scale factor is applied."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x):
        moments = self.quant_conv(self.encoder(channels_last(x)))  # [B, Cin, H, W] -> [B, 2E, h, w]
        return DiagonalGaussian(same_layout(moments, x))

    def decode(self, z):
        image = self.decoder(self.post_quant_conv(channels_last(z)))  # [B, E, h, w] -> [B, Cout, H, W]
        return same_layout(image, z)


__all__ = ["VAEConfig", "AutoencoderKL", "DiagonalGaussian", "Encoder", "Decoder"]
