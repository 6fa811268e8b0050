"""Random diffusers UNets and VAEs at SD1.5 / SD2.1 / small shapes, the reference models of
the parity tests (shared by tests/test_unet.py, tests/test_vae.py and pipeline tests).

Configs are diffusers keyword arguments: SD1.5 and SD2.1 copy the `unet/config.json` and
`vae/config.json` of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
(shape-relevant entries; the rest are diffusers' defaults, which equal those files).
Nothing here downloads weights: every model is built with seeded random weights.
"""
import copy

import torch

_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

UNET_CONFIGS = {
    "sd15": dict(in_channels=4, out_channels=4, down_block_types=_DOWN, up_block_types=_UP,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(in_channels=4, out_channels=4, down_block_types=_DOWN, up_block_types=_UP,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True),
    # Small SD1-style: conv projections, 8 heads, attention at levels 0 and 1 (so one upsampler
    # sits after a transformer, one after a plain res block), one res block per level.
    "small": dict(in_channels=4, out_channels=4,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64,
                  attention_head_dim=8),
    # Small SD2-style: linear projections, head width 16, two transformer blocks per level,
    # two res blocks, 8 norm groups.
    "small_linear": dict(in_channels=4, out_channels=4,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                         block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=48,
                         attention_head_dim=(2, 4), use_linear_projection=True,
                         transformer_layers_per_block=2, norm_num_groups=8),
}
# Inpainting UNets differ only in their 9 input channels (latent, mask, masked-image latent).
UNET_CONFIGS["sd15_inpaint"] = dict(UNET_CONFIGS["sd15"], in_channels=9)
UNET_CONFIGS["small_inpaint"] = dict(UNET_CONFIGS["small"], in_channels=9)

VAE_CONFIGS = {
    "sd": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4),
    # Four levels like SD (latents 1/8 of the image): a channel change (nin_shortcut),
    # identity skips, three resamplings.
    "small": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8),
}


def randomize_norms_(model, generator):
    """Give every GroupNorm / LayerNorm random affine parameters (diffusers initialises them
    to ones and zeros, which would hide a key map that swaps two norms)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
            with torch.no_grad():
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
    return model


def make_unet(name, seed=0, device=None):
    """A diffusers `UNet2DConditionModel` from `UNET_CONFIGS[name]`; random weights from `seed`
    unless `device="meta"` (shapes only). Returned in eval mode."""
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, UNET_CONFIGS[name], seed, device)


def make_vae(name, seed=0, device=None):
    """A diffusers `AutoencoderKL` from `VAE_CONFIGS[name]` (see `make_unet`)."""
    from diffusers import AutoencoderKL

    return _build(AutoencoderKL, VAE_CONFIGS[name], seed, device)


def _build(cls, config, seed, device):
    if device == "meta":
        with torch.device("meta"):
            return cls(**config).eval()
    torch.manual_seed(seed)
    model = cls(**config)
    randomize_norms_(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def float64_copy(model):
    """A float64 deep copy (the high-precision reference of the earned tolerance)."""
    return copy.deepcopy(model).double()


# The cpu backend's 3x3 convolutions (Winograd F(4x4, 3x3)) round more than the direct
# convolution: tests/test_conv.py asserts their rms error at SD channel counts is at most this
# many times the direct fp32 convolution's (measured: up to 6x against oneDNN's NCHW
# convolution, 1-3x against its channels-last one). A model's output error is the sum of its
# ops' propagated errors, so a model running them may be this many times as far from float64 as
# the reference's fp32 run (measured on the test models and SD1.5: 2.5-3.3x).
WINOGRAD_ERROR_FACTOR = 8


def earned_error(out, ref32, ref64, ulps=4, factor=2):
    """flash-attention-style tolerance: returns `(err, bound)` with `err = max|out - ref64|`
    and `bound = factor * max|ref32 - ref64| + atol`, i.e. our fp32 result may be at most
    `factor` (by default twice) as far from the float64 reference as the reference's own fp32
    run, plus `ulps` fp32 ulps of the output's magnitude (atol for outputs where the reference
    happens to round exactly). Models whose convolutions may run Winograd pass
    `factor=WINOGRAD_ERROR_FACTOR`."""
    ref64 = ref64.double()
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref32.double() - ref64).abs().max().item()
    atol = ulps * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    return err, factor * ref_err + atol
