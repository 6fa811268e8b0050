"""Random-weight Stable Diffusion pipelines in the real file formats, and their diffusers twins.

`make_reference(kind)` builds a diffusers `StableDiffusionPipeline` with seeded random weights;
`save_single_file(pipe, path)` writes the same weights as an LDM single-file checkpoint, the
layout A1111 and ComfyUI load; `pipe.save_pretrained(dir)` gives the diffusers folder.
"""
import torch
from safetensors.torch import save_file

from _diffusers_models import UNET_CONFIGS, VAE_CONFIGS, randomize_norms_
from _fixtures import write_clip_tokenizer_dir
from sdfast.io.detect import CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from sdfast.io.diffusers_clip import clip_diffusers_to_ldm, openclip_diffusers_to_ldm
from sdfast.io.diffusers_unet import unet_diffusers_to_ldm, vae_diffusers_to_ldm

# Small models that keep sdfast's head rule (SD1: 8 heads; SD2: 64-wide heads) and CLIP's
# 64-wide text heads, so the detected configs are the ones diffusers was built with.
_SMALL_SD2_UNET = dict(in_channels=4, out_channels=4,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                       block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64,
                       attention_head_dim=(1, 2), use_linear_projection=True)
_SMALL_VAE = dict(VAE_CONFIGS["small"], block_out_channels=(32, 32, 64, 64),
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)  # 8x, as SD
_SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=1)
_SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12)
_SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16)

KINDS = {
    # kind: (family, unet config, vae config, text config)
    "small_sd1": ("sd1", UNET_CONFIGS["small"], _SMALL_VAE, _SMALL_TEXT),
    "small_sd2": ("sd2", _SMALL_SD2_UNET, _SMALL_VAE, _SMALL_TEXT),
    "small_sd1_inpaint": ("sd1", UNET_CONFIGS["small_inpaint"], _SMALL_VAE, _SMALL_TEXT),
    "sd15": ("sd1", UNET_CONFIGS["sd15"], VAE_CONFIGS["sd"], _SD15_TEXT),
    "sd21": ("sd2", UNET_CONFIGS["sd21"], VAE_CONFIGS["sd"], _SD21_TEXT),
}


def family_of(kind):
    return KINDS[kind][0]


def make_reference(kind, tmp_dir, prediction="eps", seed=0):
    """A diffusers StableDiffusionPipeline with seeded random weights (float32, eval)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    family, unet_cfg, vae_cfg, text_cfg = KINDS[kind]
    gen = torch.Generator().manual_seed(seed + 100)
    torch.manual_seed(seed)
    unet = randomize_norms_(UNet2DConditionModel(**{"sample_size": 64, **unet_cfg}), gen)
    vae = randomize_norms_(AutoencoderKL(**vae_cfg), gen)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, projection_dim=text_cfg["hidden_size"],
        hidden_act="gelu" if family == "sd2" else "quick_gelu", **text_cfg))
    randomize_norms_(text, gen)
    tok_dir = write_clip_tokenizer_dir(tmp_dir / "tokenizer_src")
    # SD2's tokenizer pads with "!" (id 0), as OpenCLIP pads with 0; SD1 pads with <|endoftext|>.
    pad = {"pad_token": "!"} if family == "sd2" else {}
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77, **pad)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", timestep_spacing="linspace", steps_offset=1,
        prediction_type="v_prediction" if prediction == "v" else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def _native_openclip(text_sd, seed):
    """An SD2 LDM text tower as real single files hold it: one more resblock than diffusers
    keeps (SD2 runs all but the last). The extra block gets random weights: it must not matter."""
    sd = dict(openclip_diffusers_to_ldm(text_sd))
    last = max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    gen = torch.Generator().manual_seed(seed + 7)
    prefix = f"transformer.resblocks.{last}."
    for key in [k for k in sd if k.startswith(prefix)]:
        value = sd[key]
        sd[key.replace(prefix, f"transformer.resblocks.{last + 1}.")] = torch.randn(
            value.shape, generator=gen, dtype=value.dtype)
    return sd


def ldm_state_dict(pipe, family, seed=0):
    ldm = {}
    for key, value in unet_diffusers_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)).items():
        ldm[UNET_PREFIX + key] = value
    for key, value in vae_diffusers_to_ldm(pipe.vae.state_dict()).items():
        ldm[VAE_PREFIX + key] = value
    text_sd = pipe.text_encoder.state_dict()
    if family == "sd2":
        for key, value in _native_openclip(text_sd, seed).items():
            ldm[OPENCLIP_PREFIX + key] = value
    else:
        for key, value in clip_diffusers_to_ldm(text_sd).items():
            ldm[CLIP_PREFIX + key] = value
    return {k: v.detach().contiguous() for k, v in ldm.items()}


def save_single_file(pipe, family, path, metadata=None):
    save_file(ldm_state_dict(pipe, family), str(path), metadata=metadata)
    return path
