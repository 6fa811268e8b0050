"""The models the suite times: random weights at real shapes, saved in the real formats.

`--arch sd15|sd21|builtin` builds sdfast's own UNet, VAE and text encoder at SD1.5, SD2.1(-base)
or the built-in model's shapes with seeded random weights and saves them as an LDM single file
(`model.safetensors`, what A1111, ComfyUI and Civitai use). Nothing is downloaded.

diffusers loads the same file with `from_single_file(path, config=<folder>)`: offline it needs a
folder of component configs, which `write_diffusers_config(pipe, folder)` writes from the
configs sdfast detected (so it also works for `--model PATH`), with a CLIP tokenizer made from
sdfast's shipped BPE merges. Both sides thus time the same weights.

Built models are cached in `work_dir/<arch>-seed<seed>/` (an SD1.5 file is 4.3 GB in fp32).
"""
import gzip
import json
import math
import os
from pathlib import Path

import torch

from ..errors import SdfastError
from .runtimes import ModelFiles

ARCHS = ("sd15", "sd21", "builtin")
CHECKPOINT = "model.safetensors"
CONFIG_DIR = "diffusers-config"

# Real SD1.x / SD2.x scheduler settings (the `scheduler_config.json` of both model repos).
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", timestep_spacing="linspace", steps_offset=1)


def _configs(arch):
    """`(family, UNetConfig, VAEConfig, text config)` of an architecture."""
    from ..builtin import configs as builtin_configs
    from ..models.clip import CLIPTextConfig, OpenCLIPTextConfig
    from ..models.unet import UNetConfig
    from ..models.vae import VAEConfig

    if arch == "sd15":
        return "sd1", UNetConfig(), VAEConfig(), CLIPTextConfig()
    if arch == "sd21":
        return ("sd2", UNetConfig(context_dim=1024, use_linear_in_transformer=True), VAEConfig(),
                OpenCLIPTextConfig())
    if arch == "builtin":
        return ("sd1", *builtin_configs())
    raise SdfastError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")


@torch.no_grad()
def random_init_(module, generator):
    """Seeded weights that keep activations O(1) through a deep residual net: weights
    N(0, 1/fan_in), biases and norm shifts N(0, 0.02), norm scales 1 + N(0, 0.1)."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
        elif leaf == "weight":                  # 1-D weights are norm scales
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return module


def build_models(arch, seed=0):
    """`(family, unet, vae, text_encoder)`: sdfast's modules with random weights."""
    from ..io.load import text_encoder_class
    from ..models.unet import UNetModel
    from ..models.vae import AutoencoderKL

    family, unet_cfg, vae_cfg, text_cfg = _configs(arch)
    text_cls, _ = text_encoder_class(family)
    gen = torch.Generator().manual_seed(seed)
    models = []
    for cls, cfg in ((UNetModel, unet_cfg), (AutoencoderKL, vae_cfg), (text_cls, text_cfg)):
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        models.append(random_init_(model, gen).eval())
    return (family, *models)


def ensure_model(arch, work_dir, seed=0, log=print):
    """The `ModelFiles` of a random-weight architecture, built and saved on first use."""
    from ..io.save import save_checkpoint

    folder = Path(work_dir) / f"{arch}-seed{seed}"
    checkpoint = folder / CHECKPOINT
    config_dir = folder / CONFIG_DIR
    if not (checkpoint.exists() and (config_dir / "model_index.json").exists()):
        log(f"building random-weight {arch} (seed {seed}) in {folder} ...")
        family, unet, vae, text = build_models(arch, seed)
        save_checkpoint(checkpoint, unet, vae, text, family, "eps",
                        metadata={"sdfast.bench.arch": arch, "sdfast.bench.seed": str(seed)},
                        overwrite=True)
        del unet, vae, text
        from .. import load

        write_diffusers_config(load(checkpoint, device="cpu", dtype=torch.float32), config_dir)
    family, *_ = _configs(arch)
    return ModelFiles(str(checkpoint), str(config_dir), f"{arch} (random weights, seed {seed})",
                      family, "eps")


