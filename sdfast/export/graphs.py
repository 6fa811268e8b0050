"""The exported stages as traceable modules, with their input/output names and dynamic axes.

Each graph wraps one of sdfast's own models and computes exactly what the torch runtime
computes (`sdfast.ops` runs its pure-torch reference while torch.onnx traces, so the graph holds
standard ONNX operators). Names and layouts, shared by every backend:

    text_encoder  input_ids [N, T] int64, clip_skip [] int64, inputs_embeds [N, T, W],
                  embeds_mask [N, T] bool  ->  hidden_states [N, T, W]
        A1111's clip skip is an input (every block runs; the chosen block's output gets the
        final LayerNorm). Where `embeds_mask` is true the row of `inputs_embeds` replaces the
        token embedding (textual inversion); pass zeros and False otherwise. T <= 77.
    unet          sample [B, Cin, h, w], timestep [B] float32, context [B, 77k, C]
                  [, control_0 .. control_n (ControlNet residuals)]  ->  model_output [B, 4, h, w]
    vae_decoder   latent [B, 4, h, w] (unscaled: divide by vae_scale first)  ->  image [B, 3, 8h, 8w]
    vae_encoder   image [B, 3, H, W] in [-1, 1]  ->  moments [B, 8, H/8, W/8] (mean, log-variance)
    controlnet    sample [B, 4, h, w], hint [B, 3, 8h, 8w] in 0..1, timestep [B], context
                  ->  control_0 .. control_n (the UNet's residual inputs)

Batch, height, width and sequence are dynamic (symbolic names in `dynamic_axes`); latent sizes
need not be multiples of 8 (the UNet upsamples to each skip's size).
"""
import torch
from torch import nn

# The ControlNet residual of input block i lives at the resolution of its level: the number of
# downsamplers before it. `residual_specs` lists (channels, downsamplings) per residual.


def residual_specs(unet_config):
    """`[(channels, downsamplings)]` of the UNet's ControlNet residual inputs, input-block
    order, then the middle block's (the shapes `sdfast.models.unet._add_control` adds)."""
    from ..models.unet import build_input_blocks

    with torch.device("meta"):
        _, chans = build_input_blocks(unet_config)
    specs, down = [(chans[0], 0)], 0
    index = 1
    for level in range(len(unet_config.channel_mult)):
        for _ in range(unet_config.num_res_blocks):
            specs.append((chans[index], down))
            index += 1
        if level != len(unet_config.channel_mult) - 1:
            down += 1
            specs.append((chans[index], down))
            index += 1
    specs.append((chans[-1], down))
    return specs


def control_names(count):
    return [f"control_{i}" for i in range(count)]


