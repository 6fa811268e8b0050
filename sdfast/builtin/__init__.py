"""sdfast's built-in model: the SD1.5 architecture at small widths, trained from scratch by
`sdfast train finetune` on the procedural shapes dataset (`sdfast.data.shapes`), 64x64 images.

`MODEL_PATH` is the shipped checkpoint (the default model of every command);
`init_checkpoint(path)` writes the random starting point of its training recipe.
"""
from pathlib import Path

import torch

MODEL_NAME = "sdfast-shapes"
MODEL_PATH = Path(__file__).with_name(f"{MODEL_NAME}.safetensors")
RESOLUTION = 64

# SD1.5's classes and layout (4 levels, transformers on the first 3, CLIP text tower, KL VAE
# with an 8x downsampling), at widths that fit 30 MB in fp16 and train on 2 CPU cores.
UNET = dict(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
            attention_levels=(0, 1, 2), context_dim=64, head_dim=32)
VAE = dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
TEXT = dict(width=64, layers=4, heads=1, mlp_width=256)
LOGVAR_INIT = -6.0      # initial VAE posterior log-variance (see init_models)


def resolve_model(path=None):
    """`path` as given, or the built-in model when it is None (the default of every command)."""
    from ..errors import SdfastError

    if path is not None:
        return path
    if not MODEL_PATH.exists():
        raise SdfastError(f"the built-in model is not installed ({MODEL_PATH} is missing); "
                          "pass a model path")
    return str(MODEL_PATH)


def configs():
    from ..models.clip import CLIPTextConfig
    from ..models.unet import UNetConfig
    from ..models.vae import VAEConfig

    return UNetConfig(**UNET), VAEConfig(**VAE), CLIPTextConfig(**TEXT)


def _zero_init_(unet):
    """LDM's `zero_module`: each residual branch's last conv/projection starts at zero, so every
    block starts as the identity (the usual starting point for training an LDM UNet)."""
    for name, module in unet.named_modules():
        if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def init_models(seed=0):
    """Randomly initialised (UNet, VAE, text encoder) of the built-in architecture."""
    from ..models.clip import CLIPTextModel
    from ..models.unet import UNetModel
    from ..models.vae import AutoencoderKL

    unet_cfg, vae_cfg, text_cfg = configs()
    torch.manual_seed(seed)
    unet, vae, text = UNetModel(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextModel(text_cfg)
    # CLIP's initialisation of the embeddings (token std 0.02, position std 0.01). nn.Embedding's
    # default N(0, 1) positions would drown the tokens: every prompt would encode alike at the
    # start and the UNet would learn to ignore the text (measured: the first trained version).
    torch.nn.init.normal_(text.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(text.text_model.embeddings.position_embedding.weight, std=0.01)
    _zero_init_(unet)
    # The posterior's log-variance starts at -6 (std 0.05) instead of 0: with nn.Conv2d's init
    # the first samples carry noise of std ~1 on latents of std ~1, the decoder learns to paint
    # blurred blobs, and the tiny KL weight takes thousands of steps to shrink the noise
    # (measured: small shapes came back as blobs of the wrong colour).
    with torch.no_grad():
        vae.quant_conv.bias[vae_cfg.embed_dim:] = LOGVAR_INIT
    return unet, vae, text


def init_checkpoint(path, seed=0, overwrite=False):
    """Write the random starting checkpoint of the built-in model's training recipe."""
    from ..io.save import save_checkpoint

    unet, vae, text = init_models(seed)
    return save_checkpoint(path, unet, vae, text, "sd1", overwrite=overwrite,
                           metadata={"sdfast.model": f"{MODEL_NAME}-init", "sdfast.seed": seed})
