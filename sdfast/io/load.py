"""From a path to ready nn.Modules: read, detect, split, build on meta, assign the weights.

Each tensor is moved once to its device and dtype (`Tensor.to`, a no-op for an mmapped fp32
tensor on the CPU) and assigned into a model built on the meta device: the weights are never
held twice in memory.
"""
import os
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .checkpoint import read_checkpoint
from .detect import ModelInfo, detect, split_components
from .diffusers import TEXT_SKIP_KEY, is_diffusers_folder, read_diffusers_folder


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    info: ModelInfo
    metadata: dict
    source: str


def read_any(path):
    """`(ldm_state_dict, metadata)` from a single file or a diffusers folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path}: a folder without model_index.json is not a "
                                  "diffusers model")
        return read_diffusers_folder(path)
    return read_checkpoint(path)


def build_module(cls, config, sd, device, dtype, what):
    """Build `cls(config)` on the meta device and assign `sd` moved to `device`/`dtype`."""
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    moved = {}
    for key, value in sd.items():
        want = expected.get(key)
        if want is not None:
            if tuple(value.shape) != tuple(want.shape):
                raise CheckpointError(f"{what} weight {key} has shape {list(value.shape)}, the "
                                      f"detected architecture needs {list(want.shape)}")
            if want.is_floating_point() and not value.is_floating_point():
                raise CheckpointError(f"{what} weight {key} is {value.dtype}, expected floating "
                                      "point")
        target = dtype if value.is_floating_point() else value.dtype
        moved[key] = value.to(device=device, dtype=target)
    result = model.load_state_dict(moved, strict=False, assign=True)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing (e.g. "
                        f"{', '.join(result.missing_keys[:3])})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. "
                        f"{', '.join(result.unexpected_keys[:3])})")
    if problems:
        raise CheckpointError(f"{what} weights do not match the detected architecture: "
                              + "; ".join(problems))
    return model.eval().requires_grad_(False)


def text_encoder_class(family):
    from ..models.clip import CLIPTextConfig, CLIPTextModel, OpenCLIPTextConfig, OpenCLIPTextModel

    if family == "sd2":
        return OpenCLIPTextModel, OpenCLIPTextConfig
    return CLIPTextModel, CLIPTextConfig


def text_encoder_config(family, text_sd, metadata):
    _, config_cls = text_encoder_class(family)
    if family == "sd2" and TEXT_SKIP_KEY in metadata:
        return config_cls.detect_from_weights(text_sd,
                                              skip_last_layers=int(metadata[TEXT_SKIP_KEY]))
    return config_cls.detect_from_weights(text_sd)


def unet_heads(metadata):
    """Head settings recorded in the file's metadata (they cannot be read from shapes)."""
    from .save import UNET_HEAD_DIM_KEY, UNET_HEADS_KEY

    if UNET_HEAD_DIM_KEY in metadata:
        return {"head_dim": int(metadata[UNET_HEAD_DIM_KEY])}
    if UNET_HEADS_KEY in metadata:
        return {"num_heads": int(metadata[UNET_HEADS_KEY])}
    return {}


def load_components(path, device="cpu", dtype=torch.float32, prediction=None):
    from ..models.unet import UNetConfig, UNetModel
    from ..models.vae import AutoencoderKL, VAEConfig

    sd, metadata = read_any(path)
    info = detect(sd, metadata, prediction=prediction)
    unet_sd, vae_sd, text_sd = split_components(sd, info.family)
    del sd
    try:
        unet_cfg = UNetConfig.detect_from_weights(unet_sd, **unet_heads(metadata))
        vae_cfg = VAEConfig.detect_from_weights(vae_sd)
        text_cfg = text_encoder_config(info.family, text_sd, metadata)
    except (KeyError, IndexError, ValueError) as exc:
        raise CheckpointError(f"{path}: unrecognised checkpoint layout ({exc})") from None
    text_cls, _ = text_encoder_class(info.family)
    try:
        unet = build_module(UNetModel, unet_cfg, unet_sd, device, dtype, "UNet")
        vae = build_module(AutoencoderKL, vae_cfg, vae_sd, device, dtype, "VAE")
        text = build_module(text_cls, text_cfg, text_sd, device, dtype, "text encoder")
    except CheckpointError as exc:
        raise CheckpointError(f"{os.fspath(path)}: {exc}") from None
    return Components(unet=unet, vae=vae, text_encoder=text, info=info, metadata=metadata,
                      source=os.fspath(path))