class TextEncoderGraph(nn.Module):
    """An `sdfast.models.clip` text encoder with clip skip and embedding overrides as inputs."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder
        if hasattr(text_encoder, "text_model"):                          # SD1 CLIP
            tm = text_encoder.text_model
            self._parts = (tm.embeddings.token_embedding, lambda: tm.embeddings.position_embedding.weight,
                           list(tm.encoder.layers), tm.final_layer_norm)
        else:                                                            # SD2 OpenCLIP
            te = text_encoder
            blocks = list(te.transformer.resblocks)
            run = len(blocks) - te.config.skip_last_layers
            self._parts = (te.token_embedding, lambda: te.positional_embedding, blocks[:run],
                           te.ln_final)

    @property
    def blocks(self):
        return len(self._parts[2])

    def forward(self, input_ids, clip_skip, inputs_embeds, embeds_mask):
        token_embedding, positions, blocks, final_norm = self._parts
        x = token_embedding(input_ids)                                  # [N, T] -> [N, T, W]
        x = torch.where(embeds_mask.unsqueeze(-1), inputs_embeds.to(x.dtype), x)
        x = x + positions()[: x.shape[1]]
        states = []
        for block in blocks:
            x = block(x)
            states.append(x)
        chosen = torch.stack(states)[len(states) - clip_skip]           # [L, N, T, W] -> [N, T, W]
        return final_norm(chosen)

    def example(self, dtype):
        width = self._parts[0].weight.shape[1]
        ids = torch.randint(1, 1000, (2, 77))
        return (ids, torch.tensor(1), torch.zeros(2, 77, width, dtype=dtype),
                torch.zeros(2, 77, dtype=torch.bool))

    input_names = ["input_ids", "clip_skip", "inputs_embeds", "embeds_mask"]
    output_names = ["hidden_states"]
    dynamic_axes = {"input_ids": {0: "batch", 1: "tokens"},
                    "inputs_embeds": {0: "batch", 1: "tokens"},
                    "embeds_mask": {0: "batch", 1: "tokens"},
                    "hidden_states": {0: "batch", 1: "tokens"}}


class UNetGraph(nn.Module):
    """The UNet, optionally with one input per ControlNet residual."""

    def __init__(self, unet, control_inputs=False):
        super().__init__()
        self.unet = unet
        self.controls = len(residual_specs(unet.config)) if control_inputs else 0

    def forward(self, sample, timestep, context, *control):
        return self.unet(sample, timestep, context, control=list(control) if control else None)

    def example(self, dtype):
        cfg = self.unet.config
        h, w = 16, 12
        out = [torch.randn(2, cfg.in_channels, h, w, dtype=dtype), torch.tensor([500.0, 20.0]),
               torch.randn(2, 154, cfg.context_dim, dtype=dtype)]
        for channels, down in residual_specs(cfg)[:self.controls]:
            out.append(torch.zeros(2, channels, _down(h, down), _down(w, down), dtype=dtype))
        return tuple(out)

    @property
    def input_names(self):
        return ["sample", "timestep", "context", *control_names(self.controls)]

    output_names = ["model_output"]

    @property
    def dynamic_axes(self):
        axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                "context": {0: "batch", 1: "sequence"},
                "model_output": {0: "batch", 2: "height", 3: "width"}}
        specs = residual_specs(self.unet.config)
        for name, (_, down) in zip(control_names(self.controls), specs):
            axes[name] = {0: "batch", 2: f"height_{down}", 3: f"width_{down}"}
        return axes


def _down(size, times):
    """A side after `times` stride-2 convolutions with padding 1 (ceil halving)."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


class VAEDecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent)

    def example(self, dtype):
        return (torch.randn(1, self.vae.config.embed_dim, 8, 6, dtype=dtype),)

    input_names = ["latent"]
    output_names = ["image"]
    dynamic_axes = {"latent": {0: "batch", 2: "height", 3: "width"},
                    "image": {0: "batch", 2: "image_height", 3: "image_width"}}


class VAEEncoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        dist = self.vae.encode(image)
        return torch.cat([dist.mean, dist.logvar], dim=1)      # [B, 2E, h, w]

    def example(self, dtype):
        return (torch.randn(1, self.vae.config.in_channels, 64, 48, dtype=dtype),)

    input_names = ["image"]
    output_names = ["moments"]
    dynamic_axes = {"image": {0: "batch", 2: "image_height", 3: "image_width"},
                    "moments": {0: "batch", 2: "height", 3: "width"}}


class ControlNetGraph(nn.Module):
    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet
        self.outputs = len(residual_specs(controlnet.config.unet))

    def forward(self, sample, hint, timestep, context):
        return tuple(self.controlnet(sample, hint, timestep, context))

    def example(self, dtype):
        cfg = self.controlnet.config
        return (torch.randn(2, 4, 16, 12, dtype=dtype),
                torch.rand(2, cfg.hint_channels, 128, 96, dtype=dtype),
                torch.tensor([500.0, 20.0]), torch.randn(2, 154, cfg.unet.context_dim, dtype=dtype))

    input_names = ["sample", "hint", "timestep", "context"]

    @property
    def output_names(self):
        return control_names(self.outputs)

    @property
    def dynamic_axes(self):
        axes = {"sample": {0: "batch", 2: "height", 3: "width"},
                "hint": {0: "batch", 2: "image_height", 3: "image_width"},
                "timestep": {0: "batch"}, "context": {0: "batch", 1: "sequence"}}
        for name, (_, down) in zip(self.output_names, residual_specs(self.controlnet.config.unet)):
            axes[name] = {0: "batch", 2: f"height_{down}", 3: f"width_{down}"}
        return axes


__all__ = ["TextEncoderGraph", "UNetGraph", "VAEDecoderGraph", "VAEEncoderGraph",
           "ControlNetGraph", "residual_specs", "control_names"]