def model_files(path, work_dir):
    """`ModelFiles` for a user's checkpoint (`--model`): diffusers folders load as they are;
    single files get a config folder written from what sdfast detects (cached per file)."""
    from .. import load

    path = os.fspath(path)
    if not os.path.exists(path):
        raise SdfastError(f"{path}: no such file or directory")
    pipe = load(path, device="cpu", dtype=torch.float32)
    info = pipe.info
    config_dir = None
    if not os.path.isdir(path):
        stat = os.stat(path)
        config_dir = Path(work_dir) / "configs" / f"{Path(path).stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (config_dir / "model_index.json").exists():
            write_diffusers_config(pipe, config_dir)
        config_dir = str(config_dir)
    return ModelFiles(path, config_dir, os.path.basename(os.path.normpath(path)), info["family"],
                      info["prediction"])


# ----------------------------------------------------------------------------- diffusers configs
def _unet_config(cfg):
    """sdfast `UNetConfig` -> diffusers `UNet2DConditionModel` keyword arguments."""
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    levels = range(len(channels))
    down = ["CrossAttnDownBlock2D" if lv in cfg.attention_levels else "DownBlock2D" for lv in levels]
    up = [name.replace("Down", "Up") for name in reversed(down)]
    if cfg.num_heads is not None:
        heads = cfg.num_heads                       # diffusers' legacy name: the head count
    else:
        heads = [c // cfg.head_dim for c in channels]
    return dict(sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=down, up_block_types=up, block_out_channels=channels,
                layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                attention_head_dim=heads, use_linear_projection=cfg.use_linear_in_transformer,
                transformer_layers_per_block=cfg.transformer_depth, norm_num_groups=cfg.norm_groups)


def _vae_config(cfg):
    levels = len(cfg.ch_mult)
    return dict(sample_size=512, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                latent_channels=cfg.z_channels, layers_per_block=cfg.num_res_blocks,
                block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
                down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels, norm_num_groups=cfg.norm_groups)


def _text_config(cfg):
    """transformers `CLIPTextConfig` keyword arguments. diffusers keeps an SD2 OpenCLIP tower
    without the blocks SD2 never runs (`skip_last_layers`)."""
    layers = cfg.layers - getattr(cfg, "skip_last_layers", 0)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
                num_hidden_layers=layers, num_attention_heads=cfg.heads,
                max_position_embeddings=cfg.positions, hidden_act=cfg.hidden_act,
                layer_norm_eps=cfg.eps, projection_dim=getattr(cfg, "projection_dim", None) or cfg.width)


def write_diffusers_config(pipe, folder):
    """Write the component configs (no weights) diffusers' `from_single_file(config=folder)`
    needs for `pipe`'s architecture: model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/ (Euler, the SD settings, the model's prediction type)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = Path(folder)
    info = pipe.info
    with torch.device("meta"):
        UNet2DConditionModel(**_unet_config(pipe.unet.config)).save_config(folder / "unet")
        AutoencoderKL(**_vae_config(pipe.vae.config)).save_config(folder / "vae")
    CLIPTextConfig(**_text_config(pipe.text_encoder.config)).save_pretrained(folder / "text_encoder")
    prediction = "v_prediction" if info["prediction"] == "v" else "epsilon"
    EulerDiscreteScheduler(**SCHEDULER, prediction_type=prediction).save_config(folder / "scheduler")
    write_clip_tokenizer_dir(folder / "tokenizer", sd2=info["family"] == "sd2")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "image_encoder": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _diffusers_version():
    import diffusers

    return diffusers.__version__


def write_clip_tokenizer_dir(out, sd2=False):
    """Write `vocab.json` + `merges.txt` (+ the tokenizer configs) for transformers'
    CLIPTokenizer from sdfast's shipped merge list, laying the vocabulary out as OpenAI's
    simple_tokenizer.py does, with transformers' own byte table. SD2's tokenizer pads with "!"
    (id 0, as OpenCLIP pads with 0); SD1's with <|endoftext|>. Returns `out`."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from ..text import __file__ as text_init

    bpe = Path(text_init).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # simple_tokenizer.py keeps these 48894 merges
    alphabet = list(bytes_to_unicode().values())
    tokens = (alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
              + ["<|startoftext|>", "<|endoftext|>"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    if sd2:
        CLIPTokenizer.from_pretrained(str(out), model_max_length=77, pad_token="!").save_pretrained(str(out))
    else:
        CLIPTokenizer.from_pretrained(str(out), model_max_length=77).save_pretrained(str(out))
    return out
