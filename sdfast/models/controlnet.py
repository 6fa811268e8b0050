"""ControlNet (Zhang et al. 2023), named after the original `cldm.ControlNet` checkpoint keys
(`control_model.*`): a trainable copy of the UNet's encoder (time_embed, input_blocks,
middle_block) that also reads a conditioning image through `input_hint_block`, and returns one
residual per UNet skip connection (`zero_convs`) plus one for the middle block
(`middle_block_out`), which `UNetModel.forward(..., control=...)` adds.
"""
from dataclasses import dataclass, replace

import torch
from torch import nn

from .layers import Conv2d, channels_last
from .unet import (TimestepEmbedSequential, UNetConfig, build_input_blocks, build_middle_block,
                   timestep_embedding)

# input_hint_block: conv 3x3 layers (out channels, stride) with SiLU between them; the last
# maps to model_channels and starts at zero. Indices as in cldm (SiLUs at the odd places).
_HINT_LAYERS = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))


@dataclass(frozen=True)
class ControlNetConfig:
    """The UNet encoder's config plus the hint image's channel count."""

    unet: UNetConfig
    hint_channels: int = 3

    @classmethod
    def detect_from_weights(cls, sd, num_heads=None, head_dim=None):
        """From a ControlNet state dict with cldm keys (no `control_model.` prefix). The UNet
        config is read as for a UNet; the decoder is absent, so the levels come from the
        input blocks."""
        if "input_hint_block.0.weight" not in sd:
            raise ValueError("not a ControlNet state dict: no 'input_hint_block.0.weight'")
        unet = UNetConfig.detect_from_weights(sd, num_heads=num_heads, head_dim=head_dim,
                                              encoder_only=True)
        return cls(unet, hint_channels=int(sd["input_hint_block.0.weight"].shape[1]))


def _zero_conv(channels):
    return TimestepEmbedSequential(Conv2d(channels, channels, 1))


class ControlNetModel(nn.Module):
    """`forward(x, hint, timesteps, context) -> list of residuals` (len(input_blocks) + 1).

    x `[B, Cin, h, w]` latents, hint `[B, 3, 8h, 8w]` the control image in 0..1, timesteps `[B]`,
    context `[B, M, C]`."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        cfg = config.unet
        mc, emb_dim = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        layers, ch = [], config.hint_channels
        for out, stride in _HINT_LAYERS:
            layers += [Conv2d(ch, out, 3, stride=stride, padding=1), nn.SiLU()]
            ch = out
        layers.append(Conv2d(ch, mc, 3, padding=1))
        self.input_hint_block = TimestepEmbedSequential(*layers)
        self.input_blocks, chans = build_input_blocks(cfg)
        self.zero_convs = nn.ModuleList(_zero_conv(c) for c in chans)
        self.middle_block = build_middle_block(cfg, chans[-1])
        self.middle_block_out = _zero_conv(chans[-1])

    def zero_init_(self):
        """Zero the hint block's last conv and every zero conv (a fresh ControlNet)."""
        for conv in [self.input_hint_block[-1], *(z[0] for z in self.zero_convs), self.middle_block_out[0]]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        return self

    def forward(self, x, hint, timesteps, context):
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.unet.model_channels).to(dtype))
        guided = self.input_hint_block(channels_last(hint.to(dtype)), emb, context)   # [B, mc, h, w]
        outs = []
        h = channels_last(x)
        for index, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + guided
            outs.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


def controlnet_config_from_unet(unet_config, hint_channels=3):
    """A ControlNet config for a UNet (its encoder's copy): ControlNets read 4 latent channels
    even for inpainting UNets."""
    return ControlNetConfig(replace(unet_config, in_channels=4), hint_channels)


__all__ = ["ControlNetConfig", "ControlNetModel", "controlnet_config_from_unet"]
